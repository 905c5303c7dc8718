"""A mergekit config as it is: translated into the surgery plan that makes the same model, or refused in one
line naming the key or value that has no exact translation.

mergekit's semantics, read from mergekit 0.1.5's code (config.py, plan.py, parameter_resolver.py and
merge_methods/):
- a parameter is resolved per tensor from the most specific level that has a value for it: the input
  model's own `parameters`, the slice's, the config's; a list of conditions none of whose filters is part
  of the tensor's name falls through to the next level, and then to the method's default;
- the `models:` form adds `base_model` to the inputs when it is not listed; a slice's sources are its
  inputs as they are;
- the config and tokenizer come from `base_model` (else a model of mergekit's choosing); passthrough's
  tensors before the layers come from the first slice, those after from the last.
Where surgery's defaults differ from mergekit's (ties' density), the translation writes mergekit's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, get_args

import yaml
from pydantic import TypeAdapter, ValidationError

from surgery.errors import SurgeryError
from surgery.ops.task_vectors import OutDtype

Loc = tuple[str | int, ...]
_REQUIRED = object()


class Untranslatable(SurgeryError):
    """A key or value of a mergekit config that has no exact translation; `loc` is where it is."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc


@dataclass(frozen=True)
class Param:
    """A mergekit parameter of one method: surgery's field for it (None: no field, see `inert`), its type
    and mergekit's default."""

    field: str | None
    kind: type = float
    default: Any = _REQUIRED
    inert: bool = False  # mergekit takes it but the values do not depend on it (int8_mask): left out
    write_default: bool = False  # surgery's default differs: write mergekit's where no level sets it


@dataclass(frozen=True)
class Method:
    """How a mergekit method maps onto a surgery op: the base's role, and its parameters."""

    op: str
    base: str  # "required" | "optional" (task vectors when given) | "merged" (one of the inputs) | "slerp"
    shared: dict[str, Param]
    per_model: dict[str, Param] = field(default_factory=dict)
    paths_only: bool = False  # the op lists bare paths (sce)


def _task_family(op: str, normalize: bool, rescale: bool, trims: bool = True, **extra: Param) -> Method:
    inert = not trims  # task_arithmetic trims nothing: density and rescale change nothing in mergekit
    return Method(op, "required", {
        "int8_mask": Param(None, bool, False, inert=True),
        "normalize": Param("normalize", bool, normalize),
        "rescale": Param(None if inert else "rescale", bool, rescale, inert=inert),
        "lambda": Param("lambda", float, 1.0),
    }, {"weight": Param("weight"),
        "density": Param(None if inert else "density", float, 1.0, inert=inert, write_default=trims), **extra})


_GAMMA = Param("gamma", float, 0.01)
_EPSILON = Param("epsilon", float, 0.15)
METHODS: dict[str, Method] = {
    "task_arithmetic": _task_family("task_arithmetic", False, False, trims=False),
    "ties": _task_family("ties", True, False),
    "dare_ties": _task_family("dare_ties", False, True),
    "dare_linear": _task_family("dare_linear", False, True),
    "breadcrumbs": _task_family("breadcrumbs", False, False, gamma=_GAMMA),
    "breadcrumbs_ties": _task_family("breadcrumbs_ties", False, False, gamma=_GAMMA),
    "della": _task_family("della", True, True, epsilon=_EPSILON),
    "della_linear": _task_family("della_linear", False, True, epsilon=_EPSILON),
    "sce": Method("sce", "required", {"int8_mask": Param(None, bool, False, inert=True),
                                      "select_topk": Param("select_topk", float, 1.0)}, paths_only=True),
    "linear": Method("linear", "merged", {"normalize": Param("normalize", bool, True)}, {"weight": Param("weight")}),
    "slerp": Method("slerp", "slerp", {"t": Param("t")}),
    "nuslerp": Method("nuslerp", "optional", {"nuslerp_row_wise": Param("row_wise", bool, False),
                                              "nuslerp_flatten": Param("flatten", bool, True)},
                      {"weight": Param("weight")}),
    "multislerp": Method("multislerp", "optional", {"normalize_weights": Param("normalize_weights", bool, True),
                                                    "eps": Param(None, float, 1e-8)},
                         {"weight": Param("weight")}),
    "karcher": Method("karcher", "merged", {"max_iter": Param("max_iter", int, 10), "tol": Param("tol", float, 1e-5)}),
    "model_stock": Method("model_stock", "required", {"filter_wise": Param("filter_wise", bool, False)}),
}
# Every parameter name some mergekit method takes: one this method does not take changes nothing in mergekit
# (a note), any other is a typo (refused).
_KNOWN_PARAMETERS = {name for m in METHODS.values() for name in (*m.shared, *m.per_model)} | {
    "scale", "r", "alpha", "similarity_threshold"}
