"""README.md, the model card every output folder carries, made from the output's record
(surgery.json) and config in memory: written with the output, rewritten with them when an
evaluation is recorded, so the card is in the folder before anything is pushed and always says
what the folder holds."""

from __future__ import annotations

import re
from typing import Any

import yaml

from surgery.formats import ensemble_folder, recursive, trit_planes
from surgery.ops.registry import registry

CARD_NAME = "README.md"
_OWN_FORMATS = {recursive.MODEL_TYPE: "compact recursive", ensemble_folder.MODEL_TYPE: "ensemble",
                trit_planes.MODEL_TYPE: "trit-plane"}


def model_card(provenance: dict[str, Any], config: dict[str, Any], name: str, path: str = "PATH") -> str:
    """The card of output `name` (at `path`) whose surgery.json is `provenance` and config.json `config`."""
    from huggingface_hub import ModelCard, ModelCardData

    plan = provenance.get("plan", {})
    steps = plan.get("steps", [])
    ops = sorted({step["op"] for step in steps})
    records = list(provenance.get("sources", {}).values())
    sources = [source_id(s) for s in records]
    hub_ids = list(dict.fromkeys(s["hub_id"] for s in records if s.get("hub_id")))  # never a local path
    own_format = _OWN_FORMATS.get(config.get("model_type", ""))
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation=_relation(ops, sources) if hub_ids else None,
        tags=["surgery", *ops],
        library_name=None if own_format else "transformers",
    )
    body = [f"# {name}", "", f"Made with surgery {provenance.get('surgery_version', '')} from "
            + ", ".join(f"`{s}`" for s in sources) + ".", "", "## What was done", ""]
    body += [f"{i + 1}. {describe_step(step)}" for i, step in enumerate(steps)]
    papers = dict.fromkeys(registry()[step["op"]].paper for step in steps)
    body += ["", "Methods: " + "; ".join(papers) + "." if papers else ""]
    written = provenance.get("plan_text") or yaml.safe_dump(plan, sort_keys=False)
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", written)), default=0))
    origin = (["The mergekit config it was made from, which surgery translated into the plan surgery.json records "
               "(translated_plan).", ""] if provenance.get("translated_from") == "mergekit" else [])
    body += ["", "## Plan", "", *origin, f"{fence}yaml", written.rstrip(), fence, "",
             "surgery.json records it resolved: every default filled in, every model's files and header hashes.", ""]
    heals = [(fit["step"], fit["heal"]) for fit in provenance.get("fits", []) if "heal" in fit]
    if heals:
        body += ["## Healing", "", *_healing_lines(heals), ""]
    evaluation = provenance.get("evaluation")
    if evaluation:
        body += ["## Evaluation", "", *_evaluation_table(evaluation), ""]
    gates = provenance.get("quality_gates")
    if gates:
        body += ["## Quality gates", "", *_gates_lines(gates), ""]
    body += ["## How to load", "", *_how_to_load(own_format, config, path), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content


def source_id(source: dict[str, Any]) -> str:
    """A source as the card names it: its Hub id (at its commit) where it came from the Hub, else its path."""
    if source.get("hub_id"):
        return f"{source['hub_id']}@{str(source.get('revision', ''))[:12]}".rstrip("@")
    return str(source.get("path", ""))


def _relation(ops: list[str], sources: list[str]) -> str | None:
    if "bits" in ops:
        return "quantized"
    return "merge" if len(sources) > 1 else None


def describe_step(step: dict[str, Any]) -> str:
    """One plain sentence per step, the op's own."""
    op = registry()[step["op"]]
    return op.describe(op.step.model_validate(step))


def _evaluation_table(evaluation: dict[str, Any]) -> list[str]:
    rows = ["| data | tokens | perplexity | reference | delta |", "|---|---|---|---|---|"]
    for score in evaluation.get("datasets", []):
        reference = score.get("base_perplexity")
        rows.append(f"| {score['data']} | {score['tokens']} | {score['perplexity']:.3f} | "
                    + ("" if reference is None else f"{reference:.3f}") + " | "
                    + ("" if score.get("delta") is None else f"{score['delta']:+.3f}") + " |")
    reference = evaluation.get("base")
    rows += ["", f"Reference: `{reference}`. " if reference else "",
             f"Window {evaluation.get('window')}, stride {evaluation.get('stride')}, {evaluation.get('dtype')} on "
             f"{evaluation.get('device')}."]
    return rows


def _healing_lines(heals: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """Each heal's held-out scores before and after beside the teacher's, then its schedule and losses."""
    rows = []
    for step, record in heals:
        held, schedule, tokens = record["held_out"], record["schedule"], record["tokens"]
        loss = f"KL to the teacher's top {record['top_k']} log-probabilities" if record["loss"] == "kl" else "LM loss"
        rows += [f"Step {step + 1} trained {', '.join(record['trained'])} ({record['parameters']:,} parameters) by "
                 f"{loss}: {schedule['optimizer']}, lr {schedule['lr']:g} ({schedule['warmup_steps']} warm-up steps, "
                 f"{schedule['decay']}), {schedule['steps']} steps of {schedule['batch_size']} x {schedule['window']} "
                 f"tokens ({tokens['trained']:,} tokens from {tokens['train_text']:,} of text), seed "
                 f"{schedule['seed']}, {record['seconds']:g} s on {record['device']}.", "",
                 "| held-out text | perplexity | KL to the teacher |", "|---|---|---|",
                 f"| before healing | {held['before']['perplexity']:.3f} | {held['before']['kl']:.4f} |",
                 f"| after healing | {held['after']['perplexity']:.3f} | {held['after']['kl']:.4f} |",
                 f"| teacher | {held['teacher_perplexity']:.3f} | |", "",
                 f"Held out: {tokens['held_out_text']:,} tokens of the same text, never trained on.", ""]
    return rows


def _gates_lines(gates: dict[str, Any]) -> list[str]:
    """Each limit beside its measure against the reference; a missed gate first, in bold, so nobody misses it."""
    names = {"perplexity_increase": "perplexity increase", "kl": "KL divergence from the reference, nats/token",
             "top1_agreement": "top-1 agreement"}
    rows = [] if gates.get("passed") else [f"**This model misses its plan's quality gates: {'; '.join(gates['missed'])}.**", ""]
    rows += ["| gate | limit | measured |", "|---|---|---|"]
    for key, limit in gates.get("limits", {}).items():
        rows.append(f"| {names.get(key, key)} | {'at least' if key == 'top1_agreement' else 'at most'} {limit:.4g} | "
                    f"{gates.get('measured', {}).get(key, float('nan')):.4g} |")
    return rows


def _how_to_load(own_format: str | None, config: dict[str, Any], path: str) -> list[str]:
    if own_format:
        return [f"This folder is a surgery {own_format} model: plain transformers refuses it by its model type.",
                "", "```python", "import surgery", "",
                f"loaded = surgery.load_for_eval({path!r})  # .model maps input_ids to logits; .tokenizer", "```",
                "", f"or `surgery eval {path}`. `surgery materialize` turns a compact or trit-plane model into a "
                "standard one."]
    quantized = (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"
    return (["Packed compressed-tensors weights: `pip install compressed-tensors` first (which runtimes load which "
             "widths: surgery's docs/quantization.md).", ""]
            if quantized else []) + [
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained({path!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({path!r})", "```"]
