"""`bits`: layer-wise bit assignment (Dumitru et al. 2024, "Layer-Wise Quantization").

Layers are ranked by a measured importance score (LIM, ZD or BI, from surgery/evaluation/importance.py),
and the least important get the low width. The per-layer map, the scores and the average bits
go to surgery.json. Each layer's matrices are then quantized by RTN with per-group scales:
- `dense`: dequantized back to the source dtype, an exact simulation for scoring;
- `compressed-tensors`: packed integers and a `quantization_config` that transformers (with the
  compressed-tensors package) and vLLM load; symmetric only, see `_check_supported`.
Beside either, `llama-tensor-types.txt` gives llama-quantize the same assignment (`surgery gguf` applies it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, model_validator

from surgery.checkpoint.modules import is_expert, is_router
from surgery.compute.gptq import GptqSettings
from surgery.compute.quantize import Constant, FromIntegers, Part, Rtn
from surgery.errors import SurgeryError
from surgery.evaluation import importance
from surgery.formats.compressed_tensors import PACKED_BITS, quantization_config, runtime_warnings
from surgery.formats.gguf import TENSOR_TYPES_FILE, Matrix, tensor_types_file
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel, Strict
from surgery.ops.fit_memo import finite_numbers, folder_stamp, remembered, text_digest
from surgery.ops.gptq_layers import LayerPlan, gptq_layers
from surgery.ops.registry import Op
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import Layer, ModelView, Storage

KEEP_BITS = 16  # a layer given 16 bits (a manual override) stays in the source dtype
QUANTIZABLE_DTYPES = ("F32", "F16", "BF16")  # FP8 weights are already quantized


class Calibration(Strict):
    """Text the model runs on for scores that need activations (LIM, BI)."""

    data: str = Field(default="builtin", description="builtin, builtin:NAME, or a .txt/.jsonl file.")
    samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=256, ge=2)


class BitAssignment(Strict):
    """Either two widths and the fraction of layers given the low one, or a target average over choices."""

    high: int | None = Field(default=None, ge=1, le=16)
    low: int | None = Field(default=None, ge=1, le=16)
    low_fraction: float | None = Field(default=None, ge=0, le=1)
    target_bits: float | None = Field(default=None, gt=0)
    choices: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> BitAssignment:
        pair = (self.high, self.low, self.low_fraction)
        target = (self.target_bits, self.choices)
        if all(v is not None for v in pair) and all(v is None for v in target):
            if self.low > self.high:  # type: ignore[operator]
                raise ValueError(f"low ({self.low}) is wider than high ({self.high}): the important layers would get "
                                 "fewer bits; swap them")
            return self
        if all(v is not None for v in target) and all(v is None for v in pair):
            return self
        raise ValueError("give {high, low, low_fraction} or {target_bits, choices}")


GPTQ_SETTINGS = ("act_order", "dampening", "block_size", "token_importance")


class Quantizer(Strict):
    """How each matrix is rounded to its width: RTN, or GPTQ on calibration text; per-group scales either way.
    GPTQ's own settings stay None for RTN (GPTQ's defaults: no act order, dampening 0.01, blocks of 128)."""

    method: Literal["rtn", "gptq"] = "rtn"
    group_size: int = Field(default=128, ge=1)
    symmetric: bool = False
    act_order: bool | None = Field(default=None, description="GPTQ: round the inputs with the largest Hessian "
                                   "diagonal first [false].")
    dampening: float | None = Field(default=None, ge=0, description="GPTQ: added to the Hessian's diagonal, times "
                                    "its mean [0.01].")
    block_size: int | None = Field(default=None, ge=1, description="GPTQ: columns per lazy batch update, for speed "
                                   "only [128].")
    token_importance: Literal["uniform", "attention"] | None = Field(
        default=None, description="GPTQ: weigh each token's input by the attention it receives (RSQ) [uniform].")

    @model_validator(mode="after")
    def _gptq_settings(self) -> Quantizer:
        given = [name for name in GPTQ_SETTINGS if getattr(self, name) is not None]
        if self.method != "gptq" and given:
            raise ValueError(f"{given[0]} is a GPTQ setting; add method: gptq, or leave it out")
        return self

    def gptq_settings(self) -> GptqSettings:
        chosen = {name: getattr(self, name) for name in GPTQ_SETTINGS if getattr(self, name) is not None}
        return GptqSettings(self.group_size, self.symmetric, **chosen)


class BitsStep(StepModel):
    """Layer-wise bit assignment (Dumitru et al. 2024): important layers keep more bits."""

    op: Literal["bits"]
    width: int | None = Field(default=None, ge=1, le=16, description="Every layer at this width: no scores, no assign.")
    score: Literal["lim", "zd", "bi", "kl", "manual"] | None = Field(default=None,
                                                                     description="lim unless width is given.")
    calibration: Calibration = Calibration()
    assign: BitAssignment | None = None
    manual: dict[int, int] | None = Field(default=None, description="Bits by layer; overrides the assignment.")
    quantizer: Quantizer = Quantizer()
    keep: list[str] = Field(default_factory=lambda: ["embed", "lm_head", "norms"],
                            description="Tensors left in the source dtype, by name part; norms: every 1-D tensor.")
    format: Literal["dense", "compressed-tensors"] = "dense"

    @model_validator(mode="before")
    @classmethod
    def _ranked_by_lim(cls, data: Any) -> Any:
        """Layers are ranked by LIM unless the step says otherwise or gives every layer one width."""
        if isinstance(data, dict) and data.get("width") is None and data.get("score") is None:
            return {**data, "score": "lim"}
        return data

    @model_validator(mode="after")
    def _assignment(self) -> BitsStep:
        if self.width is not None:
            if self.assign is not None or self.score is not None:
                raise ValueError("width gives every layer one width; leave out score and assign "
                                 "(manual still overrides single layers)")
            return self
        if self.score != "manual" and self.assign is None:
            raise ValueError(f"score: {self.score} ranks layers for an 'assign' section; add one, e.g. "
                             "{high: 8, low: 4, low_fraction: 0.5}")
        if self.score == "manual" and not self.manual:
            raise ValueError("score: manual needs 'manual': the bits of every layer, e.g. {0: 8, 1: 4}")
        return self

    def storage_format(self) -> tuple[str, str] | None:
        return ("compressed-tensors", "dense") if self.format == "compressed-tensors" else None


def bits(step: BitsStep, view: ModelView, context: OpContext) -> ModelView:
    _check_unedited(view)
    calibration = step.calibration.model_copy(update={"data": context.data_path(step.calibration.data)})
    step = step.model_copy(update={"calibration": calibration})  # its text file relative to the plan's folder
    depths = len(view.layers)
    targets = [quantized_tensors(layer, step.keep) for layer in view.layers]  # dense and MoE layers differ
    transposed = experts_layout(view, targets)
    _check_quantizer(step, view, targets, transposed)
    fit: dict[str, Any] = {"score": step.score}
    if step.score == "kl":
        assert step.assign is not None
        check_reachable(step.assign)  # before measuring
        costs = measured_costs(step, view, targets, transposed, context)
        fit["costs"] = {str(w): c for w, c in costs.items()}
        scores = costs[min(costs)]  # what the lowest width costs each layer: higher, more important
        widths = assign_bits(step.assign, scores, depths, step.manual or {}) if step.assign.low is not None \
            else cheapest_widths(costs, step.assign.target_bits, step.manual or {})
    else:
        scores = None if step.width is not None else layer_scores(step, view, context)
        widths = assign_bits(step.assign, scores, depths, step.manual or {}, step.width)
    _check_widths(step, widths, targets)
    average = sum(widths) / depths
    fit |= {"scores": scores, "bits": widths, "average_bits": average}
    context.fits.append(fit)
    part = quantized_parts(step, view, targets, widths, transposed, fit, context)
    context.log(f"bits: {', '.join(f'{i}:{b}' for i, b in enumerate(widths))} (average {average:.3g})")
    layers = []
    for depth, (layer, width) in enumerate(zip(view.layers, widths)):
        tensors = dict(layer.tensors)
        for suffix in targets[depth] if width < KEEP_BITS else []:
            tensors[suffix] = part(depth, suffix, "dense")
        label = f"{width}-bit" if width < KEEP_BITS and targets[depth] else "kept"
        layers.append(Layer(tensors=tensors, config=layer.config, origin=layer.origin.edited(label)))
    matrices = [{s: Matrix(input_size(r.shape, transposed.get(s, False)), r.dtype, s in suffixes and width < KEEP_BITS)
                 for s, r in {**layer.matrices(), **{s: layer.tensors[s] for s in suffixes}}.items()}
                for layer, suffixes, width in zip(view.layers, targets, widths)]
    file = tensor_types_file(matrices, widths, step.quantizer.symmetric)
    fit["quantized_weights"] = [sum(math.prod(layer.tensors[s].shape) for s in suffixes) if width < KEEP_BITS else 0
                                for layer, suffixes, width in zip(view.layers, targets, widths)]
    fit["llama_cpp"] = {"tensor_types_sha256": text_digest(file.text), "unfit": file.unfit}
    if file.fallbacks:
        context.log(f"bits: {TENSOR_TYPES_FILE}: {len(file.fallbacks)} tensors' rows do not divide by 256, llama.cpp's "
                    f"k-quant block: they get 32-block types ({file.fallbacks[0]}{', ...' if len(file.fallbacks) > 1 else ''})")
    if file.unfit:
        context.log(f"bits: {TENSOR_TYPES_FILE}: {len(file.unfit)} quantized tensors fit no llama.cpp type (blocks of 32 "
                    f"or 256 weights per row), so `surgery gguf` refuses this output ({file.unfit[0]}"
                    f"{', ...' if len(file.unfit) > 1 else ''})")
    dense = replace(view.with_layers(layers), extra_files={TENSOR_TYPES_FILE: file.text})
    if step.format == "dense":
        return dense
    stored: dict[str, TensorRecipe] = dict(view.outside)
    groups: dict[int, list[str]] = {}
    for depth, (layer, width) in enumerate(zip(view.layers, widths)):
        for suffix, recipe in layer.tensors.items():
            name = view.layout.layer_name(depth, suffix)
            if suffix not in targets[depth] or width >= KEEP_BITS:
                stored[name] = recipe
                continue
            module = name.removesuffix(".weight")
            groups.setdefault(width, []).append(module)
            out, columns = recipe.shape
            stored[f"{module}.weight_packed"] = part(depth, suffix, "packed")
            stored[f"{module}.weight_scale"] = part(depth, suffix, "scale")
            stored[f"{module}.weight_shape"] = TensorRecipe.computed("I64", (2,), (), Constant((out, columns)))
    ignore = [name.removesuffix(".weight") for name, r in view.tensors().items()
              if len(r.shape) == 2 and name.removesuffix(".weight") not in {m for ms in groups.values() for m in ms}]
    for line in runtime_warnings(set(groups)):
        context.log(f"bits: warning: format compressed-tensors: {line}")
    q = step.quantizer
    config = dense.config() | {"quantization_config": quantization_config(groups, q.group_size, q.symmetric, ignore)}
    return replace(dense, storage=Storage(stored, config))


QuantizedPart = Callable[[int, str, Part], TensorRecipe]


def quantized_parts(step: BitsStep, view: ModelView, targets: list[list[str]], widths: list[int],
                    transposed: dict[str, bool], fit: dict[str, Any], context: OpContext) -> QuantizedPart:
    """The recipe of one part (dense weight, packed words, scales) of a quantized tensor, by layer and suffix:
    RTN computes it from the weight as it streams; GPTQ calibrates first (its figures go to `fit`) and reads
    the integers it stored."""
    q = step.quantizer
    if q.method == "rtn":
        def rtn_part(depth: int, suffix: str, part: Part) -> TensorRecipe:
            recipe = view.layers[depth].tensors[suffix]
            rtn = Rtn(widths[depth], q.group_size, q.symmetric, recipe.dtype, part, transposed.get(suffix, False))
            return TensorRecipe.computed(*_part_kind(recipe, part, widths[depth], q.group_size), (recipe,), rtn)
        return rtn_part
    plans = [LayerPlan(tuple(suffixes), tuple(view.layers[d].tensors[s].dtype for s in suffixes), width)
             if width < KEEP_BITS and suffixes else None for d, (suffixes, width) in enumerate(zip(targets, widths))]
    stored, fit["gptq"] = gptq_layers(q.gptq_settings(), step.calibration, view, plans, context)

    def gptq_part(depth: int, suffix: str, part: Part) -> TensorRecipe:
        recipe, (values, scale, zero) = view.layers[depth].tensors[suffix], stored[depth][suffix]
        if part == "scale":
            return scale
        return TensorRecipe.computed(*_part_kind(recipe, part, widths[depth], q.group_size), (values, scale, zero),
                                     FromIntegers("GPTQ", widths[depth], recipe.dtype, part))
    return gptq_part


def _part_kind(recipe: TensorRecipe, part: Part, width: int, group_size: int) -> tuple[str, tuple[int, ...]]:
    """The dtype and shape of one stored part of a quantized 2-D weight (the dense part keeps any shape)."""
    if part == "dense":
        return recipe.dtype, recipe.shape
    out, columns = recipe.shape
    return ("I32", (out, columns * width // 32)) if part == "packed" else (recipe.dtype, (out, columns // group_size))


def layer_scores(step: BitsStep, view: ModelView, context: OpContext) -> list[float] | None:
    """Importance per layer (higher: more important), measured as the step says; None when manual."""
    if step.score == "manual":
        return None
    if step.score == "zd":
        return importance.zero_deviations(view)
    from surgery.devices import resolve_device
    from surgery.evaluation.data import load_text

    key = {"calibration": step.calibration.model_dump(mode="json"), "device": resolve_device(context.device),
           "model": folder_stamp(view.source.path), "layers": len(view.layers),
           "text": text_digest(load_text(step.calibration.data).text)}
    cosines = remembered("bits", key, lambda: _cosines(step, view, context),
                         lambda value: finite_numbers(value, len(view.layers)), context.log)
    return importance.lim(cosines) if step.score == "lim" else importance.block_influence(cosines)


def _cosines(step: BitsStep, view: ModelView, context: OpContext) -> list[float]:
    from surgery.evaluation.data import load_text
    from surgery.evaluation.loading import load_for_eval
    from surgery.evaluation.models import layer_modules

    calibration = step.calibration
    loaded = load_for_eval(view.source.path, context.device, "float32", context.max_memory)
    batches = importance.calibration_batches(loaded.tokenizer, load_text(calibration.data).text, calibration.samples,
                                  calibration.seq_len, "bits.calibration")
    context.log(f"bits: scoring {len(view.layers)} layers on {batches.numel()} calibration tokens ({loaded.placement()})")
    return importance.layer_cosines(loaded.model, layer_modules(loaded.model, view.layout.prefix, len(view.layers)), batches)


def measured_costs(step: BitsStep, view: ModelView, targets: list[list[str]], transposed: dict[str, bool],
                   context: OpContext) -> dict[int, list[float]]:
    """Per width to choose from, what lowering just each layer to it costs (KL from the model as stored, on
    the calibration text; each probe rounds by RTN on the step's grid), remembered between check and apply."""
    from surgery.devices import resolve_device
    from surgery.evaluation.data import load_text

    assert step.assign is not None
    widths = [step.assign.low] if step.assign.low is not None else sorted(set(step.assign.choices or []))
    widths = [w for w in widths if w is not None and w < KEEP_BITS]
    key = {"calibration": step.calibration.model_dump(mode="json"), "device": resolve_device(context.device),
           "model": folder_stamp(view.source.path), "targets": targets, "widths": widths,
           "quantizer": [step.quantizer.group_size, step.quantizer.symmetric],
           "text": text_digest(load_text(step.calibration.data).text)}
    measured = remembered("bits-kl", key, lambda: _kl_costs(step, view, targets, transposed, widths, context),
                          lambda value: isinstance(value, dict) and value.keys() == {str(w) for w in widths}
                          and all(finite_numbers(v, len(view.layers)) for v in value.values()), context.log)
    return {int(w): c for w, c in measured.items()} | {w: [0.0] * len(view.layers) for w in
                                                       (step.assign.choices or []) if w >= KEEP_BITS}


def _kl_costs(step: BitsStep, view: ModelView, targets: list[list[str]], transposed: dict[str, bool],
              widths: list[int], context: OpContext) -> dict[str, list[float]]:
    from surgery.evaluation.data import load_text
    from surgery.evaluation.loading import load_for_eval
    from surgery.evaluation.models import layer_modules
    from surgery.evaluation.sensitivity import layer_costs

    q, calibration = step.quantizer, step.calibration
    loaded = load_for_eval(view.source.path, context.device, "float32", context.max_memory)
    layers = layer_modules(loaded.model, view.layout.prefix, len(view.layers))
    matrices = [{s: _parameter(layers[i], s) for s in suffixes} for i, suffixes in enumerate(targets)]
    dtypes = {s: view.layers[i].tensors[s].dtype for i, suffixes in enumerate(targets) for s in suffixes}
    rows = importance.calibration_batches(loaded.tokenizer, load_text(calibration.data).text, calibration.samples,
                                          calibration.seq_len, "bits.calibration")
    context.log(f"bits: measuring what {len(widths)} width(s) cost each of {len(view.layers)} layers on "
                f"{rows.numel()} calibration tokens ({loaded.placement()})")

    def rounded(suffix: str, weight: Any, width: int) -> Any:
        rtn = Rtn(width, q.group_size, q.symmetric, dtypes[suffix], transposed=transposed.get(suffix, False))
        return rtn([weight.clone()]).to(weight.dtype)

    costs = layer_costs(loaded.model, matrices, widths, rounded, rows)
    return {str(w): c for w, c in costs.items()}


def _parameter(layer: Any, suffix: str) -> Any:
    from surgery.evaluation.parameters import ParameterSlot

    try:
        layer.get_parameter(suffix)
        return ParameterSlot(layer, suffix)
    except AttributeError:
        raise SurgeryError(f"bits: score kl rounds layers of transformers' module, where {suffix} is not a "
                           "parameter (experts are fused when loaded); use score: lim, or add 'experts' to keep"
                           ) from None


def cheapest_widths(costs: dict[int, list[float]], target: float | None, manual: dict[int, int]) -> list[int]:
    """One width per layer from `costs`' keys, of least total measured cost among those whose mean is at
    most `target` (exact: dynamic programming over the total width); `manual` layers are fixed and count
    toward the mean."""
    assert target is not None
    choices = sorted(costs)
    depths = len(costs[choices[0]])
    for layer in manual:
        if not 0 <= layer < depths:
            raise SurgeryError(f"bits.manual: layer {layer} does not exist (the model has {depths}: 0-{depths - 1})")
    budget = math.floor(target * depths + 1e-9)
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}  # total width so far -> cheapest widths
    for layer in range(depths):
        options = [(manual[layer], 0.0)] if layer in manual else [(w, costs[w][layer]) for w in choices]
        reached: dict[int, tuple[float, list[int]]] = {}
        for total, (cost, widths) in best.items():
            for width, more in options:
                if total + width <= budget and (total + width not in reached
                                                or cost + more < reached[total + width][0]):
                    reached[total + width] = (cost + more, widths + [width])
        best = reached
    if not best:
        raise SurgeryError(f"bits.assign: target_bits {target:g} is below what the choices {choices} (and the "
                           "manual widths) can reach")
    return min(best.items(), key=lambda item: (item[1][0], -item[0]))[1][1]  # ties: the wider


