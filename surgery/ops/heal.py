"""`heal`: train the edited model toward the model the plan started from (distillation), winning back
what tie, drop or a merge cost (Bae et al. 2024 uptrain relaxed recursive models after their SVD
initialisation; Gromov et al. 2024 heal pruned models with a short LoRA fine-tune).

What trains is chosen in the plan: a compact recursive model's per-depth LoRA (`relaxation`) and/or its
shared layers (`shared`: one Parameter per slot, so its gradient is the sum over the depths using it);
new LoRA adapters on a standard model's layers (`adapter`, merged into the weights at the end); or every
parameter (`all`). The output keeps the format it received: a compact model stays compact, a standard
one stays standard, and every tensor that did not train is the recipe it was (its bytes unchanged).
The trained tensors go to one safetensors file in the fits cache, which the executor copies from.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from surgery.checkpoint.blocks import torch_dtype
from surgery.checkpoint.modules import is_expert, is_router
from surgery.checkpoint.reader import FLOAT_DTYPES, ShardHeader, read_shard_header
from surgery.devices import check_device_name, resolve_device
from surgery.errors import Interrupted, SurgeryError
from surgery.evaluation.parameters import ParameterSlot
from surgery.formats.recursive import SECTION, depth_layers, is_compact, lora_names, spec_of
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel, Strict, parse_layers
from surgery.ops.fit_memo import fit_folder, folder_stamp, save_fit_tensors, text_digest
from surgery.ops.heal_train import (
    CHECKPOINT_FILE,
    TEACHER_FILE,
    Schedule,
    Student,
    Windows,
    cut_windows,
    teacher_targets,
    train,
)
from surgery.ops.registry import Op
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import Layer, ModelView

HEALED_FILE = "healed.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Part = Literal["relaxation", "shared", "adapter", "all"]


class AdapterSettings(Strict):
    """LoRA adapters a heal adds to a standard model's linear layers and merges into them at the end."""

    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0, description="The adapter adds (alpha / rank) B A.")
    layers: list[int] | None = Field(default=None, description="Layers given adapters (default: every layer).")
    modules: list[str] | None = Field(
        default=None, description="Linear modules given adapters, e.g. [q_proj, down_proj]; default every matrix "
        "of a layer but an MoE expert's or router's.")
    write: Literal["merged", "peft"] = Field(
        default="merged", description="merged: into the weights; peft: a PEFT LoRA adapter beside the unchanged model.")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        return None if value is None else sorted(set(parse_layers(value)))  # a layer adapted once


