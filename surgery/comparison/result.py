"""What `surgery diff` found: the report of two checkpoints, tensor by tensor and layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surgery.comparison.stats import ZERO, Change


@dataclass
class TensorChange:
    name: str  # in B
    source: str  # in A
    change: Change

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "relative_change": self.change.relative,
                "cosine": self.change.cosine, "max_abs_diff": self.change.max_abs}


@dataclass
class LayerReport:
    index: int  # layer of B
    identical_to: int | None  # layer of A with the same bytes in every tensor
    closest: int | None  # layer of A it was compared with (identical_to, or the most similar)
    similarity: float | None
    change: Change = ZERO
    modules: dict[str, Change] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "identical_to": self.identical_to, "closest": self.closest,
            "similarity": self.similarity, "relative_change": self.change.relative,
            "update_norm": self.change.update_norm, "cosine": self.change.cosine,
            "modules": {kind: c.relative for kind, c in sorted(self.modules.items())},
        }


@dataclass
class DiffReport:
    a: str
    b: str
    notes: list[str] = field(default_factory=list)
    config_changed: dict[str, list[Any]] = field(default_factory=dict)
    config_added: dict[str, Any] = field(default_factory=dict)
    config_removed: dict[str, Any] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    dtype_changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    changed: list[TensorChange] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    modules: dict[str, Change] = field(default_factory=dict)

    @property
    def differs(self) -> bool:
        return bool(self.config_changed or self.config_added or self.config_removed or self.added or self.removed
                    or self.reshaped or self.dtype_changed or self.changed)

    def layer_map(self) -> list[int | None]:
        return [layer.identical_to for layer in self.layers]

    def top(self, n: int) -> list[TensorChange]:
        return sorted(self.changed, key=lambda t: t.change.relative, reverse=True)[:n]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "differs": self.differs, "notes": self.notes,
            "config": {"changed": self.config_changed, "added": self.config_added, "removed": self.config_removed},
            "layer_map": self.layer_map(),
            "added": self.added, "removed": self.removed, "reshaped": self.reshaped,
            "dtype_changed": self.dtype_changed, "unchanged": len(self.unchanged),
            "changed": [t.name for t in self.changed],
            "layers": [layer.to_dict() for layer in self.layers],
            "modules": {kind: {"relative_change": c.relative, "update_norm": c.update_norm}
                        for kind, c in sorted(self.modules.items())},
            "top": [t.to_dict() for t in self.top(top)],
        }


def config_changes(a: dict[str, Any], b: dict[str, Any], report: DiffReport) -> None:
    """Config keys changed, added and removed from A to B (the two that only say who saved it ignored)."""
    for key in sorted((set(a) | set(b)) - {"transformers_version", "_name_or_path"}):
        if key not in b:
            report.config_removed[key] = a[key]
        elif key not in a:
            report.config_added[key] = b[key]
        elif a[key] != b[key]:
            report.config_changed[key] = [a[key], b[key]]