_UNSUPPORTED_METHODS = ("arcee_fusion", "nearswap", "ram", "ramplus_tl")
_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template")


@dataclass(frozen=True)
class Translation:
    """The surgery plan a mergekit config translates to, what the translation left out (notes), and what
    can only be checked against the models: slices that must cover every layer, passthrough's dtype."""

    plan: dict[str, Any]
    notes: tuple[str, ...] = ()
    whole_models: dict[str, int] = field(default_factory=dict)  # model -> the layer count its slice covers
    stored_dtype: str | None = None  # passthrough: the dtype every copied tensor must already have


def plan_yaml(plan: dict[str, Any]) -> str:
    """A translated plan as `surgery check` prints it, as a user would write it: steps and their model lists in
    block style, flat lists and mappings (a model entry, a condition) on one line."""

    def flat(value: Any) -> bool:
        return not isinstance(value, (dict, list)) or (isinstance(value, list) and all(map(_scalar, value)))

    class Dumper(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
            super().increase_indent(flow, False)  # lists indented under their key

    Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", items, flow_style=all(map(_scalar, items))))
    Dumper.add_representer(dict, lambda dumper, mapping: dumper.represent_mapping(
        "tag:yaml.org,2002:map", mapping, flow_style="op" not in mapping and all(map(flat, mapping.values()))))
    return yaml.dump(plan, Dumper=Dumper, sort_keys=False)


def _scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def is_mergekit_config(data: Any) -> bool:
    """A mapping with mergekit's `merge_method` and no surgery `steps`."""
    return isinstance(data, dict) and "merge_method" in data and "steps" not in data


def translate(config: dict[str, Any]) -> Translation:
    """The surgery plan that makes the model mergekit makes from `config`; Untranslatable otherwise."""
    _known_keys(config, _TOP_KEYS, ())
    method_name = config["merge_method"]
    notes: list[str] = []
    for key, why in (("modules", "per-module configs (multimodal models) are not translated; merge one stack "
                                 "with a surgery plan's 'stack:'"),
                     ("chat_template", "set the chat template in the output's tokenizer_config.json after the "
                                       "merge")):
        if config.get(key) is not None:
            raise Untranslatable((key,), why)
    tokenizer = _tokenizer_source(config)
    forms = [key for key in ("models", "slices") if config.get(key) is not None]
    if len(forms) != 1:
        raise Untranslatable((), "give exactly one of 'models' and 'slices' (as mergekit requires)")
    dtype = _dtype(config, "out_dtype") or _dtype(config, "dtype")
    base = _reference(config["base_model"], ("base_model",)) if config.get("base_model") is not None else None
    if method_name == "passthrough":
        if tokenizer is not None:
            raise Untranslatable(("tokenizer_source",), "passthrough's chain takes the first model's vocabulary as it "
                                 "is; remove it (and stack models of one vocabulary)")
        return _passthrough(config, base, dtype, notes)
    if not isinstance(method_name, str) or method_name not in METHODS:
        extra = (f"; surgery has no {method_name} merge yet" if method_name in _UNSUPPORTED_METHODS else "")
        raise Untranslatable(("merge_method",), f"unknown merge method {method_name!r}{extra}; surgery translates "
                             f"{', '.join([*METHODS, 'passthrough'])}")
    method = METHODS[method_name]
    global_parameters = _parameters(config.get("parameters"), ("parameters",))
    whole: dict[str, int] = {}
    if forms == ["models"]:
        inputs = _models(config["models"])
        if base is not None and all(ref != base for ref, _, _ in inputs):
            inputs.append((base, {}, ("base_model",)))  # mergekit adds the base to the inputs
        slice_parameters: dict[str, Any] = {}
    else:
        inputs, slice_parameters, slice_base, whole = _one_slice(config["slices"])
        base = slice_base or base
        if base is not None and method.base != "merged" and all(ref != base for ref, _, _ in inputs):
            raise Untranslatable(("slices", 0, "sources"), f"base_model {base} is not one of the slice's sources "
                                 "(mergekit requires it there)")
    _check_names(method_name, method, [(own, (*loc[:-1], "parameters"), True) for _, own, loc in inputs]
                 + [(slice_parameters, ("slices", 0, "parameters"), False), (global_parameters, ("parameters",), False)],
                 notes)
    step = _step(method_name, method, inputs, base, [slice_parameters, global_parameters], notes)
    if method_name.startswith(("dare", "della")):
        notes.append(f"mergekit's {method_name} drops at random, unseeded; surgery's drop is seeded (seed 0, recorded "
                     "in surgery.json): the same kept fraction and rescale, not the same entries")
    if dtype is not None:
        step["dtype"] = dtype
    if tokenizer is not None:
        step["tokenizer"] = tokenizer
    plan: dict[str, Any] = {}
    if base is not None:
        plan["model"] = base  # the config and tokenizer come from the base, as mergekit's do
        if method.base in ("required", "optional") or all(ref != base for ref, _, _ in inputs):
            plan["base"] = base
    plan["steps"] = [step]
    return Translation(plan, tuple(notes), whole)


def _step(method_name: str, method: Method, inputs: list[tuple[str, dict[str, Any], Loc]], base: str | None,
          shared_levels: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The surgery step: the merged models with their own parameters, and the shared ones."""
    if method.base in ("required", "slerp") and base is None:
        raise Untranslatable(("base_model",), f"merge_method {method_name} needs a base_model")
    merged = inputs if method.base == "merged" else [entry for entry in inputs if entry[0] != base]
    if method.base == "slerp":
        if len(merged) != 1:
            raise Untranslatable(("models",), "slerp merges base_model with exactly one other model")
        merged = [next(entry for entry in inputs if entry[0] == base), *merged]  # t = 0 is the base
    if not merged:
        raise Untranslatable(("models",), f"{method_name} needs models besides base_model")
    step: dict[str, Any] = {"op": method.op, "models": []}
    for name, param in method.shared.items():
        value = _resolved(name, param, [(level, ("parameters", name)) for level in shared_levels])
        if value is not None and param.field is not None:
            step[param.field] = value
    entries: list[Any] = []
    for ref, own, loc in merged:
        entry: dict[str, Any] = {"model": ref}
        for name, param in method.per_model.items():
            levels = [(own, (*loc[:-1], "parameters", name)), *((level, ("parameters", name)) for level in shared_levels)]
            value = _resolved(name, param, levels, who=ref)
            if value is None and param.write_default:
                value = param.default
            if value is not None and param.field is not None:
                entry[param.field] = value
        entries.append(ref if (method.paths_only or len(entry) == 1) else entry)
    step["models"] = entries
    return step


def _resolved(name: str, param: Param, levels: list[tuple[dict[str, Any], Loc]], who: str | None = None) -> Any:
    """One surgery value for a parameter set at several levels, most specific first: a number or gradient,
    or one list of conditions that falls through the levels as mergekit's resolution does. None where no
    level sets it and mergekit has a default (the surgery op's is the same, or `write_default` says)."""
    conditions: list[dict[str, Any]] = []
    last: Loc = levels[0][1]
    for level, loc in levels:
        if name not in level:
            continue
        last = loc
        for filter_, value in _cases(level[name], param, loc):
            if filter_ is None:
                if not conditions:
                    return _checked_default(param, value, loc)
                return [*conditions, {"value": value}]
            if param.kind is not float:
                raise Untranslatable(loc, f"a {param.kind.__name__} parameter with filters: surgery takes one "
                                          "value for the whole model")
            conditions.append({"filter": filter_, "value": value})
    if conditions and param.field is None and not param.inert:
        raise Untranslatable(last, f"'{name}' with filters: surgery uses mergekit's default {param.default} only")
    if not conditions:
        if param.default is _REQUIRED:
            what = f" for {who}" if who is not None else ""
            raise Untranslatable(last, f"mergekit needs '{name}'{what}; give it under parameters")
        return None
    if param.default is _REQUIRED:
        raise Untranslatable(last, f"'{name}': its filters leave some tensors without a value, where mergekit "
                                   "stops; add a last condition without a filter, e.g. {value: 1}")
    return [*conditions, {"value": param.default}]


def _checked_default(param: Param, value: Any, loc: Loc) -> Any:
    """A parameter surgery has no field for takes mergekit's default only (or is inert)."""
    if param.field is None and not param.inert and value != param.default:
        raise Untranslatable(loc, f"surgery uses mergekit's default {param.default} only; remove it")
    return value


def _cases(setting: Any, param: Param, loc: Loc) -> list[tuple[str | None, Any]]:
    """A mergekit setting as (filter or None, value) pairs: a number or gradient is one unfiltered case."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(item, dict) for item in setting):
        cases = []
        for i, item in enumerate(setting):
            _known_keys(item, ("value", "filter"), (*loc, i))
            if "value" not in item:
                raise Untranslatable((*loc, i), "a condition needs a 'value'")
            filter_ = item.get("filter")
            if filter_ is not None and not isinstance(filter_, str):
                raise Untranslatable((*loc, i, "filter"), "a filter is a part of a tensor name, e.g. self_attn")
            cases.append((None if filter_ in (None, "*") else filter_, _value(item["value"], param, (*loc, i))))
        return cases
    return [(None, _value(setting, param, loc))]


def _value(value: Any, param: Param, loc: Loc) -> Any:
    """A number, a gradient or a flag, validated as mergekit validates it (pydantic, lax: '1e-3' is a number)."""
    if isinstance(value, list):
        if param.kind is not float:
            raise Untranslatable(loc, f"a gradient of a {param.kind.__name__} parameter: surgery takes one value")
        if not value:
            raise Untranslatable(loc, "an empty gradient; give numbers, e.g. [0, 0.5, 1]")
        return [_value(item, param, loc) for item in value]
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and param.kind is not bool):
        raise Untranslatable(loc, f"{value!r} is not a {param.kind.__name__}")
    try:
        checked = TypeAdapter(param.kind).validate_python(value)
    except ValidationError:
        raise Untranslatable(loc, f"{value!r} is not a {param.kind.__name__}") from None
    if isinstance(checked, float) and not math.isfinite(checked):
        raise Untranslatable(loc, f"{value!r} is not a finite number")
    return checked


def _check_names(method_name: str, method: Method, levels: list[tuple[dict[str, Any], Loc, bool]],
                 notes: list[str]) -> None:
    """A typo is refused; a parameter this method does not take, or takes with no effect, is left out with a
    note, and so is a shared one set on one model (mergekit reads those from the slice and the config only)."""
    for level, loc, own in levels:
        for name in level:
            where = _where((*loc, name))
            _known_parameter(name, (*loc, name))
            param = method.per_model.get(name) or method.shared.get(name)
            if param is None:
                notes.append(f"mergekit's {method_name} takes no '{name}' ({where}): left out")
            elif param.inert:
                notes.append(f"'{name}' changes nothing in mergekit's {method_name} ({where}): left out")
            elif own and name not in method.per_model:
                notes.append(f"mergekit reads '{name}' from the slice and the config only, not one model ({where}): "
                             "left out")


def _models(models: Any) -> list[tuple[str, dict[str, Any], Loc]]:
    """The `models:` form's inputs: (reference, own parameters, where)."""
    if not isinstance(models, list) or not models:
        raise Untranslatable(("models",), "a list of {model: ..., parameters: ...} entries")
    inputs = []
    for i, item in enumerate(models):
        loc: Loc = ("models", i)
        if not isinstance(item, dict):
            raise Untranslatable(loc, "each model is a mapping {model: NAME, parameters: {...}}")
        _known_keys(item, ("model", "parameters"), loc)
        if "model" not in item:
            raise Untranslatable(loc, "no 'model'")
        inputs.append((_reference(item["model"], (*loc, "model")), _parameters(item.get("parameters"),
                                                                                 (*loc, "parameters")), (*loc, "model")))
    _no_repeats(inputs)
    return inputs


def _one_slice(slices: Any) -> tuple[list[tuple[str, dict[str, Any], Loc]], dict[str, Any], str | None, dict[str, int]]:
    """A merge's slices: one slice whose sources all take one layer range, which must start at 0 (and, checked
    against the models, cover all their layers)."""
    if not isinstance(slices, list) or not slices:
        raise Untranslatable(("slices",), "a list of slices, each {sources: [...]}")
    if len(slices) > 1:
        raise Untranslatable(("slices",), "a merge over several slices is not translated: surgery merges whole "
                             "models; merge with one slice (or 'models:'), then reorder with a chain plan")
    output_slice = _slice(slices[0], 0)
    inputs, ranges = [], set()
    for j, source in enumerate(output_slice["sources"]):
        ref, first, stop, parameters = _source(source, (0, j))
        inputs.append((ref, parameters, ("slices", 0, "sources", j, "model")))
        ranges.add((first, stop))
    if len(ranges) > 1:
        raise Untranslatable(("slices", 0, "sources"), "the sources take different layer ranges; surgery merges "
                             "layer i with layer i")
    first, stop = ranges.pop()
    if first != 0:
        raise Untranslatable(("slices", 0, "sources", 0, "layer_range"), f"starts at layer {first}: surgery "
                             "merges whole models; give [0, LAYERS]")
    _no_repeats(inputs)
    base = _reference(output_slice["base_model"], ("slices", 0, "base_model")) \
        if output_slice.get("base_model") is not None else None
    parameters = _parameters(output_slice.get("parameters"), ("slices", 0, "parameters"))
    return inputs, parameters, base, {ref: stop for ref, _, _ in inputs}


def _passthrough(config: dict[str, Any], base: str | None, dtype: str | None, notes: list[str]) -> Translation:
    """Passthrough of one-source slices: a chain of the sources' layers."""
    if config.get("slices") is None:
        raise Untranslatable(("models",), "passthrough with 'models:' copies one model; give 'slices:' to stack layers")
    slices = config["slices"]
    if not isinstance(slices, list) or not slices:
        raise Untranslatable(("slices",), "a list of slices, each {sources: [...]}")
    if config.get("parameters"):
        _passthrough_parameters(config["parameters"], ("parameters",), notes)
    layers: list[dict[str, Any]] = []
    models = []
    for i, raw in enumerate(slices):
        output_slice = _slice(raw, i)
        if len(output_slice["sources"]) != 1:
            raise Untranslatable(("slices", i, "sources"), "passthrough takes one source per slice (as mergekit does)")
        _passthrough_parameters(output_slice.get("parameters"), ("slices", i, "parameters"), notes)
        ref, first, stop, parameters = _source(output_slice["sources"][0], (i, 0))
        _passthrough_parameters(parameters, ("slices", i, "sources", 0, "parameters"), notes)
        if stop <= first:
            raise Untranslatable(("slices", i, "sources", 0, "layer_range"), f"[{first}, {stop}] holds no layer")
        layers.append({"model": ref, "layers": f"{first}-{stop - 1}"})
        models.append(ref)
    if models[-1] != models[0]:
        raise Untranslatable(("slices", len(slices) - 1), f"mergekit takes the embeddings from the first slice's model "
                             f"({models[0]}) and the final norm and head from the last's ({models[-1]}); surgery takes "
                             "both from one model: end with a slice of the first model")
    if base is not None and base != models[0]:
        raise Untranslatable(("base_model",), f"{base} is not the first slice's model ({models[0]}); surgery takes "
                             "the config and the tensors outside the layers from that one")
    return Translation({"model": models[0], "steps": [{"op": "chain", "layers": layers}]}, tuple(notes),
                       stored_dtype=dtype)


def _known_parameter(name: str, loc: Loc) -> None:
    """A name no mergekit method takes is a typo (mergekit would ignore it): refused, with the nearest name."""
    if name not in _KNOWN_PARAMETERS:
        close = get_close_matches(name, sorted(_KNOWN_PARAMETERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise Untranslatable(loc, f"unknown mergekit parameter '{name}'{hint}")


def _passthrough_parameters(parameters: Any, loc: Loc, notes: list[str]) -> None:
    for name in _parameters(parameters, loc):
        if name == "scale":
            raise Untranslatable((*loc, name), "passthrough's scale is not translated; scale modules with a chain "
                                 "entry's 'scale: {o_proj: 0.5}' in a surgery plan")
        _known_parameter(name, (*loc, name))
        notes.append(f"mergekit's passthrough takes no '{name}' ({_where((*loc, name))}): left out")


def _slice(raw: Any, i: int) -> dict[str, Any]:
    loc: Loc = ("slices", i)
    if not isinstance(raw, dict):
        raise Untranslatable(loc, "each slice is a mapping {sources: [...]}")
    _known_keys(raw, ("sources", "base_model", "residual_weight", "parameters"), loc)
    if raw.get("residual_weight") is not None:
        raise Untranslatable((*loc, "residual_weight"), "not translated (mergekit 0.1.5 does not use it either); "
                             "remove it")
    if not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise Untranslatable(loc, "a slice needs 'sources', a list of {model: ..., layer_range: [FIRST, STOP]}")
    return raw


def _source(source: Any, at: tuple[int, int]) -> tuple[str, int, int, dict[str, Any]]:
    loc: Loc = ("slices", at[0], "sources", at[1])
    if not isinstance(source, dict):
        raise Untranslatable(loc, "each source is a mapping {model: NAME, layer_range: [FIRST, STOP]}")
    _known_keys(source, ("model", "layer_range", "parameters"), loc)
    for key in ("model", "layer_range"):
        if key not in source:
            raise Untranslatable(loc, f"no '{key}'")
    span = source["layer_range"]
    if (not isinstance(span, list) or len(span) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
            or min(span) < 0):
        raise Untranslatable((*loc, "layer_range"), "a layer range is [FIRST, STOP]: two layer numbers, STOP excluded")
    return (_reference(source["model"], (*loc, "model")), span[0], span[1],
            _parameters(source.get("parameters"), (*loc, "parameters")))


def _reference(value: Any, loc: Loc) -> str:
    """A mergekit model reference as surgery names it: `path` or `org/name@revision`; a LoRA is refused."""
    if isinstance(value, dict):
        _known_keys(value, ("model", "lora", "override_architecture"), loc)
        if value.get("lora") is not None:
            raise Untranslatable((*loc, "lora"), "a LoRA on a model is not translated; merge the adapter into it "
                                 "first (peft's merge_and_unload) and name that folder")
        if value.get("override_architecture") is not None:
            raise Untranslatable((*loc, "override_architecture"), "not translated; remove it")
        inner = value.get("model")
        if isinstance(inner, dict):
            _known_keys(inner, ("path", "revision"), (*loc, "model"))
            if not isinstance(inner.get("path"), str):
                raise Untranslatable((*loc, "model"), "a model is {path: NAME, revision: REV}")
            revision = inner.get("revision")
            return f"{inner['path']}@{revision}" if revision else inner["path"]
        value = inner
    if not isinstance(value, str) or not value.strip():
        raise Untranslatable(loc, "a model is a path or a Hub id (org/name, org/name@revision)")
    if "+" in value:
        raise Untranslatable(loc, f"{value!r} names a LoRA (model+lora), which is not translated; merge the adapter "
                             "into the model first (peft's merge_and_unload) and name that folder")
    if value.count("@") > 1:
        raise Untranslatable(loc, f"{value!r} has more than one @")
    return value


def _parameters(value: Any, loc: Loc) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise Untranslatable(loc, "parameters are a mapping of names to values")
    return value


def _tokenizer_source(config: dict[str, Any]) -> str | None:
    """mergekit's `tokenizer_source` (or `tokenizer: {source: ...}`) as a merge's `tokenizer:`: base, union or
    a model (surgery/ops/vocabulary.py builds each as mergekit does)."""
    if config.get("tokenizer_source") is not None and config.get("tokenizer") is not None:
        raise Untranslatable(("tokenizer",), "give one of tokenizer_source and tokenizer (as mergekit requires)")
    if isinstance(config.get("tokenizer"), dict):
        section = config["tokenizer"]
        _known_keys(section, ("source", "tokens", "pad_to_multiple_of"), ("tokenizer",))
        for key, why in (("tokens", "per-token embedding sources are not translated; surgery takes each new token's "
                                    "row from the models that have it"),
                         ("pad_to_multiple_of", "not translated; surgery keeps the embedding rows of the model whose "
                                                "tokenizer the output takes")):
            if section.get(key) is not None:
                raise Untranslatable(("tokenizer", key), why)
        source, loc = section.get("source"), ("tokenizer", "source")
    elif config.get("tokenizer") is not None:
        raise Untranslatable(("tokenizer",), "a mapping {source: base|union|MODEL}")
    else:
        source, loc = config.get("tokenizer_source"), ("tokenizer_source",)
    if source is None or source in ("base", "union"):
        return source
    return _reference(source, loc)


def _dtype(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in get_args(OutDtype):
        raise Untranslatable((key,), f"{value!r}: surgery writes float32, bfloat16 or float16")
    return name


def _no_repeats(inputs: list[tuple[str, dict[str, Any], Loc]]) -> None:
    seen: set[str] = set()
    for ref, _, loc in inputs:
        if ref in seen:
            raise Untranslatable(loc, f"{ref} is listed twice (mergekit refuses duplicate inputs)")
        seen.add(ref)


def _known_keys(mapping: dict[str, Any], known: tuple[str, ...], loc: Loc) -> None:
    """mergekit ignores keys it does not know; a misspelt one would change the merge unseen, so it is refused."""
    for key in mapping:
        if key not in known:
            close = get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"a mergekit config takes {', '.join(known)}"
            raise Untranslatable((*loc, key), f"unknown key; {hint}")


def _where(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
