"""`rotate`: a random orthogonal rotation of the residual stream folded into the weights, leaving the
model's function as it was (compute/rotation.py); RSQ's first step, so that `bits` rounds weights whose
outlier features are spread out. Pre-norm RMSNorm decoders only (the Llama family), where every tensor's
part in the residual stream is known by name; anything else is refused, naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from pydantic import Field

from surgery.compute.rotation import Ones, Rotate, Side
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.registry import Op
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import Layer, ModelView

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")  # RMSNorm that is x / rms(x) * g, pre-norm, untied heads below
READERS = {"self_attn.q_proj.weight": "input_layernorm.weight", "self_attn.k_proj.weight": "input_layernorm.weight",
           "self_attn.v_proj.weight": "input_layernorm.weight", "mlp.gate_proj.weight": "post_attention_layernorm.weight",
           "mlp.up_proj.weight": "post_attention_layernorm.weight"}
WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
WRITER_BIASES = ("self_attn.o_proj.bias", "mlp.down_proj.bias")
UNTOUCHED = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",  # outputs, not residual
             "self_attn.q_norm.weight", "self_attn.k_norm.weight")  # per head, after the projections
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


class RotateStep(StepModel):
    """Fold a random orthogonal rotation of the residual stream into the weights (QuaRot; RSQ's rotate)."""

    op: Literal["rotate"]
    seed: int = Field(default=0, ge=0, lt=2**63, description="Seed of the random orthogonal matrix.")


def rotate(step: RotateStep, view: ModelView, context: OpContext) -> ModelView:
    config = view.config()
    model_type = config.get("model_type")
    if model_type not in ROTATABLE:
        raise SurgeryError(f"rotate: model type {model_type!r} is not one whose norms and residual stream surgery "
                           f"knows by name ({', '.join(ROTATABLE)}); nothing was written")
    if config.get("tie_word_embeddings"):
        raise SurgeryError("rotate: the embeddings are tied to the head, and the final norm's scale cannot be folded "
                           "into a tied matrix; untie them first (a model with its own lm_head.weight)")
    size = int(config["hidden_size"])

    def rotated(recipe: TensorRecipe, side: Side, *more: TensorRecipe) -> TensorRecipe:
        return TensorRecipe.computed(recipe.dtype, recipe.shape, (recipe, *more), Rotate(side, size, step.seed))

    layers = []
    for index, layer in enumerate(view.layers):
        tensors = {}
        for suffix, recipe in layer.tensors.items():
            if suffix in READERS:
                tensors[suffix] = rotated(recipe, "reads", layer.tensors[READERS[suffix]])
            elif suffix in WRITERS:
                tensors[suffix] = rotated(recipe, "writes")
            elif suffix in WRITER_BIASES:
                tensors[suffix] = rotated(recipe, "vector")
            elif suffix in NORMS:
                tensors[suffix] = TensorRecipe.computed(recipe.dtype, recipe.shape, (recipe,), Ones())
            elif suffix in UNTOUCHED:
                tensors[suffix] = recipe
            else:
                raise SurgeryError(f"rotate: {view.layout.layer_name(index, suffix)} has no known place in the "
                                   "residual stream, so the rotation cannot be folded into it; nothing was written")
        layers.append(Layer(tensors=tensors, config=layer.config, origin=layer.origin.edited("rotated")))
    outside = _outside(view.outside, rotated)
    context.fits.append({"rotation": "random orthogonal", "size": size, "seed": step.seed})
    return replace(view, outside=outside, layers=tuple(layers))


def _outside(tensors: dict[str, TensorRecipe], rotated: Callable[..., TensorRecipe]) -> dict[str, TensorRecipe]:
    """The embedding (E Q), the head with the final norm folded in (W diag(g) Q), the final norm as ones."""
    embeddings = [n for n in tensors if n.endswith("embed_tokens.weight")]
    heads = [n for n in tensors if n == "lm_head.weight"]
    norms = [n for n in tensors if n.endswith("norm.weight")]
    known = set(embeddings) | set(heads) | set(norms)
    if len(embeddings) != 1 or len(heads) != 1 or len(norms) != 1 or known != set(tensors):
        other = sorted(set(tensors) - known) or sorted(tensors)
        raise SurgeryError(f"rotate: the tensors outside the layers are not one embedding, one final norm and one "
                           f"lm_head ({', '.join(other[:3])}); nothing was written")
    (embedding,), (head,), (norm,) = embeddings, heads, norms
    return {embedding: rotated(tensors[embedding], "vector"), head: rotated(tensors[head], "reads", tensors[norm]),
            norm: TensorRecipe.computed(tensors[norm].dtype, tensors[norm].shape, (tensors[norm],), Ones())}


def describe(step: RotateStep) -> str:
    return (f"Rotation (`rotate`): a random orthogonal rotation of the residual stream (seed {step.seed}) folded into "
            "the weights, the norms' scales folded into the matrices after them; the function is unchanged.")


OP = Op("rotate", RotateStep, rotate, describe,
        'Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"; Sung et al. 2025, "RSQ"',
        {"op": "rotate"})