def assign_bits(assign: BitAssignment | None, scores: list[float] | None, depths: int, manual: dict[int, int],
                width: int | None = None) -> list[int]:
    """Least important layers first get the low width, until `low_fraction` of the layers (or the target
    average) is reached; or every layer `width`; `manual` entries override."""
    for layer in manual:
        if not 0 <= layer < depths:
            raise SurgeryError(f"bits.manual: layer {layer} does not exist (the model has {depths}: 0-{depths - 1})")
    if width is not None:
        return [manual.get(i, width) for i in range(depths)]
    if assign is None or scores is None:
        missing = sorted(set(range(depths)) - set(manual))
        if missing:
            raise SurgeryError(f"bits.manual: layer {missing[0]} has no width; with score: manual give every layer")
        return [manual[i] for i in range(depths)]
    order = sorted(range(depths), key=lambda i: (scores[i], i))  # least important first
    if assign.low_fraction is not None:
        assert assign.high is not None and assign.low is not None
        widths = [assign.high] * depths
        for layer in order[: round(assign.low_fraction * depths)]:
            widths[layer] = assign.low
    else:
        assert assign.choices is not None and assign.target_bits is not None
        check_reachable(assign)
        choices = sorted(set(assign.choices))
        widths = [choices[-1]] * depths
        for layer in order:
            while sum(widths) / depths > assign.target_bits and widths[layer] > choices[0]:
                widths[layer] = choices[choices.index(widths[layer]) - 1]
    return [manual.get(i, w) for i, w in enumerate(widths)]


