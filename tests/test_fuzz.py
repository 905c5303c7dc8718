"""Property-based fuzzing of the two parsers that read untrusted input: safetensors headers and plans.

Whatever the bytes, `read_shard_header` and `load_plan` either return or raise one SurgeryError
line; nothing else escapes. When a header is accepted, its byte ranges are inside the file, tile
the data area, match dtype x shape, and `safetensors.safe_open` accepts the same file.

Reproducible: derandomized, no example database. Each test counts its examples and asserts the
target was reached; `pytest -s tests/test_fuzz.py` prints the counts.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.checkpoint.reader import DTYPE_SIZES, numel, read_shard_header
from surgery.errors import SurgeryError
from surgery.plan.load import load_plan
from surgery.plan.schema import Plan

# Examples per strategy: 6,000 in all, about 30 s on two cores (most of it generating inputs).
EXAMPLES = {"header_bytes": 1500, "header_length": 1000, "header_near_valid": 1200,
            "plan_text": 1000, "plan_soup": 700, "plan_structured": 600}

FUZZ = dict(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def _run(examples: int, strategy: st.SearchStrategy[Any], check: Callable[[Any], str]) -> Counter[str]:
    """Run `check` on `examples` generated inputs; count the outcomes it reports."""
    outcomes: Counter[str] = Counter()

    @settings(max_examples=examples, **FUZZ)
    @given(strategy)
    def run(value: Any) -> None:
        outcomes[check(value)] += 1

    run()
    return outcomes


def _one_line_error(error: SurgeryError, path: Path) -> None:
    message = str(error)
    assert len(message.splitlines()) == 1 and message.strip(), repr(message)
    assert str(path) in message, message


# --- safetensors headers -----------------------------------------------------------------------


def _frame(header: bytes, data_len: int, declared: int | None = None) -> bytes:
    length = len(header) if declared is None else declared
    return struct.pack("<Q", length % 2**64) + header + bytes(data_len)


@st.composite
def _tensor_layout(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A valid header dict (tensors tiling the data area in a shuffled key order) and its data size."""
    count = draw(st.integers(0, 5))
    names = draw(st.lists(st.text(max_size=6), min_size=count, max_size=count, unique=True))
    header: dict[str, Any] = {}
    at = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = numel(tuple(shape)) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    order = draw(st.permutations(list(header)))
    return {k: header[k] for k in order}, at


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=4),
    st.lists(st.integers(-3, 70), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = ("dtype", "shape", "data_offsets")


@st.composite
def _near_valid_shard(draw: st.DrawFn) -> bytes:
    """A valid layout, then zero or more mutations of the kinds real corruption and hostile files have."""
    header, data_len = draw(_tensor_layout())
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from([
            "field", "drop_field", "offsets", "swap", "dtype", "shape", "metadata", "entry", "bad_name", "extra_key",
        ]))
        if mutation == "metadata":
            header["__metadata__"] = draw(JUNK)
        elif mutation == "bad_name":
            header[draw(st.sampled_from(["\ud800", "a\udfff", "\n", ""]))] = draw(st.sampled_from(list(header.values()) or [{}]))
        elif not names:
            continue
        else:
            name = draw(st.sampled_from(names))
            entry = header[name] = dict(header[name]) if isinstance(header[name], dict) else {}
            if mutation == "field":
                entry[draw(st.sampled_from(FIELDS))] = draw(JUNK)
            elif mutation == "drop_field":
                entry.pop(draw(st.sampled_from(FIELDS)), None)
            elif mutation == "offsets":
                entry["data_offsets"] = [draw(st.integers(-2, data_len + 8)) for _ in range(draw(st.integers(0, 3)))]
            elif mutation == "swap" and isinstance(entry.get("data_offsets"), list):
                entry["data_offsets"] = entry["data_offsets"][::-1]
            elif mutation == "dtype":
                entry["dtype"] = draw(st.sampled_from(["F8_E8M0", "C64", "I4", "f32", "", "BF16", "U64", "BOOL"]))
            elif mutation == "shape":
                entry["shape"] = draw(st.lists(st.one_of(st.integers(-1, 5), st.booleans(), st.floats(0, 3)), max_size=3))
            elif mutation == "entry":
                header[name] = draw(JUNK)
            elif mutation == "extra_key":
                entry["extra"] = draw(JUNK)
    text = json.dumps(header, ensure_ascii=draw(st.booleans()), allow_nan=True)
    raw = text.encode("utf-8", "surrogatepass") + b" " * draw(st.integers(0, 7))
    framed = _frame(raw, max(0, data_len + draw(st.sampled_from([0, 0, 0, 1, 8, -1, -4]))))
    cut = draw(st.sampled_from([None, None, None, "cut"]))
    if cut:
        framed = framed[: draw(st.integers(0, len(framed)))]
    return framed + draw(st.sampled_from([b"", b"", b"\0", b"\0" * 4]))


