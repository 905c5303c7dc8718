"""`bits` with `quantizer.method: gptq`: the layers quantized in order on calibration text, each layer's
Hessians taken from the inputs the already-quantized layers before it make (llm-compressor's sequential
pipeline: one pass for the Hessians, GPTQ, one pass for the next layer's inputs).

Each layer's integers, scales and zero points go to one safetensors file in the fits cache as soon as
the layer is done, so the executor streams them like any stored tensor, memory holds one layer's
activations and Hessians, and a run stopped half way resumes at the first layer not written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.blocks import torch_dtype
from surgery.checkpoint.modules import is_expert
from surgery.checkpoint.reader import ShardHeader, read_shard_header
from surgery.compute.gptq import GptqSettings, Hessian, gptq, output_error
from surgery.compute.quantize import Quantized, quantize, require_finite
from surgery.errors import SurgeryError
from surgery.evaluation.parameters import ParameterSlot
from surgery.ops.context import OpContext
from surgery.ops.fit_memo import fit_folder, folder_stamp, save_fit_tensors, text_digest
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import ModelView

PARTS = ("values", "scale", "zero")


@dataclass(frozen=True)
class LayerPlan:
    """What one layer's GPTQ quantizes: its tensors by suffix, their stored dtypes, and the width."""

    suffixes: tuple[str, ...]
    dtypes: tuple[str, ...]
    bits: int


def gptq_layers(settings: GptqSettings, calibration: Any, view: ModelView, plans: list[LayerPlan | None],
                context: OpContext) -> tuple[list[dict[str, tuple[TensorRecipe, ...]]], dict[str, Any]]:
    """Per layer, each quantized tensor's (values, scale, zero) as stored recipes of the cache files; and
    for surgery.json, each layer's output error relative to its output, GPTQ's beside RTN's on the same
    inputs, and the tensors no calibration token reached (RTN there)."""
    from surgery.devices import resolve_device
    from surgery.evaluation.data import load_text

    text = load_text(calibration.data).text
    key = {"settings": asdict(settings), "calibration": calibration.model_dump(mode="json"),
           "device": resolve_device(context.device), "model": folder_stamp(view.source.path),
           "layers": [asdict(p) if p else None for p in plans], "text": text_digest(text)}
    folder = fit_folder("gptq", key)
    if all(p is None for p in plans):  # every layer kept at full precision: nothing to calibrate
        return [{} for _ in plans], {"calibration_tokens": 0, "output_error": {"gptq": [], "rtn": []},
                                     "rtn_fallback": []}
    headers = _stored_layers(folder, plans)
    if all(h is not None for h, p in zip(headers, plans) if p is not None):
        context.log(f"gptq: the same calibration ran before; reusing its integers ({folder})")
    else:
        _calibrate(settings, calibration, text, view, plans, headers, folder, context)
        headers = _stored_layers(folder, plans)
    recipes, errors = [], []
    for index, (plan, header) in enumerate(zip(plans, headers)):
        if plan is not None and header is None:
            raise SurgeryError(f"gptq: {_layer_file(folder, index)} vanished while the plan ran; run it again")
        recipes.append({s: tuple(TensorRecipe.copy_of(header.tensors[f"{s}.{part}"]) for part in PARTS)
                        for s in plan.suffixes} if plan and header else {})
        errors.append(json.loads(header.metadata["errors"]) if header else None)
    record = {"calibration_tokens": max((e["tokens"] for e in errors if e), default=0),
              "output_error": {"gptq": [e and e["gptq"] for e in errors], "rtn": [e and e["rtn"] for e in errors]},
              "rtn_fallback": sorted({n for e in errors if e for n in e["unseen"]})}
    if settings.token_importance != "uniform":  # the layers whose tokens were weighed (those with attention)
        record["token_importance"] = {"by": settings.token_importance,
                                      "layers": [i for i, e in enumerate(errors) if e and e.get("weighted")]}
    return recipes, record


def _stored_layers(folder: Path, plans: list[LayerPlan | None]) -> list[ShardHeader | None]:
    return [_stored_layer(folder, i, p) if p is not None else None for i, p in enumerate(plans)]


def _stored_layer(folder: Path, index: int, plan: LayerPlan) -> ShardHeader | None:
    """The header of a layer's file when it holds every part of every tensor the layer quantizes and its
    errors; None (and a damaged or foreign file removed, to be fitted afresh) otherwise."""
    path = _layer_file(folder, index)
    if not path.is_file():
        return None
    try:
        header = read_shard_header(path)
        errors = json.loads(header.metadata["errors"])
        if {f"{s}.{part}" for s in plan.suffixes for part in PARTS} <= header.tensors.keys() and \
                {"gptq", "rtn", "unseen", "tokens"} <= errors.keys():
            return header
    except (SurgeryError, KeyError, ValueError, AttributeError):
        pass
    path.unlink(missing_ok=True)
    return None