def check_reachable(assign: BitAssignment) -> None:
    """A target average below the smallest choice is one no assignment reaches."""
    if assign.target_bits is not None and assign.choices and min(assign.choices) > assign.target_bits:
        raise SurgeryError(f"bits.assign: target_bits {assign.target_bits:g} is below the smallest choice "
                           f"{min(assign.choices)}; no assignment of {sorted(set(assign.choices))} reaches it")


def quantized_tensors(layer: Layer, keep: list[str]) -> list[str]:
    """The layer's matrices and fused 3-D experts not kept by name (`norms` keeps every 1-D tensor, which
    is never quantized anyway); an MoE router is never quantized: it picks the experts each token runs."""
    return [s for s, r in {**layer.matrices(), **layer.fused_experts()}.items()
            if not any(k in s for k in keep if k != "norms") and not is_router(s) and 0 not in r.shape]


def experts_layout(view: ModelView, targets: list[list[str]]) -> dict[str, bool]:
    """Whether each quantized tensor is stored transposed, (input, output), as transformers' module says
    (fused experts of gpt-oss, GPT-2's Conv1D): the quantizer's groups run along the input either way.
    Refused for fused experts whose module does not say; a 2-D weight it does not say is a linear layer's."""
    from surgery.architecture.structure import stored_transposed
    from surgery.evaluation.models import quiet_transformers

    first: dict[str, str] = {}  # a tensor's name in the first layer that has it
    fused: set[str] = set()
    for index, suffixes in enumerate(targets):
        for suffix in suffixes:
            first.setdefault(suffix, view.layout.layer_name(index, suffix))
            if len(view.layers[index].tensors[suffix].shape) == 3:
                fused.add(suffix)
    if not first:
        return {}
    names = {name: suffix for suffix, name in first.items()}
    with quiet_transformers():
        found = stored_transposed(view.config(), names)
    for name, transposed in found.items():
        if transposed is None and names[name] in fused:
            raise SurgeryError(f"bits: {name} holds fused experts whose input axis transformers does not say, so "
                               "they cannot be quantized along it; add 'experts' to keep to leave them unquantized")
    return {names[name]: bool(transposed) for name, transposed in found.items()}


