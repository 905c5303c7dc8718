"""Is the edited model what the plan says? Checked with transformers' own classes before writing.

A plan that changes the layer structure is verified: the output model is built from the output
config on the meta device, every output layer must be built as its source layer was (same module
classes, same settings such as the attention window), and the tensors the plan writes must load
into it with nothing missing, unexpected or mismatched that the source itself did not have. Any
difference is a refusal naming the output layer and the config rule. A model type transformers does
not ship is edited only where no per-layer rule is involved, and the result says it was not verified.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from surgery.architecture.structure import (
    Problem,
    build_on_meta,
    config_object,
    layer_list,
    layer_signature,
    loading_problems,
    model_class,
    normalized,
    signature_difference,
)
from surgery.architecture.verdicts import passed_before, remember_pass, verdict_key
from surgery.checkpoint.config import rule_settings
from surgery.errors import SurgeryError
from surgery.recipe.view import ModelView


@dataclass(frozen=True)
class Verification:
    """Whether the output's structure was checked against transformers, and how, in one line."""

    verified: bool
    note: str


UNCHANGED = Verification(True, "layer structure unchanged")  # nothing to check: the layers stay in place


def structure_changed(view: ModelView, sources: Mapping[str, ModelView]) -> bool:
    """Whether the plan moves, drops, repeats or brings in layers (a merge or a rescale does not)."""
    origins = [(layer.origin.model, layer.origin.index) for layer in view.layers]
    label = origins[0][0] if origins else view.label
    return label not in sources or origins != [(label, i) for i in range(len(sources[label].layers))]


def verify(view: ModelView, sources: Mapping[str, ModelView]) -> Verification:
    """Check the model `view` computes against transformers; raise SurgeryError where it differs."""
    if not view.layers or not structure_changed(view, sources):  # an ensemble computes no model of its own
        return UNCHANGED
    key = verdict_key(view, sources)
    note = passed_before(key)
    if note is not None:
        return Verification(True, note)
    verification = _verify(view, sources)
    remember_pass(key, verification.note)
    return verification


def _verify(view: ModelView, sources: Mapping[str, ModelView]) -> Verification:
    import transformers

    from surgery.evaluation.models import quiet_transformers

    config = view.config()
    cls = model_class(config)
    if cls is None:
        return _unverified(view, config)
    with quiet_transformers():
        built = _Built(cls, config, view)
        labels = sorted({layer.origin.model for layer in view.layers})
        sources_built = {label: _source_built(cls, sources[label]) for label in labels}
        for label, source in sources_built.items():
            _check_layers(view, built, label, source)
        _check_loading(view, built, sources_built.values())
    return Verification(True, f"structure checked against transformers {transformers.__version__}'s {cls.__name__}")


class _Built:
    """A config's model on the meta device, its layers' signatures and its loading report."""

    def __init__(self, cls: type, config: dict[str, Any], view: ModelView) -> None:
        self.model = build_on_meta(cls, config_object(config))
        first = view.layout.layer_name(0, next(iter(view.layers[0].tensors)))
        layers = layer_list(self.model, view.layout.prefix, first)
        self.signatures = [layer_signature(layer) for layer in layers]
        self.problems = loading_problems(self.model, {name: r.shape for name, r in view.tensors().items()})


_SOURCES: dict[tuple[str, str, str, str], _Built] = {}


def _source_built(cls: type, source: ModelView) -> _Built:
    """A source's build, kept for the process: `check` then `apply`, or a notebook's runs, reuse it."""
    config = source.config()
    shapes = sorted((name, r.shape) for name, r in source.tensors().items())
    key = (cls.__qualname__, source.layout.prefix, json.dumps(config, sort_keys=True, default=str), repr(shapes))
    if key not in _SOURCES:
        if len(_SOURCES) >= 8:
            _SOURCES.pop(next(iter(_SOURCES)))
        _SOURCES[key] = _Built(cls, config, source)
    return _SOURCES[key]


def _check_layers(view: ModelView, built: _Built, label: str, source: _Built) -> None:
    if len(built.signatures) != len(view.layers):
        raise SurgeryError(f"transformers would build {len(built.signatures)} layers from the output config where the "
                           f"plan writes {len(view.layers)}: this architecture's layer count is set by more than "
                           f"{view.layout.count_key}, so surgery cannot change it")
    for position, layer in enumerate(view.layers):
        if layer.origin.model != label:
            continue
        difference = signature_difference(built.signatures[position], source.signatures[layer.origin.index])
        if difference is None:
            continue
        rules = "; ".join(rule_settings(view.source.config, view.layout.config_path))
        if difference.in_modules:
            why = (f"the config decides each layer's kind ({rules}), so keep layers of each kind where it puts that kind"
                   if rules else "transformers builds this layer by its position, so it cannot move there")
        else:
            why = ("transformers derives that setting from the layer's position or the layer count"
                   + (f" (or {rules})" if rules else "") + ", so this edit cannot be exact for this architecture")
        raise SurgeryError(f"output layer {position} (from {label} layer {layer.origin.index}) would not be built as "
                           f"its source layer: {difference.text}; {why}")


def _check_loading(view: ModelView, built: _Built, sources: Iterable[_Built]) -> None:
    """Loading problems the sources have too (a tensor transformers ignores) are not the edit's."""
    prefix = view.layout.prefix
    known = {(p.kind, normalized(p.name, prefix)) for source in sources for p in source.problems}
    new = sorted((p for p in built.problems if (p.kind, normalized(p.name, prefix)) not in known),
                 key=lambda p: (p.kind, p.name))
    if new:
        raise SurgeryError(f"transformers would not load the output as the plan says: {_describe(new[0], view)}"
                           + (f" (and {len(new) - 1} more)" if len(new) > 1 else ""))


def _describe(problem: Problem, view: ModelView) -> str:
    placed = view.layout.split(problem.name)
    where = ""
    if placed is not None and placed[0] < len(view.layers):
        origin = view.layers[placed[0]].origin
        where = f"output layer {placed[0]} (from {origin.model} layer {origin.index}): "
    if problem.kind == "missing":
        return f"{where}it builds {problem.name} but the plan writes no such tensor"
    if problem.kind == "unexpected":
        return f"{where}the plan writes {problem.name} but it builds no such tensor"
    return f"{where}{problem.name} is {problem.detail}"


def _unverified(view: ModelView, config: dict[str, Any]) -> Verification:
    model_type = config.get("model_type")
    rules = rule_settings(view.source.config, view.layout.config_path)
    if rules:
        raise SurgeryError(
            f"model type {model_type!r} is not one transformers ships, so surgery cannot check how its per-layer "
            f"settings ({'; '.join(rules)}) build the new layer order; only edits that keep the layers in place work"
        )
    return Verification(False, f"not verified: transformers has no class for model type {model_type!r}; "
                               "only the layer count changed in its config")
