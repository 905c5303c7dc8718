"""Compare two checkpoints: config, tensors, and which layer of A each layer of B is.

Layers are paired first (identical bytes, else the most similar layer of the same shapes), then
tensors are compared along those pairs, so a dropped, looped or reordered model reads as such and
a fine-tune reads as changes to the same layers.
"""

from __future__ import annotations

import re
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from surgery.checkpoint.layout import Layout, find_layout
from surgery.checkpoint.modules import module_kind
from surgery.checkpoint.reader import Checkpoint, TensorInfo, read_config
from surgery.comparison.bytes import ByteComparer
from surgery.comparison.ensembles import ensemble_pair
from surgery.comparison.result import DiffReport, LayerReport, TensorChange, config_changes
from surgery.comparison.stats import ZERO, Change, Sketches, measure, total
from surgery.comparison.workers import Workers
from surgery.errors import SurgeryError

SIMILAR_ENOUGH = 0.5  # mean cosine below which a changed layer is matched to no layer of A


def diff(
    a_path: str | Path, b_path: str | Path, *, include: str | None = None, exclude: str | None = None,
    atol: float = 0.0, rtol: float = 0.0,
) -> DiffReport:
    """Everything that differs from checkpoint A to checkpoint B, read straight from their files.

    Args: `a_path`, `b_path` are model folders; `include`/`exclude` are regular expressions on tensor
    names; a tensor whose every element is within `atol + rtol * |a|` counts as unchanged.
    Returns a DiffReport (`.to_dict()` is what `surgery diff --json` prints); raises SurgeryError.
    """
    ensembles = ensemble_pair(Path(a_path), Path(b_path), _config(Path(a_path)), _config(Path(b_path)))
    if ensembles is not None:
        return ensembles
    a, b = Checkpoint.open(a_path), Checkpoint.open(b_path)
    report = DiffReport(a=str(a_path), b=str(b_path))
    config_changes(a.config, b.config, report)
    selected = _name_filter(include, exclude)
    a_layout, b_layout = _layout(a, report), _layout(b, report)
    if a.config.get("model_type") != b.config.get("model_type"):
        report.notes.append(
            f"different architectures ({a.config.get('model_type')} -> {b.config.get('model_type')}): "
            "tensors are paired by name only"
        )
        a_layout = b_layout = None
    measuring: list[tuple[str, str, list[Future[Change]]]] = []
    with Workers() as workers:
        comparer = ByteComparer(workers)
        # all pairs first: measuring alongside the pairing slowed both (between its parts each worker
        # needs the GIL, which the pairing's Python holds) and was slower in all
        pairs, unpaired_a, unpaired_b = _pair(a, b, a_layout, b_layout, comparer, Sketches(comparer.samples), report)
        for b_name, a_name in pairs:
            if not (selected(b_name) or selected(a_name)):
                continue
            ia, ib = a.tensors[a_name], b.tensors[b_name]
            if ia.shape != ib.shape:
                report.reshaped.append(b_name)
                continue
            if ia.dtype != ib.dtype:
                report.dtype_changed.append(b_name)
            if comparer.identical(ia, ib):
                report.unchanged.append(b_name)
            else:  # queued at once: the workers measure while the next pairs are checked for identity
                measuring.append((b_name, a_name, measure(workers, ia, ib, atol, rtol)))
        changes = [(b_name, a_name, total(parts)) for b_name, a_name, parts in measuring]
    report.removed = sorted(n for n in unpaired_a if selected(n))
    report.added = sorted(n for n in unpaired_b if selected(n))
    layer_of = {} if b_layout is None else {n: b_layout.split(n) for n in b.tensors}
    for b_name, a_name, change in changes:
        if a.tensors[a_name].dtype == b.tensors[b_name].dtype and (atol or rtol) and change.within_tolerance:
            report.unchanged.append(b_name)
            continue
        report.changed.append(TensorChange(b_name, a_name, change))
        kind = module_kind(b_name)
        report.modules[kind] = report.modules.get(kind, ZERO) + change
        placed = layer_of.get(b_name)
        if placed is not None:
            layer = report.layers[placed[0]]
            layer.change = layer.change + change
            layer.modules[kind] = layer.modules.get(kind, ZERO) + change
    return report


def _config(folder: Path) -> dict[str, Any]:
    """config.json where the folder has one (Checkpoint.open reports what is wrong with one that has not)."""
    return read_config(folder) if (folder / "config.json").is_file() else {}


def _name_filter(include: str | None, exclude: str | None) -> Any:
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise SurgeryError(f"--include/--exclude: not a regular expression ({e})") from None
    return lambda name: (inc is None or inc.search(name) is not None) and (exc is None or exc.search(name) is None)