def input_size(shape: tuple[int, ...], transposed: bool) -> int:
    """A weight's input dimension, along which the quantizers' groups run: its last axis, or the one before
    where it is stored (input, output)."""
    return shape[-2] if transposed else shape[-1]


def check_full_precision(view: ModelView, op: str) -> None:
    """A checkpoint already quantized (a `quantization_config`: its matrices are packed integers and
    scales) is refused: its stored tensors are not the model's weights."""
    config = view.config()
    if "quantization_config" in config:
        method = (config["quantization_config"] or {}).get("quant_method", "a quantization_config")
        raise SurgeryError(f"{op}: {view.source.path} is already quantized ({method}); start from the full-precision "
                           "checkpoint")


def _check_unedited(view: ModelView) -> None:
    check_full_precision(view, "bits")
    if any(r.compute is not None and not layer.origin.edits for layer in view.layers for r in layer.tensors.values()):
        raise SurgeryError(f"bits reads the checkpoint transformers loads, and {view.source.path} is stored in a format "
                           "of surgery's own; write it as a standard checkpoint first (surgery materialize)")
    for index, layer in enumerate(view.layers):
        if layer.origin.index != index or layer.origin.edits or any(r.compute is not None for r in layer.tensors.values()):
            raise SurgeryError("bits measures and quantizes the model as stored: put it first, or apply the earlier "
                               "steps to a checkpoint and quantize that")


