"""Every merge method through surgery and through mergekit 0.1.5: one mergekit config per method, run as
it is by both tools (`surgery apply CONFIG --out` translates it) on the same inputs; the largest error
against mergekit's output, and both tools' wall time and peak memory.

    python benchmarks/merges_vs_mergekit.py [--mergekit-venv /tmp/mk-venv] [--runs 3] [--models base,prose,code]
                                            [--bf16]

mergekit is installed into its own venv (CPU torch 2.13.0 first, then mergekit==0.1.5) when the venv
has no mergekit-yaml yet; it is never a dependency of surgery. The inputs default to the demo models
(float32), merged in float32 by both tools, so a difference is the method's, not a rounding of the
output; with --bf16 the inputs are bf16 copies (many magnitudes tie, as in real checkpoints), both
tools compute in float32 and write bf16 (dtype: float32, out_dtype: bfloat16). Error: per tensor,
max |surgery - mergekit| / max |mergekit|, the largest over tensors; and the share of elements
differing by more than 1e-6 of the tensor's max. DARE and DELLA draw their noise differently by design,
so they are compared in distribution on one model: the share of entries kept and the median rescale of
the kept ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_chain import timed
from safetensors.torch import load_file, save_file

from surgery.demo_models import demo_model

EXACT = {  # method: the mergekit config both tools run, {base}/{a}/{b} filled in
    "linear": "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 2}}}}\n"
              "  - {{model: {b}, parameters: {{weight: 1}}}}",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {a}}}]\n"
             "parameters:\n  t: [{{filter: self_attn, value: [0, 0.5, 1]}}, {{value: 0.3}}]",
    "nuslerp": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
               "  - {{model: {b}, parameters: {{weight: 3}}}}",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\nmodels:\n"
                  "  - {{model: {a}, parameters: {{weight: 1}}}}\n  - {{model: {b}, parameters: {{weight: 2}}}}",
    "karcher": "merge_method: karcher\nmodels: [{{model: {a}}}, {{model: {b}}}]",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - {{model: {a}, parameters: {{weight: 0.7}}}}\n  - {{model: {b}, parameters: {{weight: 0.4}}}}",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - {{model: {a}, parameters: {{weight: 0.7, density: 0.3}}}}\n"
            "  - {{model: {b}, parameters: {{weight: 0.4, density: 0.3}}}}",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
                   "  - {{model: {a}, parameters: {{weight: 1, density: 0.5, gamma: 0.02}}}}\n"
                   "  - {{model: {b}, parameters: {{weight: 1, density: 0.5, gamma: 0.02}}}}",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n"
                        "  - {{model: {a}, parameters: {{weight: 1, density: 0.5, gamma: 0.02}}}}\n"
                        "  - {{model: {b}, parameters: {{weight: 1, density: 0.5, gamma: 0.02}}}}",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
           "parameters: {{select_topk: 0.4}}",
}
SAMPLED = {  # one model: the kept share and the rescale are visible in the output
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n"
                   "  - {{model: {a}, parameters: {{weight: 1, density: 0.3}}}}",
    "della_linear": "merge_method: della_linear\nbase_model: {base}\nmodels:\n"
                    "  - {{model: {a}, parameters: {{weight: 1, density: 0.4, epsilon: 0.1}}}}",
}


def mergekit_yaml(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    return exe


def bf16_copy(folder: Path, to: Path) -> Path:
    """The model with its float tensors in bf16 (config and tokenizer as they are)."""
    shutil.copytree(folder, to)
    for shard in to.glob("*.safetensors"):
        tensors = {n: t.bfloat16() if t.is_floating_point() else t for n, t in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((to / "config.json").read_text())
    config.update({key: "bfloat16" for key in ("dtype", "torch_dtype") if key in config})
    (to / "config.json").write_text(json.dumps(config, indent=2))
    return to


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def largest_error(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, float]:
    worst, differing, total = 0.0, 0, 0
    for name, reference in theirs.items():
        scale = float(reference.abs().max()) or 1.0
        gap = (ours[name].float() - reference.float()).abs()
        worst = max(worst, float(gap.max()) / scale)
        differing += int((gap > 1e-6 * scale).sum())
        total += reference.numel()
    return worst, differing / total


def kept_and_rescale(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                     model: dict[str, torch.Tensor]) -> tuple[float, float]:
    kept, total, ratios = 0, 0, []
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        tau, moved = model[name] - b, out[name] - b
        live = tau != 0
        keep = live & (moved != 0)
        kept += int(keep.sum())
        total += int(live.sum())
        ratios.append((moved[keep] / tau[keep]).median().item() if keep.any() else 1.0)
    return kept / total, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-venv", type=Path, default=Path(tempfile.gettempdir()) / "mk-venv")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="base,prose,code", help="demo models (or folders): base, a, b")
    parser.add_argument("--bf16", action="store_true", help="merge bf16 copies of the inputs")
    args = parser.parse_args()
    exe = mergekit_yaml(args.mergekit_venv)
    base, a, b = (Path(m) if "/" in m else demo_model(m) for m in args.models.split(","))
    work = Path(tempfile.mkdtemp())
    if args.bf16:
        base, a, b = (bf16_copy(folder, work / f"{folder.name}-bf16") for folder in (base, a, b))
    out_dtype = "bfloat16" if args.bf16 else "float32"
    print(f"inputs: {base.name} + {a.name}, {b.name} ({out_dtype}, merged in float32); {args.runs} runs each, "
          "interleaved; median wall, peak RSS\n")
    print("| method | largest error | elements differing | surgery s | mergekit s | surgery MiB | mergekit MiB |")
    print("|---|---|---|---|---|---|---|")
    for method, config in {**EXACT, **SAMPLED}.items():
        mk = work / f"{method}.yaml"  # the same file for both tools
        mk.write_text(config.format(base=base, a=a, b=b) + f"\ndtype: float32\nout_dtype: {out_dtype}\n")
        commands = {"surgery": [sys.executable, "-m", "surgery", "apply", str(mk), "--out", str(work / "ours"),
                                "--no-fsync"],
                    "mergekit": [str(exe), str(mk), str(work / "theirs"), "--no-copy-tokenizer", "--quiet"]}
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, cmd in commands.items():
                subprocess.run(["rm", "-rf", str(work / ("ours" if name == "surgery" else "theirs"))], check=True)
                runs[name].append(timed(cmd))
        wall = {name: statistics.median(t for t, _ in r) for name, r in runs.items()}
        rss = {name: statistics.median(m for _, m in r) / 2**20 for name, r in runs.items()}
        ours, theirs = weights(work / "ours"), weights(work / "theirs")
        if method in SAMPLED:
            base_w, model_w = weights(base), weights(a)
            k1, r1 = kept_and_rescale(ours, base_w, model_w)
            k2, r2 = kept_and_rescale(theirs, base_w, model_w)
            error = f"kept {k1:.4f} vs {k2:.4f}, rescale {r1:.3f} vs {r2:.3f}"
            share = "(sampled)"
        else:
            worst, differing = largest_error(ours, theirs)
            error, share = f"{worst:.2e}", f"{differing:.2%}"
        print(f"| {method} | {error} | {share} | {wall['surgery']:.2f} | {wall['mergekit']:.2f} | "
              f"{rss['surgery']:.0f} | {rss['mergekit']:.0f} |", flush=True)
    subprocess.run(["rm", "-rf", str(work)], check=True)


if __name__ == "__main__":
    main()
