"""Read a plan file: safe YAML, pydantic validation, and errors that point at the line."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from surgery.errors import SurgeryError, one_line
from surgery.ops.registry import registry
from surgery.plan.mergekit import Translation, Untranslatable, is_mergekit_config, translate
from surgery.plan.schema import Plan

MAX_PLAN_BYTES = 1024 * 1024
# A plan is a page of YAML. These bound what a hostile one can cost: nesting (the composer and
# pydantic recurse), and nodes after alias expansion ("billion laughs": a few lines of anchors
# that expand to 10^9 values when validated).
MAX_DEPTH = 64
MAX_NODES = 100_000


@dataclass(frozen=True)
class PlanFile:
    """A plan file read: the Plan, the text it was parsed from (what the card shows as the plan the user
    wrote) and, for a mergekit config, its translation."""

    plan: Plan
    text: str
    translation: Translation | None = None


def load_plan(path: str | Path) -> Plan:
    """Parse and validate a plan file (bounded, safe YAML; a surgery plan or a mergekit config) into a Plan.

    Returns the Plan; any problem is one SurgeryError naming file, line and field.
    """
    return read_plan(path).plan


def read_plan(path: str | Path) -> PlanFile:
    """The Plan a file holds, read once within the loader's bounds: a surgery plan, or a mergekit config
    translated into one (surgery/plan/mergekit.py)."""
    path = Path(path)
    data, root, text = _read_yaml(path)
    if data is None:
        raise SurgeryError(f"{path}: the plan is empty; a plan is a YAML mapping with 'model', 'output' and 'steps'")
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: a plan is a YAML mapping with 'model', 'output' and 'steps'")
    if is_mergekit_config(data):
        try:
            translation = translate(data)
        except Untranslatable as e:
            where = _where(e.loc)
            raise SurgeryError(one_line(f"{path}:{_line_of(root, e.loc)}: mergekit config: {where}{e}")) from None
        try:
            return PlanFile(Plan.model_validate(translation.plan), text, translation)
        except ValidationError as e:
            first = e.errors()[0]
            raise SurgeryError(one_line(f"{path}: mergekit config, translated: {_where(tuple(first['loc']))}"
                                        f"{_message(first)}")) from None
    try:
        return PlanFile(Plan.model_validate(data), text)
    except ValidationError as e:
        errors = e.errors()
        missing: dict[tuple[Any, ...], list[str]] = defaultdict(list)  # the missing fields beside each location
        for error in errors:
            if error["type"] == "missing":
                missing[tuple(error["loc"][:-1])].append(str(error["loc"][-1]))
        # An unknown field explains a missing one beside it (`layer:` for `layers:`): it is the one reported.
        first = next((error for error in errors if error["type"] == "extra_forbidden"
                      and tuple(error["loc"][:-1]) in missing), errors[0])
        loc = tuple(first["loc"])
        raise SurgeryError(one_line(f"{path}:{_line_of(root, loc)}: {_where(loc)}{_message(first, missing.get(loc[:-1]))}")) from None


def plan_line(path: Path, loc: tuple[Any, ...]) -> int:
    """The 1-based line of a key or item of a plan file that has loaded: where a later error points."""
    return _line_of(_read_yaml(path)[1], loc)


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None, str]:
    """Bounded, safe YAML: size, encoding, depth, alias expansion and tags are checked on the
    composed node graph before any Python object is built from it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise SurgeryError(f"plan {path} does not exist") from None
    except OSError as e:
        raise SurgeryError(f"plan {path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise SurgeryError(f"plan {path}: larger than {MAX_PLAN_BYTES} bytes; a plan is a short YAML file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SurgeryError(f"plan {path}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    loader = None
    try:
        loader = _BoundedLoader(text, path)  # checks the characters first
        root = loader.get_single_node()
        if root is None:
            return None, None, text
        _check_graph(root, path)
        return loader.construct_document(root), root, text
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        what = ", ".join(part for part in (e.context, e.problem) if part)
        raise SurgeryError(one_line(f"{path}{line}: malformed YAML: {what}")) from None
    except yaml.reader.ReaderError as e:
        raise SurgeryError(
            f"{path}: malformed YAML: character #x{e.character:04x} at offset {e.position} is not allowed in YAML"
        ) from None
    except yaml.YAMLError as e:
        raise SurgeryError(one_line(f"{path}: malformed YAML: {e}")) from None
    except RecursionError:  # a backstop: the depth limit stops nesting well before this
        raise SurgeryError(f"{path}: malformed YAML: nested too deeply") from None
    except (ValueError, TypeError, LookupError, AttributeError, OverflowError) as e:
        # PyYAML's constructors fail this way on explicit tags with bad values (`!!int abc`,
        # `!!timestamp x`, an empty `!!int`) and on integers of more than 4300 digits.
        detail = f" ({e})" if isinstance(e, ValueError) else ""
        raise SurgeryError(one_line(f"{path}: malformed YAML: a value cannot be read{detail}; check explicit "
                                     "!!tags and numbers")) from None
    finally:
        if loader is not None:
            loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_DEPTH, before Python's stack runs out."""

    def __init__(self, text: str, path: Path) -> None:
        super().__init__(text)
        self.plan_path = path
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise SurgeryError(f"{self.plan_path}:{line}: malformed YAML: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self.depth -= 1


# What SafeLoader builds, plus the merge key `<<` (resolved by the constructor, not a constructor of its own).
_SAFE_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag) | {"tag:yaml.org,2002:merge"}


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_graph(root: yaml.Node, path: Path) -> None:
    """Refuse recursive aliases, expansions past MAX_NODES or MAX_DEPTH, and tags SafeLoader has no
    constructor for (`!!python/object...`), in one iterative walk over distinct nodes: an alias is
    the same node object, so its expanded size is memoised and the walk is linear, not exponential."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    open_: set[int] = set()  # nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        line = node.start_mark.line + 1
        if finished:
            children = [done[id(c)] for c in _children(node)]
            size = 1 + sum(s for s, _ in children)
            depth = 1 + max((d for _, d in children), default=0)
            if size > MAX_NODES:
                raise SurgeryError(
                    f"{path}:{line}: plan too large: more than {MAX_NODES} YAML values once aliases are expanded"
                )
            if depth > MAX_DEPTH:
                raise SurgeryError(f"{path}:{line}: malformed YAML: nested deeper than {MAX_DEPTH} levels (aliases expanded)")
            done[key] = (size, depth)
            open_.discard(key)
            continue
        if key in done:
            continue
        if key in open_:
            raise SurgeryError(f"{path}:{line}: malformed YAML: an alias refers to its own anchor (recursive structure)")
        if node.tag not in _SAFE_TAGS:
            raise SurgeryError(
                one_line(f"{path}:{line}: malformed YAML: tag {node.tag!r} is not allowed; a plan is plain YAML "
                          "(no Python objects or custom tags)")
            )
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in done)



def _message(error: Any, missing: list[str] | None = None) -> str:
    if error["type"] == "extra_forbidden":
        close = get_close_matches(str(error["loc"][-1]), missing or [], n=1, cutoff=0.5)
        if close:
            return f"unknown field; did you mean '{close[0]}'?"
        return "unknown field (check the spelling; see docs/plans.md for the fields of each op)"
    if error["type"] == "too_short":
        least = error.get("ctx", {}).get("min_length", 1)
        return "is empty; give at least one" if least == 1 else f"has too few items; give at least {least}"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "finite_number":
        return f"{error.get('input')!r} is not a finite number; a plan's numbers are finite (.nan and .inf would write NaN)"
    msg: str = error["msg"]
    return msg.removeprefix("Value error, ")


def _where(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in registry() or "[" in str(part):  # pydantic's union tags, not user fields
            continue
        else:
            text += f".{part}" if text else str(part)
    return f"{text}: " if text else ""


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """1-based line of the YAML key or item at a pydantic error location (or its nearest parent).

    Parts of `loc` that are not in the document (pydantic's union tags) are skipped.
    """
    if node is None:
        return 1
    mark = node.start_mark
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == part), None)
            if pair is not None:
                mark, node = pair[0].start_mark, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
    return mark.line + 1
