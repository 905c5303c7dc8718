"""Read a plan file: safe YAML, pydantic validation, and errors that point at the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from surgery.errors import SurgeryError
from surgery.plan.schema import OPS, Plan

MAX_PLAN_BYTES = 1024 * 1024


def load_plan(path: str | Path) -> Plan:
    """Parse and validate a plan; any problem is one SurgeryError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SurgeryError(f"plan {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"plan {path}: cannot read as text ({e})") from e
    if len(text) > MAX_PLAN_BYTES:
        raise SurgeryError(f"plan {path}: larger than {MAX_PLAN_BYTES} bytes; a plan is a short YAML file")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SurgeryError(f"{path}{line}: malformed YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SurgeryError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: a plan is a YAML mapping with 'model', 'output' and 'steps'")
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        raise SurgeryError(f"{path}:{_line_of(root, loc)}: {_where(loc)}{_message(first)}") from None


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling; see docs/plans.md for the fields of each op)"
    if error["type"] == "missing":
        return "required field is missing"
    msg: str = error["msg"]
    return msg.removeprefix("Value error, ")


def _where(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in OPS or "[" in str(part):  # pydantic's union tags, not user fields
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