def _check_widths(step: BitsStep, widths: list[int], targets: list[list[str]]) -> None:
    supported = PACKED_BITS if step.format == "compressed-tensors" else tuple(range(2, 9))
    for layer, width in enumerate(widths):
        if width not in supported and width < KEEP_BITS:
            raise SurgeryError(f"bits: layer {layer} gets {width} bits but format {step.format} supports "
                               f"{', '.join(map(str, supported))}" + (" (use format: dense to simulate others)"
                                                                       if step.format != "dense" else ""))
    packed = {w for w, suffixes in zip(widths, targets) if w < KEEP_BITS and suffixes}
    if step.format == "compressed-tensors" and not packed:
        raise SurgeryError("bits: format compressed-tensors has nothing to pack: every layer keeps its source dtype "
                           "(16 bits); use format: dense, or give some layers fewer bits")
    experts = any(is_expert(s) for suffixes in targets for s in suffixes)
    if step.format == "compressed-tensors" and experts and len(packed) > 1:
        raise SurgeryError(f"bits: format compressed-tensors with MoE experts needs one bit width for every quantized "
                           f"layer (the widths here are {sorted(packed)}): transformers unpacks every expert with one "
                           "width, so mixed widths would load wrong; use format: dense, or one width")


def _check_quantizer(step: BitsStep, view: ModelView, targets: list[list[str]], transposed: dict[str, bool]) -> None:
    if step.format == "compressed-tensors" and not step.quantizer.symmetric:
        raise SurgeryError("bits: format compressed-tensors needs quantizer.symmetric: true (asymmetric packed zero "
                           "points do not load in transformers 5 with compressed-tensors 0.20); use format: dense "
                           "to simulate asymmetric quantization")
    group = step.quantizer.group_size
    kinds = {(s, layer.tensors[s].shape, layer.tensors[s].dtype) for layer, suffixes in zip(view.layers, targets)
             for s in suffixes}  # every layer's own: shapes and dtypes can differ by layer
    inputs = [input_size(shape, transposed.get(suffix, False)) for suffix, shape, _ in kinds]
    for suffix, shape, dtype in sorted(kinds):
        if dtype not in QUANTIZABLE_DTYPES:
            raise SurgeryError(f"bits: {suffix} is stored as {dtype}, already quantized; bits quantizes "
                               f"{', '.join(QUANTIZABLE_DTYPES)} weights: add it to keep, or start from a "
                               "full-precision checkpoint")
        if len(shape) == 2 and transposed.get(suffix) and step.format == "compressed-tensors":
            raise SurgeryError(f"bits: format compressed-tensors packs linear weights stored (output, input), and "
                               f"{suffix} is stored (input, output) (GPT-2's Conv1D); use format: dense")
        if len(shape) == 3 and step.format == "compressed-tensors":
            raise SurgeryError(f"bits: format compressed-tensors cannot pack {suffix}: its experts are fused in one "
                               "3-D tensor, and the format packs 2-D weights only; use format: dense, or add "
                               "'experts' to keep")
        columns = input_size(shape, transposed.get(suffix, False))
        if columns % group:
            raise SurgeryError(f"bits.quantizer: group_size {group} does not divide the input dimension {columns} "
                               f"of {suffix}; {common_divisor_hint(inputs)}")
        if step.format == "compressed-tensors" and columns % 16:
            raise SurgeryError(f"bits: {suffix} has {columns} input columns; packing needs a multiple of 16")


def common_divisor_hint(inputs: list[int]) -> str:
    """What group size would fit every quantized matrix: a divisor of their inputs' greatest common divisor."""
    common = math.gcd(*inputs)
    return f"use a divisor of {common}, which divides every quantized matrix's input dimension"


def describe(step: BitsStep) -> str:
    q = step.quantizer
    chosen = f"every layer at {step.width} bits" if step.width is not None else f"layers ranked by {step.score}"
    return f"Layer-wise quantization (`bits`): {chosen}, {q.method.upper()} in groups of {q.group_size}, written {step.format}."


OP = Op("bits", BitsStep, bits, describe,
        'Dumitru et al. 2024, "Layer-Wise Quantization: A Pragmatic and Effective Method for Quantizing LLMs '
        'Beyond Integer Bit-Levels"',
        {"op": "bits", "assign": {"high": 8, "low": 4, "low_fraction": 0.5}})
