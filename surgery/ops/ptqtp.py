"""`ptqtp`: every layer matrix as two trit-planes with per-group scales (Xiao et al. 2025, PTQTP), fitted
by compute/trits.py from the weights alone (no calibration data), so it can follow any step.

- `dense`: each matrix as a1 t1 + a2 t2 in the source dtype, a standard checkpoint that scores anywhere;
- `trit-planes`: the planes packed five trits to a byte and the scales (formats/trit_planes.py), which
  `surgery eval` (and any plan) reads as its dense model; 3.2 bits per weight plus the scales.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from surgery.checkpoint.reader import DTYPE_SIZES
from surgery.compute.trits import TRITS_PER_BYTE, TritFit, TritPart
from surgery.errors import SurgeryError
from surgery.formats.trit_planes import trit_config
from surgery.ops.bits import QUANTIZABLE_DTYPES, check_full_precision, common_divisor_hint, quantized_tensors
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.registry import Op
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import Layer, ModelView, Storage


class PtqtpStep(StepModel):
    """PTQTP (Xiao et al. 2025): two ternary planes and two scales per group of each weight row."""

    op: Literal["ptqtp"]
    group_size: int = Field(default=128, ge=1, description="Inputs sharing one pair of scales.")
    iterations: int = Field(default=50, ge=0, description="Most alternating rounds (trits, then scales) per matrix.")
    keep: list[str] = Field(default_factory=lambda: ["embed", "lm_head", "norms"],
                            description="Tensors left in the source dtype, by name part; norms: every 1-D tensor.")
    format: Literal["dense", "trit-planes"] = "dense"

    def storage_format(self) -> tuple[str, str] | None:
        return ("trit-planes", "dense") if self.format == "trit-planes" else None


def ptqtp(step: PtqtpStep, view: ModelView, context: OpContext) -> ModelView:
    targets = [quantized_tensors(layer, step.keep) for layer in view.layers]
    _check(step, view, targets)

    def fit(recipe: TensorRecipe, part: TritPart, dtype: str, shape: tuple[int, ...]) -> TensorRecipe:
        return TensorRecipe.computed(dtype, shape, (recipe,), TritFit(step.group_size, step.iterations, recipe.dtype,
                                                                      part))

    layers = []
    for layer, suffixes in zip(view.layers, targets):
        tensors = dict(layer.tensors)
        for suffix in suffixes:
            tensors[suffix] = fit(tensors[suffix], "dense", tensors[suffix].dtype, tensors[suffix].shape)
        layers.append(Layer(tensors=tensors, config=layer.config, origin=layer.origin.edited("trit-planes")))
    dense = view.with_layers(layers)
    stored: dict[str, TensorRecipe] = dict(view.outside)
    modules, weights, stored_bits = [], 0, 0
    for depth, (layer, suffixes) in enumerate(zip(view.layers, targets)):
        for suffix, recipe in layer.tensors.items():
            name = view.layout.layer_name(depth, suffix)
            if suffix not in suffixes:
                stored[name] = recipe
                continue
            module, (rows, columns) = name.removesuffix(".weight"), recipe.shape
            modules.append(module)
            planes = (rows, -(-columns // TRITS_PER_BYTE))
            stored[f"{module}.trits_1"] = fit(recipe, "trits_1", "U8", planes)
            stored[f"{module}.trits_2"] = fit(recipe, "trits_2", "U8", planes)
            stored[f"{module}.trit_scales"] = fit(recipe, "scales", recipe.dtype, (rows, columns // step.group_size, 2))
            weights += rows * columns
            stored_bits += 2 * 8 * planes[0] * planes[1] + 8 * DTYPE_SIZES[recipe.dtype] * rows * columns // step.group_size * 2
    bits = stored_bits / weights if weights else 0.0
    context.fits.append({"quantizer": "ptqtp", "group_size": step.group_size, "matrices": len(modules),
                         "bits_per_weight": bits})
    context.log(f"ptqtp: {len(modules)} matrices as two trit-planes, {bits:.3g} bits per weight with their scales")
    if step.format == "dense":
        return dense
    return replace(dense, storage=Storage(stored, trit_config(view.config(), modules, step.group_size)))


def _check(step: PtqtpStep, view: ModelView, targets: list[list[str]]) -> None:
    check_full_precision(view, "ptqtp")
    kinds = {(s, layer.tensors[s].shape, layer.tensors[s].dtype) for layer, suffixes in zip(view.layers, targets)
             for s in suffixes}
    for suffix, shape, dtype in sorted(kinds):
        if dtype not in QUANTIZABLE_DTYPES:
            raise SurgeryError(f"ptqtp: {suffix} is stored as {dtype}, already quantized; add it to keep, or start "
                               "from a full-precision checkpoint")
        if len(shape) != 2:
            raise SurgeryError(f"ptqtp: {suffix} holds fused experts (a 3-D tensor); ptqtp fits 2-D matrices: add "
                               "'experts' to keep")
        if shape[1] % step.group_size:
            raise SurgeryError(f"ptqtp.group_size: {step.group_size} does not divide the input dimension {shape[1]} "
                               f"of {suffix}; {common_divisor_hint([k[1][1] for k in kinds if len(k[1]) == 2])}")
    if not kinds:
        raise SurgeryError("ptqtp: no layer matrix is left to quantize (all kept); remove names from keep")


def describe(step: PtqtpStep) -> str:
    return (f"Trit-plane quantization (`ptqtp`): each layer matrix as two ternary planes with scales per group of "
            f"{step.group_size}, written {step.format}.")


OP = Op("ptqtp", PtqtpStep, ptqtp, describe,
        'Xiao et al. 2025, "PTQTP: Post-Training Quantization to Trit-Planes for Large Language Models"',
        {"op": "ptqtp", "group_size": 32})
