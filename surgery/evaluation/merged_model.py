"""A merged model computed from its checkpoints as the forward runs: aTLAS learning under a memory cap.

Learning in memory holds the base and every task vector in float32 on the device, (models + 1) times
the model. Here the model is transformers' module with no weights of its own: each parameter is a
parametrization that, whenever the forward asks for it, reads the base's and the models' tensor
(memory-mapped, from the page cache) and returns theta_base + sum_t c_t (theta_t - theta_base), in the
order learning in memory computes it. Its backward reads them once more for the coefficients' gradient
(sum grad * tau_t), so nothing the size of a weight is saved between forward and backward; with
gradient checkpointing each layer's forward runs again for its backward, and at any time the device
holds about one tensor's weights, the activations at the layers' boundaries and the head's weight.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.utils import parametrize

from surgery.errors import SurgeryError
from surgery.recipe.stream import RecipeStreamer
from surgery.recipe.view import ModelView


class Coefficients:
    """The current per-tensor coefficients, (models, tensors): set before each forward, read by every weight;
    and the step's merges of the weights two modules share (a head tied to the embedding), made once, so the
    two modules' gradients add up before the merge's backward, as they do learning in memory."""

    def __init__(self) -> None:
        self._per_tensor: torch.Tensor | None = None
        self.shared: dict[int, torch.Tensor] = {}

    @property
    def per_tensor(self) -> torch.Tensor | None:
        return self._per_tensor

    @per_tensor.setter
    def per_tensor(self, value: torch.Tensor) -> None:
        self._per_tensor, self.shared = value, {}


class TensorSource:
    """One parameter's tensor in the base and in each model, read afresh at every use, never kept."""

    def __init__(self, name: str, base: ModelView, models: list[ModelView], streamer: RecipeStreamer) -> None:
        """`name`: the tensor's name in the checkpoints."""
        self.base = base.tensors()[name]
        self.models = [view.tensors()[name] for view in models]
        self.streamer = streamer

    def base_value(self) -> torch.Tensor:
        return self.streamer.whole(self.base)

    def task_vectors(self, base: torch.Tensor) -> Iterator[torch.Tensor]:
        """tau_t = theta_t - theta_base in float32, one at a time."""
        for recipe in self.models:
            yield self.streamer.whole(recipe).sub_(base)


class _Merge(torch.autograd.Function):
    """theta_base + sum_t c_t tau_t, whose backward reads the tensors again instead of keeping them."""

    @staticmethod
    def forward(ctx: Any, column: torch.Tensor, source: TensorSource) -> torch.Tensor:
        ctx.source = source
        base = source.base_value()
        return base + sum(column[t] * tau for t, tau in enumerate(source.task_vectors(base)))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        source: TensorSource = ctx.source
        return torch.stack([(grad * tau).sum() for tau in source.task_vectors(source.base_value())]), None


class _Merged(torch.nn.Module):
    """A parameter's parametrization: its merged value at the current coefficients (the stored one is empty)."""

    def __init__(self, source: TensorSource, column: int, coefficients: Coefficients, shared: bool) -> None:
        super().__init__()
        self.source, self.column, self.coefficients, self.shared = source, column, coefficients, shared

    def forward(self, _empty: torch.Tensor) -> torch.Tensor:
        coefficients = self.coefficients
        assert coefficients.per_tensor is not None
        if self.shared and self.column in coefficients.shared:
            return coefficients.shared[self.column]
        merged = _Merge.apply(coefficients.per_tensor[:, self.column], self.source)
        if self.shared:
            coefficients.shared[self.column] = merged
        return merged


class StreamedMerge:
    """transformers' module for the base's config whose parameters are the merge at the coefficients in
    `coefficients.per_tensor` (column i: the i-th of `parameters`, checkpoint name -> parameter name, in the
    order of `block_of`), read from the checkpoints onto `device` when used; close() when done."""

    def __init__(self, base: ModelView, models: list[ModelView], block_of: dict[str, str], device: str) -> None:
        if importlib.util.find_spec("accelerate") is None:
            raise SurgeryError("learning aTLAS coefficients under a memory cap needs accelerate: "
                               "pip install 'surgery[offload]'")
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from surgery.evaluation.models import quiet_transformers, stored_parameters

        with quiet_transformers(), init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**base.config()), dtype=torch.float32)
        model.tie_weights()  # from_config leaves a head untied on the meta device
        model.requires_grad_(False).eval()
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
        self.parameters = stored_parameters(model, block_of)
        stray = sorted(set(dict(model.named_parameters())) - set(self.parameters.values()))
        if stray:
            raise SurgeryError(f"atlas: under a memory cap every parameter is computed from the checkpoints, but "
                               f"transformers' {stray[0]!r} is not one tensor {base.label} stores; learn without "
                               "--max-memory")
        self.model, self.coefficients, self.streamer = model, Coefficients(), RecipeStreamer(device)
        column = {name: i for i, name in enumerate(self.parameters.values())}
        sources = {name: TensorSource(checkpoint, base, models, self.streamer)
                   for checkpoint, name in self.parameters.items()}
        named = {id(p): name for name, p in model.named_parameters()}  # a tied weight under its first name
        # every module's own, a head tied to the embedding included (it takes the embedding's merge)
        owned = [(m, leaf, p) for m in model.modules() for leaf, p in m.named_parameters(recurse=False)]
        uses = Counter(id(parameter) for _, _, parameter in owned)
        for owner, leaf, parameter in owned:
            name = named[id(parameter)]
            owner._parameters[leaf] = torch.nn.Parameter(torch.empty(0, device=device), requires_grad=False)
            merged = _Merged(sources[name], column[name], self.coefficients, shared=uses[id(parameter)] > 1)
            parametrize.register_parametrization(owner, leaf, merged, unsafe=True)

    def close(self) -> None:
        self.streamer.close()