def _calibrate(settings: GptqSettings, calibration: Any, text: str, view: ModelView, plans: list[LayerPlan | None],
               done: list[ShardHeader | None], folder: Path, context: OpContext) -> None:
    """Every planned layer in order: the ones `done` (stored before) are read back, the others fitted and stored."""
    import torch

    from surgery.evaluation.importance import calibration_batches
    from surgery.evaluation.layerwise import first_layer_inputs
    from surgery.evaluation.loading import load_for_eval
    from surgery.evaluation.models import layer_modules
    from surgery.evaluation.token_importance import layer_importance

    loaded = load_for_eval(view.source.path, context.device, "float32", context.max_memory)
    layers = layer_modules(loaded.model, view.layout.prefix, len(view.layers))
    rows = calibration_batches(loaded.tokenizer, text, calibration.samples, calibration.seq_len, "bits.calibration")
    modules = [{s: _linear(layers[i], s, view.layers[i].tensors[s].shape) for s in p.suffixes} if p else {}
               for i, p in enumerate(plans)]
    for index, planned in enumerate(modules):  # before calibrating: inf or NaN would spread through it
        for suffix, module in planned.items():
            try:
                require_finite(module.read(), "GPTQ", "bits")
            except SurgeryError as e:
                raise SurgeryError(f"bits: layer {index} {suffix} {e}") from None
    context.log(f"gptq: calibrating {sum(p is not None for p in plans)} layers in order on {rows.numel()} tokens "
                f"({loaded.placement()})")
    weighted = settings.token_importance == "attention"
    if weighted:
        loaded.model.set_attn_implementation("eager")  # the only one that returns attention probabilities
    inputs = first_layer_inputs(loaded.model, layers, rows)
    folder.mkdir(parents=True, exist_ok=True)
    for index, plan in enumerate(plans):
        path = _layer_file(folder, index)
        if plan is not None and done[index] is not None:
            _set_weights(modules[index], _read_layer(path, plan))
        elif plan is not None:
            importance = layer_importance(inputs, index, layers[index]) if weighted else None
            hessians = {s: Hessian(m.module.in_features, loaded.device) for s, m in modules[index].items()}
            row = [0]
            handles = [m.module.register_forward_pre_hook(
                lambda _, args, h=hessians[s]: h.add(args[0], None if importance is None else importance[row[0]]))
                for s, m in modules[index].items()]
            try:
                inputs.run(index, layers[index], keep=False, before_row=lambda r: row.__setitem__(0, r))
            finally:
                for handle in handles:
                    handle.remove()
            quantized, errors = _quantize_layer(settings, index, plan, modules[index], hessians)
            errors["tokens"] = int(rows.numel())
            errors["weighted"] = importance is not None
            _write_layer(path, quantized, errors)
            _set_weights(modules[index], quantized)
            context.log(f"gptq: layer {index} at {plan.bits} bits: output error {errors['gptq']:.3g} "
                        f"(RTN {errors['rtn']:.3g})")
        if any(p is not None for p in plans[index + 1:]):
            inputs.run(index, layers[index])
        for module in modules[index].values():
            module.reset()  # the layers after it have its outputs; under a memory cap, this frees its weights
    del loaded, inputs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quantize_layer(settings: GptqSettings, index: int, plan: LayerPlan, modules: dict[str, ParameterSlot],
                    hessians: dict[str, Hessian]) -> tuple[dict[str, Quantized], dict[str, Any]]:
    """Each module by GPTQ (RTN where calibration never reached it: an MoE expert no token chose), and the
    layer's output error relative to its output, GPTQ's and RTN's, on the same Hessians."""
    quantized, unseen = {}, []
    totals = {"gptq": 0.0, "rtn": 0.0, "output": 0.0}
    for (suffix, module), dtype in zip(modules.items(), plan.dtypes):
        weight, hessian = module.read(), hessians[suffix]
        rtn = quantize(weight, plan.bits, settings.group_size, settings.symmetric, torch_dtype(dtype))
        if hessian.rows == 0:
            quantized[suffix] = rtn
            unseen.append(suffix)
            continue
        try:
            quantized[suffix] = gptq(weight, hessian.matrix, plan.bits, settings, torch_dtype(dtype))
        except SurgeryError as e:
            raise SurgeryError(f"bits: layer {index} {suffix}: {e}") from None
        totals["gptq"] += output_error(weight, quantized[suffix].dequantized().float(), hessian.matrix)
        totals["rtn"] += output_error(weight, rtn.dequantized().float(), hessian.matrix)
        totals["output"] += output_error(weight, 0 * weight, hessian.matrix)
    scale = totals["output"] or 1.0
    return quantized, {"gptq": totals["gptq"] / scale, "rtn": totals["rtn"] / scale, "unseen": unseen}


def _linear(layer: Any, suffix: str, shape: tuple[int, ...]) -> ParameterSlot:
    """The weight of a linear layer of transformers' module, wherever a memory cap placed it."""
    import torch

    try:
        module = layer.get_submodule(suffix.removesuffix(".weight")) if suffix.endswith(".weight") else None
    except AttributeError:  # transformers fuses stored experts into one module when it loads them
        module = None
    if not isinstance(module, torch.nn.Linear) or tuple(module.weight.shape) != tuple(shape):
        kind = "fused experts" if is_expert(suffix) else "not a linear layer of transformers' module"
        keep = "'experts'" if is_expert(suffix) else "it"
        raise SurgeryError(f"bits: quantizer gptq calibrates linear layers, and {suffix} is {kind}; add {keep} to "
                           "keep, or use quantizer.method: rtn")
    return ParameterSlot(module, "weight")


def _set_weights(modules: dict[str, ParameterSlot], quantized: dict[str, Quantized]) -> None:
    """The layer as written, so the layers after it calibrate on the inputs the output model makes."""
    for suffix, module in modules.items():
        module.write(quantized[suffix].dequantized())


def _layer_file(folder: Path, index: int) -> Path:
    return folder / f"layer-{index}.safetensors"


def _write_layer(path: Path, quantized: dict[str, Quantized], errors: dict[str, Any]) -> None:
    tensors = {f"{s}.{part}": getattr(q, part).cpu() for s, q in quantized.items() for part in PARTS}
    save_fit_tensors(path, tensors, {"errors": json.dumps(errors)}, "gptq: cannot write its integers", "the quantized model")


def _read_layer(path: Path, plan: LayerPlan) -> dict[str, Quantized]:
    from safetensors.torch import load_file

    stored = load_file(path)
    return {s: Quantized(*(stored[f"{s}.{part}"] for part in PARTS)) for s in plan.suffixes}
