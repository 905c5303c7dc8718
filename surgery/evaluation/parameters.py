"""One parameter of a loaded model, read and replaced wherever it waits between forwards.

A fit that changes a layer and runs the model again (bits' KL probes round one layer at a time, GPTQ
gives the next layer the inputs the quantized one makes) writes the parameter in the module. Under a
memory cap, accelerate keeps an offloaded parameter on the meta device and brings it in from its
weights map (CPU memory, or the shard on disk) at every forward; there the new value goes into that
map, where the next forward takes it from, and `reset` drops it again, so the fit holds one layer's
changed weights at a time and the checkpoint on disk is never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch

_ABSENT = object()


@dataclass
class ParameterSlot:
    """Parameter `name` of `module` (a leaf name: `weight`, or a dotted path below the module)."""

    module: Any
    name: str
    _before: Any = field(default=_ABSENT, repr=False)  # what `reset` puts back, or _ABSENT: nothing written

    def read(self) -> torch.Tensor:
        """Its current value, on the device forwards run on."""
        owner, leaf = self._owner()
        store = _offloaded_store(owner)
        if store is None:
            return getattr(owner, leaf).detach()
        return store.read(leaf).to(store.device)

    def write(self, value: torch.Tensor) -> None:
        """Every later forward uses `value` (same shape; cast to the parameter's dtype)."""
        import torch

        owner, leaf = self._owner()
        store = _offloaded_store(owner)
        if store is None:
            parameter = getattr(owner, leaf)
            if self._before is _ABSENT:
                self._before = parameter.detach().clone()
            with torch.no_grad():
                parameter.copy_(value)
            return
        if self._before is _ABSENT:
            self._before = store.written.get(store.prefix + leaf, None)
        dtype = getattr(owner, leaf).dtype  # the placeholder on the meta device keeps it
        store.written[store.prefix + leaf] = value.detach().to("cpu", dtype).clone()  # where the store keeps values

    def reset(self) -> None:
        """Back to the value it was loaded with; an offloaded one's written copy is freed."""
        import torch

        if self._before is _ABSENT:
            return
        owner, leaf = self._owner()
        store = _offloaded_store(owner)
        if store is None:
            with torch.no_grad():
                getattr(owner, leaf).copy_(self._before)
        elif self._before is None:
            store.written.pop(store.prefix + leaf, None)
        else:
            store.written[store.prefix + leaf] = self._before
        self._before = _ABSENT

    def _owner(self) -> tuple[Any, str]:
        path, _, leaf = self.name.rpartition(".")
        return (self.module.get_submodule(path) if path else self.module), leaf


@dataclass
class _Store:
    """Where accelerate keeps one module's parameters between forwards."""

    dataset: Any  # reads `prefix + name`: `written` first, then CPU memory or the shard on disk
    written: dict[str, Any]  # what the next forward takes before anything else
    prefix: str
    device: Any  # where the module runs

    def read(self, leaf: str) -> Any:
        return self.dataset[self.prefix + leaf]


def is_offloaded(module: Any) -> bool:
    """Whether accelerate keeps this module's parameters elsewhere (a memory cap), bringing them in at each forward."""
    return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))


def _offloaded_store(owner: Any) -> _Store | None:
    """The store of a module accelerate offloads; None for a module whose parameters stay in it."""
    if not is_offloaded(owner):
        if any(p.device.type == "meta" for p in owner.parameters(recurse=False)):
            raise SurgeryError(f"{type(owner).__name__}'s weights wait where the memory cap placed them, out of reach "
                               "of this fit; run it without a memory cap")
        return None
    hook = owner._hf_hook
    weights = hook.weights_map  # accelerate's PrefixedDataset over an OffloadedWeightsLoader, or over a dict
    dataset = weights.dataset
    written = getattr(dataset, "state_dict", dataset)  # the loader looks in its state_dict before the disk
    return _Store(dataset, written, weights.prefix, hook.execution_device)