@st.composite
def _declared_length(draw: st.DrawFn) -> bytes:
    """Arbitrary header bytes behind a declared length that is right, close, or absurd."""
    body = draw(st.binary(max_size=64) | st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")))
    declared = draw(st.sampled_from([len(body), len(body) + 1, max(0, len(body) - 1), 2**63, 2**64 - 1, 100 * 2**20]))
    return _frame(body, draw(st.integers(0, 16)), declared)


def _header_check(tmp: Path) -> Callable[[bytes], str]:
    path = tmp / "model.safetensors"

    def check(content: bytes) -> str:
        path.write_bytes(content)
        try:
            shard = read_shard_header(path)
        except SurgeryError as e:
            _one_line_error(e, path)
            return "refused"
        size = len(content)
        (header_len,) = struct.unpack("<Q", content[:8])
        at = 8 + header_len
        for info in sorted(shard.tensors.values(), key=lambda t: (t.start, t.end)):
            assert info.start == at <= info.end <= size, (info, at, size)  # inside, no overlap, no gap
            assert info.nbytes == numel(info.shape) * DTYPE_SIZES[info.dtype]
            at = info.end
        assert at == size  # nothing after the last tensor
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in shard.metadata.items())
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # the library agrees the file is valid
            assert set(f.keys()) == set(shard.tensors)
        return "accepted"

    return check


def _report(name: str, outcomes: Counter[str], target: int) -> None:
    print(f"\n{name}: {sum(outcomes.values())} examples ({dict(outcomes)})")
    assert sum(outcomes.values()) >= target, outcomes


def test_header_fuzz_arbitrary_bytes(tmp_path):
    n = EXAMPLES["header_bytes"]
    _report("header, arbitrary bytes", _run(n, st.binary(max_size=256), _header_check(tmp_path)), n)


def test_header_fuzz_declared_length(tmp_path):
    n = EXAMPLES["header_length"]
    _report("header, declared length + arbitrary bytes", _run(n, _declared_length(), _header_check(tmp_path)), n)


def test_header_fuzz_near_valid(tmp_path):
    n = EXAMPLES["header_near_valid"]
    outcomes = _run(n, _near_valid_shard(), _header_check(tmp_path))
    _report("header, near-valid structures", outcomes, n)
    assert outcomes["accepted"] >= n // 10 and outcomes["refused"] >= n // 4, outcomes  # both paths reached


# --- plans -------------------------------------------------------------------------------------

TOKENS = [
    "model: m", "output: o", "steps:", "- op: chain", "  layers: [0-2]", "layers:", "- {layers: 0-1}", "op:", "chain",
    "ties", "models:", "- model: a", "  weight: 0.5", "base: b", "evaluate:", "&a", "*a", "&b [*a, *a, *a]", "*b",
    "<<: *a", "[", "]", "{", "}", ":", ",", "- ", "? ", "|", ">", "'", '"', "#", "!!python/object:os.system", "!!int",
    "!!timestamp", "!!binary", "!!set", "!foo", "%YAML 1.1", "---", "...", "\t", "\n", "  ", "    ", "0-2", "-1",
    "1e999", "~", "null", "true", "\x07", "\ufeff", "é", "\U0001f600", "\\", "scale: {o_proj: 0.5}", "density: 2",
]


