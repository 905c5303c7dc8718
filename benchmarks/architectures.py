"""Write docs/architectures.md: every model type of the installed transformers through drop, loop, reorder.

    python benchmarks/architectures.py            # rewrites docs/architectures.md (about two minutes)

Each type's tiny random checkpoint (built once, cached under SURGERY_CACHE) is edited by surgery and
compared with the same edit done in memory on the transformers module. tests/test_architectures.py
runs the same checks and fails if this page no longer says what they find.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgery.demo_models.zoo import ZooEntry, auto_class, logits_of, tiny_checkpoint, zoo, zoo_types  # noqa: E402

PAGE = REPO / "docs" / "architectures.md"


# The edits every architecture is put through: (name, output layers as source indices of a 4-layer model).
EDITS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("drop a middle layer", (0, 1, 3)),
    ("drop layer 0", (1, 2, 3)),
    ("loop", (0, 1, 2, 1, 2, 3)),
    ("reorder", (0, 2, 1, 3)),
)


class Untestable(Exception):
    """A model type whose tiny checkpoint transformers itself cannot load back or run."""


@dataclass(frozen=True)
class EditResult:
    """What one edit of one model type came to: exact (logits equal the in-memory edit), refused
    (with the one line), or wrong (loaded with key problems, or different logits: always a bug)."""

    edit: str
    outcome: str  # exact | refused | wrong
    detail: str = ""


def edited_in_memory(model: Any, prefix: str, layer_tensor: str, order: tuple[int, ...],
                     config_path: tuple[str, ...] = (), count_key: str = "num_hidden_layers") -> Any:
    """The reference: the same edit done on the transformers module, its layer modules placed in the
    new order (a looped layer is the same module twice) and the per-layer config lists reordered."""
    import copy

    import torch

    from surgery.architecture.structure import layer_list

    reference = copy.deepcopy(model)
    layers = layer_list(reference, prefix, layer_tensor)
    path = next(name for name, module in reference.named_modules() if module is layers)
    parent, _, name = path.rpartition(".")
    reference.get_submodule(parent).register_module(name, torch.nn.ModuleList([layers[i] for i in order]))
    config = reference.config
    for key in config_path:
        config = getattr(config, key)
    count = len(layers)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == count and key != "architectures" and not key.endswith("_token_id"):
            setattr(config, key, [value[i] for i in order])
    if isinstance(getattr(config, count_key, None), int):  # else the count is a per-layer list's length
        setattr(config, count_key, len(order))
    return reference


def check_edits(folder: Path, work: Path, edits: tuple[tuple[str, tuple[int, ...]], ...] = EDITS,
                by_weights: bool = False) -> list[EditResult]:
    """Put a saved model through each edit with surgery and compare with the edit done in memory: its
    logits, or with `by_weights` (where transformers' own forward fails) every tensor of its state dict."""
    import torch

    from surgery.architecture.structure import model_class
    from surgery.checkpoint.layout import find_layout
    from surgery.checkpoint.reader import Checkpoint
    from surgery.errors import SurgeryError
    from surgery.evaluation.models import quiet_transformers
    from surgery.pipeline import apply
    from surgery.plan.schema import Plan

    checkpoint = Checkpoint.open(folder)
    try:
        layout = find_layout(checkpoint.config, checkpoint.tensors)
    except SurgeryError as e:  # surgery cannot place the layers: every edit must be refused with this line
        layout, unplaced = None, str(e)
    results = []
    with quiet_transformers():
        loader = model_class(checkpoint.config) or auto_class(checkpoint.config["model_type"])
        try:
            source = loader.from_pretrained(folder, dtype=torch.float32).eval()
            vocab = source.get_input_embeddings().weight.shape[0]
            if not by_weights:
                logits_of(source, vocab)
        except Exception as e:  # transformers' own round trip fails: nothing of surgery's to test
            raise Untestable(f"transformers cannot load the checkpoint it saved ({type(e).__name__})") from None
        for edit, order in edits:
            plan = Plan.model_validate({"model": str(folder), "steps": [{"op": "chain", "layers": list(order)}]})
            out = work / edit.replace(" ", "-")
            try:
                apply(plan, out=out, force=True, fsync=False)
            except SurgeryError as e:
                results.append(EditResult(edit, "refused", str(e).replace(str(folder), "model")))
                continue
            except Exception as e:  # a crash is no clean refusal: reported as wrong
                results.append(EditResult(edit, "wrong", f"surgery crashed: {type(e).__name__}: {e}"))
                continue
            if layout is None:
                results.append(EditResult(edit, "wrong", f"written although surgery said: {unplaced}"))
                continue
            model, info = loader.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
            problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
            if problems:
                results.append(EditResult(edit, "wrong", f"transformers loads it with {problems}"))
                continue
            first = next(name for name in checkpoint.tensors if (layout.split(name) or (None,))[0] == 0)
            reference = edited_in_memory(source, layout.prefix, first, order, layout.config_path, layout.count_key)
            if by_weights:
                results.append(weights_compared(edit, reference.state_dict(), model.state_dict()))
                continue
            expected = logits_of(reference.eval(), vocab)
            got = logits_of(model.eval(), vocab)
            difference = (got - expected).abs().max().item()
            exact = difference <= 1e-5 * max(1.0, expected.abs().max().item())
            results.append(EditResult(edit, "exact" if exact else "wrong", f"largest logit difference {difference:.2e}"))
    return results


def weights_compared(edit: str, expected: dict[str, Any], got: dict[str, Any]) -> EditResult:
    """Exact where the loaded output holds every tensor of the in-memory edit, bit for bit."""
    import torch

    if expected.keys() != got.keys():
        return EditResult(edit, "wrong", f"state dict keys differ: {sorted(expected.keys() ^ got.keys())[:4]}")
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    if different:
        return EditResult(edit, "wrong", f"{len(different)} tensors differ, e.g. {different[0]}")
    return EditResult(edit, "exact", f"all {len(expected)} tensors equal")


@dataclass(frozen=True)
class TypeReport:
    """One model type across the edits: its results, or why no tiny model of it could be built."""

    model_type: str
    results: tuple[EditResult, ...] = ()
    problem: str | None = None
    forward_problem: str | None = None  # compared by weights: transformers' own forward fails

    @property
    def summary(self) -> str:
        if self.problem is not None:
            return "not tested"
        outcomes = {r.outcome for r in self.results}
        return "exact" if outcomes == {"exact"} else "WRONG" if "wrong" in outcomes else "exact or refused"




def report(entry: ZooEntry, work: Path) -> TypeReport:
    """Every edit of one model type, against its in-memory reference."""
    if entry.problem is not None:
        return TypeReport(entry.model_type, problem=entry.problem)
    try:
        results = check_edits(tiny_checkpoint(entry), work, by_weights=entry.forward_problem is not None)
        return TypeReport(entry.model_type, tuple(results), forward_problem=entry.forward_problem)
    except Untestable as e:
        return TypeReport(entry.model_type, problem=str(e))


def cell(result: EditResult, by_weights: bool = False) -> str:
    if result.outcome == "exact":
        return "exact (weights)" if by_weights else "exact"
    reason = result.detail.replace("|", "/").replace("\n", " ")
    return f"{result.outcome}: {reason[:140].strip()}{'...' if len(reason) > 140 else ''}"


def render(reports: list[TypeReport], version: str) -> str:
    exact = sum(r.summary == "exact" for r in reports)
    refused = sum(r.summary == "exact or refused" for r in reports)
    untested = sum(r.summary == "not tested" for r in reports)
    wrong = sum(r.summary == "WRONG" for r in reports)
    by_weights = [r for r in reports if r.forward_problem is not None and r.problem is None]
    lines = [
        "# Architectures",
        "",
        "Generated by `python benchmarks/architectures.py`; `tests/test_architectures.py` checks it still holds.",
        "",
        f"transformers {version}: every model type it maps to a causal LM, and the vision-language families, as a",
        "tiny random checkpoint (4 layers), through four `chain` edits. Each result is either **exact** (the output",
        "loads with no missing, unexpected or mismatched keys and its logits equal the same edit done in memory on",
        "the transformers module) or **refused** before anything is written, with the one line surgery prints.",
        "Where transformers' own forward fails on the tiny model (listed below the table), **exact (weights)** means",
        "the output loads with no key problems and every tensor of it equals the in-memory edit's, bit for bit.",
        "A type is *not tested* where no tiny checkpoint of it could be built from its default config; the reason",
        "is given.",
        "",
        f"{len(reports)} model types: {exact} exact in every edit ({len(by_weights)} of them compared by weights),"
        f" {refused} exact or refused, {untested} not tested, {wrong} wrong.",
        "",
        "| model type | " + " | ".join(name for name, _ in EDITS) + " |",
        "|---|" + "---|" * len(EDITS),
    ]
    lines += ["| " + " | ".join([r.model_type, *row(r)]) + " |" for r in reports]
    if by_weights:
        lines += ["", "Compared by weights, where transformers' own forward of the tiny model fails:", ""]
        lines += [f"- {r.model_type}: {r.forward_problem}" for r in by_weights]
    return "\n".join(lines) + "\n"


def row(report: TypeReport) -> list[str]:
    """A model type's cells: one per edit (the reason, where it was not tested, in the first)."""
    if report.problem is not None:
        return [f"not tested: {report.problem.replace('|', '/')[:140].strip()}", *([""] * (len(EDITS) - 1))]
    return [cell(result, report.forward_problem is not None) for result in report.results]


def main() -> None:
    import transformers

    with tempfile.TemporaryDirectory() as work:
        reports = [report(entry, Path(work) / entry.model_type) for entry in zoo(zoo_types())]
    PAGE.write_text(render(reports, transformers.__version__))
    print(f"wrote {PAGE.relative_to(REPO)}: {len(reports)} model types")


if __name__ == "__main__":
    main()