class HealStep(StepModel):
    """Distil the edited model toward the model the plan started from, training the parts named."""

    op: Literal["heal"]
    data: list[str] = Field(min_length=1, description="builtin:NAME or .txt/.jsonl files to train on.")
    teacher: str | None = Field(default=None, description="The model to distil toward (default: the plan's model).")
    train: list[Part] | None = Field(
        default=None, description="relaxation, shared (compact recursive models), adapter, all; default: "
        "relaxation and shared for a relaxed compact model, shared for a strict one, adapter otherwise.")
    adapter: AdapterSettings = AdapterSettings()
    loss: Literal["kl", "lm"] = Field(default="kl", description="kl: distillation; lm: the next-token loss on the text.")
    top_k: int = Field(default=64, ge=1, description="Teacher log-probabilities kept per token (the rest as one).")
    steps: int | None = Field(default=None, ge=1, le=10_000_000, description="Optimizer steps (default 100).")
    tokens: int | None = Field(default=None, ge=1, description="Instead of steps: the tokens to train on.")
    lr: float | None = Field(default=None, gt=0, description="Default: 1e-3 for adapters alone, 1e-4 otherwise.")
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, ge=1, le=65536)
    window: int = Field(default=128, ge=2, le=1_000_000, description="Tokens per training sequence.")
    max_tokens: int = Field(default=65536, ge=4, description="Use the first N tokens of each text.")
    held_out: float = Field(default=0.1, gt=0, lt=1, description="Share of each text's windows held out to score.")
    seed: int = 0
    device: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(default=50, ge=1, description="Steps between checkpoints --resume continues from.")

    keeps_storage = True

    @field_validator("data", "train", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("train")
    @classmethod
    def _once_each(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _budget(self) -> HealStep:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give either 'steps' or 'tokens' (a token budget), not both")
        if self.train is not None and "all" in self.train and len(self.train) > 1:
            raise ValueError("train: all already trains every parameter; give it alone")
        return self

    def placement_error(self, index: int, steps: list[StepModel], plan_model: str | None) -> str | None:
        quantizing = [s.op for s in steps[:index] if s.op in ("bits", "ptqtp")]
        if self.adapter.write == "peft" and index < len(steps) - 1:
            return (f"step {index}: heal with adapter.write: peft must be the last step (the adapter names the modules "
                    "of the model as it is then); use write: merged to keep editing after it")
        if quantizing:
            return (f"step {index}: heal after {quantizing[0]} would move the quantized weights off their grid; put "
                    f"heal before {quantizing[0]}")
        merging = [s.op for s in steps[:index] if hasattr(s, "models")]
        if merging and self.teacher is None:
            return (f"step {index}: heal after {merging[0]} needs 'teacher:' (the plan starts from the merge's base, and "
                    "distilling toward it would undo the merge): name the model to distil toward")
        return None

    def schedule(self, parts: list[str]) -> Schedule:
        """The schedule, for `parts` trained: new zero-started adapters take LoRA's usual 1e-3; weights that
        already hold the model (shared layers, SVD factors, all) take 1e-4, since Adam's steps are about lr
        in size even where the gradient is noise (a full-rank tie, already exact, would be pushed off)."""
        steps = self.steps or (math.ceil(self.tokens / (self.batch_size * self.window)) if self.tokens else 100)
        lr = self.lr if self.lr is not None else (1e-3 if parts == ["adapter"] else 1e-4)
        return Schedule(steps=steps, lr=lr, warmup_steps=min(self.warmup_steps, steps), weight_decay=self.weight_decay,
                        batch_size=self.batch_size, window=self.window, loss=self.loss, top_k=self.top_k, seed=self.seed,
                        checkpoint_every=self.checkpoint_every, eval_every=max(1, steps // 5),
                        gradient_checkpointing=self.gradient_checkpointing)


def heal(step: HealStep, view: ModelView, context: OpContext) -> ModelView:
    compact = view.storage is not None and is_compact(view.storage.config)
    if view.storage is not None and not compact:
        raise SurgeryError(f"heal: cannot train {view.storage.description or 'a model in a storage format'}; put heal "
                           "before the step that writes it")
    parts = step.train or _default_parts(view, compact)
    _check_parts(parts, view, compact)
    device = resolve_device(step.device if context.device == "auto" else context.device)
    check_device_name(device)
    teacher = _teacher_path(step, view, context)
    if "adapter" in parts:
        adapter_targets(view, step.adapter)
    _check_names(view, compact)
    texts = [_text(context.data_path(spec)) for spec in step.data]
    written, config = view.written_tensors(), view.written_config()
    key = {"step": step.model_dump(mode="json"), "device": device, "parts": parts, "config": config,
           "tensors": {n: [r.dtype, list(r.shape), r.describe()] for n, r in written.items()},
           "sources": {str(p): folder_stamp(p) for p in _stored_folders(written.values())},
           "teacher": folder_stamp(teacher), "texts": [text_digest(t) for t in texts]}
    folder = fit_folder("heal", key)
    header = _healed(folder)
    if header is None:
        if compact or parts != ["adapter"]:
            context.refuse_cap("heal", f"training {', '.join(parts)} holds those weights whole on the device (under a "
                                       "cap only adapters train: train: [adapter])")
        _fit(step, parts, view, compact, teacher, texts, device, folder, context)
        header = _healed(folder)
        if header is None:
            raise SurgeryError(f"heal: {folder / HEALED_FILE} vanished while the plan ran; run it again")
    else:
        context.log(f"heal: the same training ran before; reusing what it trained ({folder})")
    record = json.loads(header.metadata["record"])
    context.fits.append({"heal": record})
    if "adapter_config" in header.metadata:  # a PEFT adapter beside the model, which stays as it was
        adapter = {PEFT_CONFIG: header.metadata["adapter_config"], PEFT_WEIGHTS: (folder / PEFT_WEIGHTS).read_bytes()}
        return replace(view, extra_files={**view.extra_files, **adapter})
    healed = {name: TensorRecipe.copy_of(info) for name, info in header.tensors.items()}
    return _with_healed(view, healed, compact)


def _check_names(view: ModelView, compact: bool) -> None:
    """Refused before anything runs: a model whose parameters transformers names unlike the checkpoint's tensors
    (it renames some architectures' keys when loading), since the trained tensors could not be written back.
    Checked on the module transformers builds from the config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.evaluation.models import quiet_transformers

    with quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**view.config()))
    written = view.written_tensors() if compact else view.tensors()
    prefix = view.layout.prefix + "."
    _refuse_renamed([n for n, _ in model.named_parameters() if not (compact and n.startswith(prefix))], written)


def _refuse_renamed(names: list[str], written: dict[str, TensorRecipe]) -> None:
    stray = sorted(n for n in names if n not in written)
    if stray:
        raise SurgeryError(f"heal: transformers names a parameter {stray[0]!r} that the checkpoint does not store under "
                           "that name (it renames this architecture's tensors when loading); heal cannot write it back")


def _default_parts(view: ModelView, compact: bool) -> list[str]:
    if not compact:
        return ["adapter"]
    assert view.storage is not None
    return ["relaxation", "shared"] if spec_of(view.storage.config[SECTION]).ranks else ["shared"]


def _check_parts(parts: list[str], view: ModelView, compact: bool) -> None:
    for part in parts:
        if part in ("relaxation", "shared") and not compact:
            raise SurgeryError(f"heal: train: {part} trains a compact recursive model (tie with format: compact just "
                               "before heal); this model is standard: use adapter or all")
        if part == "adapter" and compact:
            raise SurgeryError("heal: train: adapter adds LoRA to a standard model; a compact recursive model has its "
                               "own per-depth LoRA: use relaxation")
    if "relaxation" in parts:
        assert view.storage is not None
        if not spec_of(view.storage.config[SECTION]).ranks:
            raise SurgeryError("heal: train: relaxation needs per-depth LoRA, and this tie has none (add relax: to the "
                               "tie step, or train: shared)")


def _teacher_path(step: HealStep, view: ModelView, context: OpContext) -> Path:
    ref = step.teacher or context.start_ref
    teacher = context.open_model(ref) if ref is not None else view
    return teacher.source.path


def _text(spec: str) -> str:
    from surgery.evaluation.data import load_text

    return load_text(spec).text


def _stored_folders(recipes: Any) -> set[Path]:
    folders: set[Path] = set()
    pending = list(recipes)
    while pending:
        recipe = pending.pop()
        if recipe.stored is not None:
            folders.add(recipe.stored.file.parent)
        pending.extend(recipe.inputs)
    return folders


def _healed(folder: Path) -> ShardHeader | None:
    """The header of a finished heal's file (trained tensors and their record), None when there is none."""
    path = folder / HEALED_FILE
    if not path.is_file():
        return None
    try:
        header = read_shard_header(path)
        json.loads(header.metadata["record"])
        if "adapter_config" in header.metadata and not (folder / PEFT_WEIGHTS).is_file():
            raise KeyError(PEFT_WEIGHTS)
        return header
    except (SurgeryError, KeyError, ValueError, TypeError, AttributeError):
        path.unlink(missing_ok=True)
        return None


def _fit(step: HealStep, parts: list[str], view: ModelView, compact: bool, teacher: Path, texts: list[str],
         device: str, folder: Path, context: OpContext) -> None:
    """Teacher targets (kept for --resume), then the student trained, then the trained tensors under their
    stored names and dtypes in `folder / HEALED_FILE`. What a failed run leaves is removed, but for an
    interrupted one's teacher targets and checkpoint (what --resume continues from)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _train_and_store(step, parts, view, compact, teacher, texts, device, folder, context)
    except KeyboardInterrupt:
        shutil.rmtree(folder / "student", ignore_errors=True)
        kept = "its teacher scores are kept" if (folder / TEACHER_FILE).is_file() else "nothing was kept"
        raise Interrupted(f"heal: interrupted before training began; {kept} in {folder}: run the same command "
                          "again to continue") from None
    except Interrupted:  # while training: its checkpoint stays for --resume
        shutil.rmtree(folder / "student", ignore_errors=True)
        raise
    except SurgeryError:  # refused (bad input, diverged): nothing of it is worth keeping
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except BaseException:
        if (folder / CHECKPOINT_FILE).is_file():  # stopped while training: --resume continues from its checkpoint
            shutil.rmtree(folder / "student", ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        for name in ("student", TEACHER_FILE, CHECKPOINT_FILE) if (folder / HEALED_FILE).is_file() else ():
            path = folder / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _train_and_store(step: HealStep, parts: list[str], view: ModelView, compact: bool, teacher: Path,
                     texts: list[str], device: str, folder: Path, context: OpContext) -> None:
    import torch

    from surgery.evaluation.data import first_tokens
    from surgery.evaluation.loading import load_for_eval

    schedule = step.schedule(parts)
    if context.max_memory is not None:  # each layer's weights brought in again for its backward, not kept
        schedule = replace(schedule, gradient_checkpointing=True)
    started = time.perf_counter()
    loaded = load_for_eval(teacher, device, "float32", context.max_memory)
    ids = [first_tokens(loaded.tokenizer, text, step.max_tokens) for text in texts]
    _check_vocabulary(view, loaded, teacher, ids, texts, step)
    windows = cut_windows(ids, schedule.window, step.held_out, step.data)
    targets_path = folder / TEACHER_FILE
    targets = _load_targets(targets_path, len(windows.train) + len(windows.held_out))
    if targets is None:
        context.log(f"heal: the teacher ({teacher.name}) scores {windows.train.numel() + windows.held_out.numel():,} "
                    f"tokens on {loaded.placement()}, keeping its top {schedule.top_k} log-probabilities per token")
        targets = teacher_targets(loaded.model, torch.cat([windows.train, windows.held_out]), schedule.top_k,
                                  schedule.batch_size, loaded.device)
        _save(targets_path, targets, {})
    del loaded  # the student loads only now: teacher and student are never in memory together
    gc.collect()
    split = len(windows.train)
    train_targets = {k: v[:split] for k, v in targets.items()}
    held_targets = {k: v[split:] for k, v in targets.items()}
    student = _student(view, compact, parts, step, device, folder, context.max_memory)
    count = sum(p.numel() for p in student.trainable.values())
    capped = "" if context.max_memory is None else ", under the memory cap (each layer read in again for its backward)"
    context.log(f"heal: training {', '.join(parts)} ({count:,} parameters) for {schedule.steps} steps of "
                f"{schedule.batch_size} x {schedule.window} tokens on {device}{capped}")
    history = train(student, windows, train_targets, held_targets, schedule, device, folder, context.resume,
                    context.log)
    diverged = sorted(n for n, p in student.trainable.items() if not bool(p.detach().isfinite().all()))
    if diverged:
        raise SurgeryError(f"heal: training diverged ({diverged[0]} holds inf or NaN after {schedule.steps} steps); "
                           "nothing is written: lower lr")
    peft = step.adapter.write == "peft" and "adapter" in parts
    tensors = {} if peft else _trained_tensors(student, view.written_tensors())
    teacher_ppl = math.exp(float(held_targets["nll"].sum()) / windows.held_out[:, 1:].numel())
    record = _record(step, parts, schedule, windows, history, teacher_ppl, count, device,
                     time.perf_counter() - started)
    record |= {"teacher": str(teacher), **({"top_k": int(targets["index"].shape[-1])} if step.loss == "kl" else {})}
    before, after = record["held_out"]["before"]["kl"], record["held_out"]["after"]["kl"]
    if after > before:
        context.log(f"heal: warning: the held-out KL rose from {before:.4g} to {after:.4g}; the model was closer to the "
                    "teacher before training (try a lower lr or fewer steps)")
    metadata = {"record": json.dumps(record)}
    if peft:
        weights, metadata["adapter_config"] = peft_adapter(student, step.adapter)
        _save(folder / PEFT_WEIGHTS, weights, {"format": "pt"})
    _save(folder / HEALED_FILE, tensors, metadata)


def _check_vocabulary(view: ModelView, teacher: Any, teacher_path: Path, ids: list[list[int]], texts: list[str],
                      step: HealStep) -> None:
    """Before the teacher runs: both models predict the same vocabulary, the text's ids fit it, and the edited
    model's own tokenizer reads the text as the teacher's does (distillation compares them token by token)."""
    from transformers import AutoConfig, AutoTokenizer

    from surgery.evaluation.data import first_tokens
    from surgery.evaluation.models import quiet_transformers

    if view.tokenizer_files is not None:
        raise SurgeryError("heal: an earlier step changed the tokenizer; heal the model before changing its vocabulary")
    rows = teacher.model.get_output_embeddings().weight.shape[0]
    vocab = AutoConfig.for_model(**view.config()).get_text_config().vocab_size
    if vocab != rows:
        raise SurgeryError(f"heal: the edited model's vocabulary ({vocab} tokens) differs from the teacher's "
                           f"({rows}); distillation compares their next-token distributions token by token")
    for name, tokens in zip(step.data, ids):
        if tokens and max(tokens) >= rows:
            raise SurgeryError(f"heal: the teacher's tokenizer gives id {max(tokens)} on {name}, beyond its "
                               f"vocabulary of {rows}; give a teacher whose tokenizer and model agree")
    if teacher_path != view.source.path:
        with quiet_transformers():
            own = AutoTokenizer.from_pretrained(view.source.path)
        for name, text, tokens in zip(step.data, texts, ids):
            if first_tokens(own, text, step.max_tokens) != tokens:
                raise SurgeryError(f"heal: the teacher {teacher_path} tokenizes {name} unlike the edited model "
                                   f"({view.source.path}); distillation needs one tokenizer")


def _load_targets(path: Path, windows: int) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    try:
        targets = load_file(path)
        return targets if {"top", "index", "rest", "nll"} <= targets.keys() and len(targets["nll"]) == windows else None
    except (OSError, ValueError, RuntimeError):
        return None


def _save(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    save_fit_tensors(path, tensors, metadata, "heal: cannot write", "the model")


def _student(view: ModelView, compact: bool, parts: list[str], step: HealStep, device: str, folder: Path,
             max_memory: int | None = None) -> Student:
    """The edited model as written (its tensors made and rounded to their dtypes, in the format it is
    written in), loaded as a float32 module (at most `max_memory` bytes of it on the device) with only
    the parts to train requiring gradients."""
    import torch

    from surgery.evaluation.loading import load_model
    from surgery.evaluation.models import quiet_transformers
    from surgery.evaluation.recursive_model import stored_parameters
    from surgery.recipe.stream import RecipeStreamer

    written = view.written_tensors()
    place = folder / "student"
    place.mkdir(exist_ok=True)
    streamer = RecipeStreamer()
    try:
        values = {name: streamer.whole(r).to(torch_dtype(r.dtype)) for name, r in written.items()}
    finally:
        streamer.close()
    _save(place / "model.safetensors", values, {"format": "pt"})
    del values
    (place / "config.json").write_text(json.dumps(view.written_config()))
    with quiet_transformers():
        model = load_model(place, device, torch.float32, max_memory)
    model.requires_grad_(False)
    if compact:
        assert view.storage is not None
        spec = spec_of(view.storage.config[SECTION])
        by_name = stored_parameters(model, spec)
    else:
        by_name = dict(model.named_parameters())
    _refuse_renamed(list(by_name), written)
    trainable: dict[str, Any] = {}
    if "all" in parts:
        trainable = {n: p for n, p in by_name.items() if written[n].dtype in FLOAT_DTYPES}
    if "relaxation" in parts:
        trainable |= {n: by_name[n] for d in range(len(spec.loop_map)) for s in spec.ranks for n in lora_names(d, s)}
    if "shared" in parts:
        layer_prefix = spec.layer_prefix + "."
        trainable |= {n: p for n, p in by_name.items() if n.startswith((layer_prefix, "depths."))
                      and ".lora_" not in n and written[n].dtype in FLOAT_DTYPES}
    student = Student(model, trainable)
    if "adapter" in parts:
        _add_adapters(student, view, step.adapter, step.seed, device)
    for param in student.trainable.values():
        param.requires_grad_(True)
    return student


def adapter_targets(view: ModelView, settings: AdapterSettings) -> dict[int, list[str]]:
    """Each adapted layer's matrices by suffix, checked against the view (before anything runs)."""
    chosen = settings.layers if settings.layers is not None else list(range(len(view.layers)))
    outside = [i for i in chosen if i >= len(view.layers)]
    if outside:
        raise SurgeryError(f"heal: adapter layer {outside[0]} does not exist (the edited model has {len(view.layers)})")
    return {index: _adapted(view.layers[index], settings.modules) for index in chosen}


def _add_adapters(student: Student, view: ModelView, settings: AdapterSettings, seed: int, device: str) -> None:
    """LoRA on the chosen matrices: the factor the input meets drawn as PEFT draws it (kaiming-uniform,
    bound 1/sqrt(fan-in)), the other zero, so the adapted model starts as the edited one."""
    import torch

    from surgery.evaluation.models import layer_modules
    from surgery.evaluation.recursive_model import add_low_rank

    layers = layer_modules(student.model, view.layout.prefix, len(view.layers))
    generator = torch.Generator().manual_seed(seed)
    scale = settings.alpha / settings.rank
    for index, suffixes in adapter_targets(view, settings).items():
        for suffix in suffixes:
            module = layers[index].get_submodule(suffix.removesuffix(".weight"))
            conv1d = type(module).__name__ == "Conv1D"
            rows, cols = module.weight.shape
            rank = min(settings.rank, rows, cols)
            fan_in = rows if conv1d else cols
            drawn = (torch.rand((rows, rank) if conv1d else (rank, cols), generator=generator) * 2 - 1) / math.sqrt(fan_in)
            zero = torch.zeros((rank, cols) if conv1d else (rows, rank))
            b, a = (drawn, zero) if conv1d else (zero, drawn)
            b, a = torch.nn.Parameter(b.to(device)), torch.nn.Parameter(a.to(device))
            add_low_rank(module, b, a, scale)
            name = view.layout.layer_name(index, suffix)
            student.adapters[name] = (ParameterSlot(module, "weight"), b, a, scale)
            student.trainable[f"{name}:lora_B"], student.trainable[f"{name}:lora_A"] = b, a


def _adapted(layer: Layer, modules: list[str] | None) -> list[str]:
    matrices = {s: r for s, r in layer.matrices().items() if not is_expert(s) and not is_router(s) and s.endswith(".weight")}
    if modules is None:
        return sorted(matrices)
    chosen = []
    for module in modules:
        matched = sorted(s for s in matrices if f".{module}." in f".{s}")
        if not matched:
            names = sorted({s.removesuffix(".weight").split(".")[-1] for s in matrices})
            raise SurgeryError(f"heal: adapter module {module!r} matches no linear matrix of the layers; there: "
                               f"{', '.join(names)}")
        chosen += [s for s in matched if s not in chosen]
    return chosen


def _trained_tensors(student: Student, written: dict[str, TensorRecipe]) -> dict[str, Any]:
    """What heal writes, by stored name in the stored dtype: each trained tensor, and each adapted weight
    with its adapter merged (weight + scale B A, in float32, then rounded once)."""
    import torch

    out = {}
    with torch.no_grad():
        for name, param in student.trainable.items():
            if name in written:
                out[name] = param.detach().cpu().to(torch_dtype(written[name].dtype))
        for name, (weight, b, a, scale) in student.adapters.items():
            out[name] = (weight.read() + scale * (b @ a)).cpu().to(torch_dtype(written[name].dtype))
    return out


def peft_adapter(student: Student, settings: AdapterSettings) -> tuple[dict[str, Any], str]:
    """The adapters as PEFT writes a LoRA adapter: `base_model.model.{module}.lora_A.weight` (r x in) and
    `lora_B.weight` (out x r), scaling lora_alpha / r (a rank capped below `rank` gets its own r and alpha in
    rank_pattern and alpha_pattern, so every module keeps the scale it trained with)."""
    weights, modules, rank_pattern, alpha_pattern, conv1d = {}, [], {}, {}, False
    for name, (weight, b, a, scale) in student.adapters.items():
        module = name.removesuffix(".weight")
        is_conv1d = _is_conv1d(student, module)
        conv1d |= is_conv1d
        lora_a, lora_b = (b.T, a.T) if is_conv1d else (a, b)  # PEFT keeps (r, in) and (out, r) for both
        weights[f"base_model.model.{module}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
        weights[f"base_model.model.{module}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
        modules.append(module)
        rank = lora_a.shape[0]
        if rank != settings.rank:
            rank_pattern[module], alpha_pattern[module] = rank, scale * rank
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
              "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": conv1d,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "base_model_name_or_path": None,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
    return weights, json.dumps(config, indent=2)


def _is_conv1d(student: Student, module: str) -> bool:
    return type(student.model.get_submodule(module)).__name__ == "Conv1D"


def _record(step: HealStep, parts: list[str], schedule: Schedule, windows: Windows, history: dict[str, Any],
            teacher_ppl: float, count: int, device: str, seconds: float) -> dict[str, Any]:
    held = history["held_out"]
    return {
        "trained": parts, "parameters": count, "loss": schedule.loss,
        "schedule": {"optimizer": "AdamW", "lr": schedule.lr, "warmup_steps": schedule.warmup_steps,
                     "decay": "cosine to 0", "weight_decay": schedule.weight_decay, "grad_clip": 1.0,
                     "steps": schedule.steps, "batch_size": schedule.batch_size, "window": schedule.window,
                     "seed": schedule.seed},
        **({"adapter": step.adapter.model_dump(mode="json")} if "adapter" in parts else {}),
        "tokens": {"trained": schedule.steps * schedule.batch_size * schedule.window,
                   "train_text": int(windows.train.numel()), "held_out_text": int(windows.held_out.numel())},
        "held_out": {"before": {k: held[0][k] for k in ("kl", "perplexity")},
                     "after": {k: held[-1][k] for k in ("kl", "perplexity")}, "teacher_perplexity": teacher_ppl},
        "history": history, "device": device, "seconds": round(seconds, 1),
    }


def _with_healed(view: ModelView, healed: dict[str, TensorRecipe], compact: bool) -> ModelView:
    """The view with the healed tensors in place of those they replace; a compact model's depths rebuilt
    from its healed stored tensors, so later views and checks see what is written."""
    if not compact:
        return view.map_tensors(lambda name, recipe: healed.get(name, recipe), label="healed")
    assert view.storage is not None
    stored = {name: healed.get(name, recipe) for name, recipe in view.storage.tensors.items()}
    spec = spec_of(view.storage.config[SECTION])
    outside, depths = depth_layers(spec, view.storage.config["base_config"], stored, view.label, view.source.path)
    layers = [Layer(tensors=new.tensors, config=old.config, origin=old.origin.edited("healed"))
              for old, new in zip(view.layers, depths)]
    return replace(view, outside=outside, layers=tuple(layers), storage=replace(view.storage, tensors=stored))


def describe(step: HealStep) -> str:
    parts = ", ".join(step.train) if step.train else "the default parts"
    loss = "KL to the teacher's next-token distribution" if step.loss == "kl" else "the next-token loss"
    budget = f"{step.tokens:,} tokens" if step.tokens else f"{step.steps or 100} steps"
    return f"Healed by training {parts} on {', '.join(step.data)} ({loss}, {budget}) (`heal`)."


OP = Op("heal", HealStep, heal, describe,
        'Bae et al. 2024 (uptraining relaxed recursive models); Gromov et al. 2024, "The Unreasonable '
        'Ineffectiveness of the Deeper Layers" (healing pruned models)',
        {"op": "heal", "data": "builtin:mixed-dev", "steps": 20})