@st.composite
def _yaml_soup(draw: st.DrawFn) -> str:
    """Lines of plan-like tokens: reaches the scanner, parser, composer and validator error paths."""
    return "".join(draw(st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=40)))


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=True), st.text(max_size=6),
    st.sampled_from(["chain", "ties", "task_arithmetic", "0-2", "5-2", "m", "o", "o_proj", "demo:code", "a-b"]),
)
NAMES = st.sampled_from(["m", "a", "b", "demo:code"])
LAYERS = st.one_of(SCALARS, st.lists(st.one_of(
    st.integers(-1, 7), st.sampled_from(["0-2", "5-2", "a", "1-1"]),
    st.fixed_dictionaries({"layers": st.sampled_from(["0-1", 3, []])}, optional={"model": NAMES, "scale": SCALARS}),
), max_size=3))
GOOD_STEP = st.one_of(
    st.fixed_dictionaries({"op": st.just("chain"), "layers": st.lists(st.integers(0, 7) | st.sampled_from(["0-2", "3-5"]),
                                                                       min_size=1, max_size=4)}),
    st.fixed_dictionaries({"op": st.sampled_from(["ties", "task_arithmetic"]),
                           "models": st.lists(st.fixed_dictionaries({"model": NAMES}), min_size=1, max_size=2)}),
)
RANDOM_STEP = st.fixed_dictionaries(
    {"op": st.sampled_from(["chain", "ties", "task_arithmetic", "lines", "tie", "bits", "chian", ""])},
    optional={
        "layers": LAYERS,
        "models": st.lists(st.fixed_dictionaries({"model": NAMES}, optional={"weight": SCALARS}), max_size=2) | SCALARS,
        "density": SCALARS, "lambda": SCALARS, "alpha": SCALARS, "loops": SCALARS,
        "scale": st.dictionaries(st.sampled_from(["o_proj", "down_proj", ""]), SCALARS, max_size=2),
        "layres": SCALARS,
    },
)
STEP = GOOD_STEP | GOOD_STEP | RANDOM_STEP
PLAN = st.fixed_dictionaries(
    {"model": NAMES, "output": st.just("o"), "steps": st.lists(STEP, min_size=1, max_size=2)},
    optional={"base": NAMES | SCALARS, "modle": SCALARS, "evaluate": st.dictionaries(st.sampled_from(["data", "max_tokens"]),
                                                                                        SCALARS, max_size=2)},
)
MUTATED = st.fixed_dictionaries({}, optional={
    "model": NAMES | SCALARS, "output": SCALARS, "steps": st.lists(STEP, max_size=2) | SCALARS, "base": SCALARS,
    "push": st.dictionaries(st.sampled_from(["repo", "private"]), SCALARS, max_size=2), "": SCALARS,
})


@st.composite
def _plan_like(draw: st.DrawFn) -> str:
    """A YAML dump of plan-shaped data; shared containers become anchors and aliases (PyYAML dumps
    an object met twice that way), and sometimes a container refers to itself (a recursive alias)."""
    tree: Any = draw(st.one_of(PLAN, PLAN, PLAN, MUTATED, st.lists(SCALARS, max_size=2), SCALARS))
    containers: list[Any] = []

    def collect(node: Any) -> None:
        if isinstance(node, (list, dict)):
            containers.append(node)
            for child in list(node.values() if isinstance(node, dict) else node):
                collect(child)

    collect(tree)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        source, target = draw(st.sampled_from(containers or [[]])), draw(st.sampled_from(containers or [[]]))
        if isinstance(target, list):
            target.append(source)
        else:
            target[draw(st.sampled_from(["layers", "models", "steps", "scale", "x"]))] = source
    return yaml.safe_dump(tree, default_flow_style=draw(st.sampled_from([None, True, False])), allow_unicode=True)


def _plan_check(tmp: Path) -> Callable[[bytes | str], str]:
    path = tmp / "plan.yaml"

    def check(content: bytes | str) -> str:
        path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
        try:
            plan = load_plan(path)
        except SurgeryError as e:
            _one_line_error(e, path)
            return "refused"
        assert isinstance(plan, Plan)
        return "loaded"

    return check


def test_plan_fuzz_arbitrary_text(tmp_path):
    n = EXAMPLES["plan_text"]
    text = st.text(max_size=200) | st.binary(max_size=200)
    _report("plan, arbitrary text and bytes", _run(n, text, _plan_check(tmp_path)), n)


def test_plan_fuzz_yaml_soup(tmp_path):
    n = EXAMPLES["plan_soup"]
    _report("plan, YAML token soup", _run(n, _yaml_soup(), _plan_check(tmp_path)), n)


def test_plan_fuzz_structured(tmp_path):
    n = EXAMPLES["plan_structured"]
    outcomes = _run(n, _plan_like(), _plan_check(tmp_path))
    _report("plan, structured YAML with aliases", outcomes, n)
    assert outcomes["loaded"] >= n // 20 and outcomes["refused"] >= n // 4, outcomes  # both paths reached
