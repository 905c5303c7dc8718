"""Run a transformers model one decoder layer at a time on calibration rows, so a quantizer can change
layer i and give layer i+1 the inputs the changed layers make (GPTQ's sequential calibration), with only
one layer's activations in memory.

The rows' inputs to layer 0 and the arguments every layer is called with (position embeddings, masks,
per-layer inputs) are captured from one forward of the model over the rows; arguments the same for
every row are kept once. Replaying the unchanged layers must give the model's own last hidden state, or
the model is refused rather than calibrated on inputs it would never see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError
from surgery.evaluation.models import input_device

if TYPE_CHECKING:
    import torch


@dataclass
class LayerCall:
    """How the model calls one layer: whether hidden states come positionally, the other arguments of
    the first row, and per row the keyword arguments that differ from the first row's (per-layer inputs
    made from the token ids, as Gemma 3n's; hash routing by token, as DeepSeek-V4's)."""

    positional: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    varying: list[dict[int | str, Any]]  # per row: argument position or keyword -> its value for that row

    def __call__(self, layer: Any, row: int, hidden: torch.Tensor) -> torch.Tensor:
        changed = self.varying[row]
        args = tuple(changed.get(i, a) for i, a in enumerate(self.args))
        kwargs = {k: changed.get(k, v) for k, v in self.kwargs.items()}
        output = layer(hidden, *args, **kwargs) if self.positional else layer(*args, hidden_states=hidden, **kwargs)
        return output[0] if isinstance(output, tuple | list) else output


@dataclass
class LayerInputs:
    """Every row's hidden state entering the next layer to run, and each layer's call."""

    hidden: list[torch.Tensor]
    calls: list[LayerCall]

    def run(self, index: int, layer: Any, keep: bool = True, before_row: Callable[[int], None] = lambda row: None
            ) -> None:
        """Layer `index` on every row (its forward hooks see them, `before_row` is told which); with `keep`,
        its outputs become the next layer's inputs."""
        outputs = []
        for row in range(len(self.hidden)):
            before_row(row)
            output = self.run_row(index, layer, row)
            if keep:
                outputs.append(output)
        if keep:
            self.hidden = outputs

    def run_row(self, index: int, layer: Any, row: int) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.calls[index](layer, row, self.hidden[row])


def first_layer_inputs(model: Any, layers: Any, rows: torch.Tensor) -> LayerInputs:
    """Layer 0's input for every row and every layer's call, checked to replay the model's own forward."""
    import torch

    device = input_device(model)
    calls: list[LayerCall | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def capture(index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], given: dict[str, Any]) -> None:
            positional = bool(args)
            entering = args[0] if positional else given["hidden_states"]
            rest = args[1:] if positional else args
            kwargs = {k: v for k, v in given.items() if k != "hidden_states"}
            call = calls[index]
            if call is None:
                calls[index] = LayerCall(positional, rest, kwargs, [{}])
            elif positional != call.positional or len(rest) != len(call.args) or kwargs.keys() != call.kwargs.keys():
                raise SurgeryError(f"layer {index} is called with other arguments from one calibration row to the "
                                   "next, so it cannot be calibrated one layer at a time; use quantizer.method: rtn")
            else:
                call.varying.append({**{i: a for i, a in enumerate(rest) if not _equal(a, call.args[i])},
                                     **{k: v for k, v in kwargs.items() if not _equal(v, call.kwargs[k])}})
            if index == 0:
                hidden.append(entering.detach().clone())
        return hook

    def keep_last(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not last:
            last.append((output[0] if isinstance(output, tuple | list) else output).detach().clone())

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[len(layers) - 1].register_forward_hook(keep_last, with_kwargs=True))
    try:
        with torch.inference_mode():
            for row in rows:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in calls):
        raise SurgeryError("some layers never ran in the model's forward, so they cannot be calibrated one at a time; "
                           "use quantizer.method: rtn")
    inputs = LayerInputs(hidden, [c for c in calls if c is not None])
    _check_replay(inputs, layers, last[0])
    return inputs


def _check_replay(inputs: LayerInputs, layers: Any, expected: torch.Tensor) -> None:
    import torch

    with torch.inference_mode():
        h = inputs.hidden[0]
        for index, layer in enumerate(layers):
            h = inputs.calls[index](layer, 0, h)
    if not torch.allclose(h, expected, rtol=1e-4, atol=1e-5):
        raise SurgeryError(f"running {type(layers[0]).__name__} one layer at a time does not reproduce the model's "
                           "own forward, so it cannot be calibrated layer by layer; use quantizer.method: rtn")


def _equal(x: Any, y: Any) -> bool:
    """Whether two layer arguments are the same values (tensors by content, containers by element)."""
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape \
            and x.dtype == y.dtype and bool(torch.equal(x, y))
    if isinstance(x, tuple | list) and isinstance(y, tuple | list):
        return len(x) == len(y) and all(_equal(i, j) for i, j in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    try:
        return x is y or bool(x == y)
    except Exception:  # an object whose == is not a truth value
        return False