def _layout(checkpoint: Checkpoint, report: DiffReport) -> Layout | None:
    try:
        return find_layout(checkpoint.config, checkpoint.tensors, where=str(checkpoint.path))
    except SurgeryError as e:
        report.notes.append(f"no layer view: {e}")
        return None


def _pair(
    a: Checkpoint, b: Checkpoint, a_layout: Layout | None, b_layout: Layout | None,
    comparer: ByteComparer, sketches: Sketches, report: DiffReport,
) -> tuple[list[tuple[str, str]], set[str], set[str]]:
    """(B name, A name) pairs; A and B names left without a partner."""
    if a_layout is None or b_layout is None:
        common = [n for n in b.tensors if n in a.tensors]
        return [(n, n) for n in common], set(a.tensors) - set(common), set(b.tensors) - set(common)
    a_outside, a_layers = a_layout.group(a.tensors)
    b_outside, b_layers = b_layout.group(b.tensors)
    pairs = [(n, n) for n in b_outside if n in a_outside]
    unpaired_a = set(a_outside) - set(b_outside)
    unpaired_b = set(b_outside) - set(a_outside)
    matcher = _LayerMatcher(a_layers, comparer, sketches)
    used: set[int] = set()
    for j, layer in enumerate(b_layers):
        match = matcher.identical(j, layer)
        source, similarity = (match, 1.0) if match is not None else matcher.closest(layer)
        report.layers.append(LayerReport(j, match, source, similarity))
        if source is None:
            unpaired_b.update(b_layout.layer_name(j, s) for s in layer)
            continue
        used.add(source)
        for suffix in layer:
            if suffix in a_layers[source]:
                pairs.append((b_layout.layer_name(j, suffix), a_layout.layer_name(source, suffix)))
            else:
                unpaired_b.add(b_layout.layer_name(j, suffix))
        unpaired_a.update(a_layout.layer_name(source, s) for s in a_layers[source] if s not in layer)
    for i in set(range(len(a_layers))) - used:
        unpaired_a.update(a_layout.layer_name(i, s) for s in a_layers[i])
    return pairs, unpaired_a, unpaired_b


Signature = tuple[tuple[str, Any], ...]


class _LayerMatcher:
    """Which layer of A a layer of B is: the same bytes, else the most similar weights. Lookups on
    fingerprints and one matrix product per shape group, so a model's layers are not compared all
    against all."""

    def __init__(self, a_layers: list[dict[str, TensorInfo]], comparer: ByteComparer, sketches: Sketches) -> None:
        self.a_layers, self.comparer, self.sketches = a_layers, comparer, sketches
        self._by_fingerprints: dict[Signature, list[int]] = {}
        self._by_shapes: dict[Signature, list[int]] = {}
        for i, layer in enumerate(a_layers):
            self._by_fingerprints.setdefault(self._fingerprints(layer), []).append(i)
            self._by_shapes.setdefault(_shapes(layer), []).append(i)
        self._stacked: dict[Signature, np.ndarray] = {}

    def identical(self, j: int, layer: dict[str, TensorInfo]) -> int | None:
        """The layer of A with the same bytes in every tensor (index j first, when it qualifies)."""
        candidates = sorted(self._by_fingerprints.get(self._fingerprints(layer), []), key=lambda i: i != j)
        return next((i for i in candidates if self.comparer.all_identical(
            [(self.a_layers[i][suffix], info) for suffix, info in layer.items()])), None)

    def closest(self, layer: dict[str, TensorInfo]) -> tuple[int | None, float | None]:
        """The layer of A with the same tensor shapes whose weights point the same way (mean cosine
        of their samples over the matrices), or none below SIMILAR_ENOUGH; and that score."""
        shapes = _shapes(layer)
        group = self._by_shapes.get(shapes)
        if group is None:
            return None, None
        matrices = _sketched(layer)
        if shapes not in self._stacked:
            self._stacked[shapes] = np.stack([self.sketches(tuple(self.a_layers[i][s] for s in matrices)) for i in group])
        scores = self._stacked[shapes] @ self.sketches(tuple(layer[s] for s in matrices))
        best = int(np.argmax(scores))  # the first of equal scores, in A's order
        score = float(scores[best])
        return (group[best], score) if score >= SIMILAR_ENOUGH else (None, score)

    def _fingerprints(self, layer: dict[str, TensorInfo]) -> Signature:
        return tuple(sorted((suffix, self.comparer.fingerprint(info)) for suffix, info in layer.items()))


def _shapes(layer: dict[str, TensorInfo]) -> Signature:
    return tuple(sorted((suffix, info.shape) for suffix, info in layer.items()))


def _sketched(layer: dict[str, TensorInfo]) -> list[str]:
    """The tensors whose samples stand for a layer in similarity: its matrices (all, when it has none)."""
    return sorted(s for s, t in layer.items() if len(t.shape) >= 2) or sorted(layer)
