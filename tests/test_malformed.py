"""A corpus of malformed inputs, each refused through the real CLI the same way.

Every case builds one bad checkpoint folder or plan file from the tiny fixtures, then runs the
commands that read it (`inspect` + `apply` for checkpoints, `check` + `apply` for plans) and
asserts: exit code 2, exactly one line `error: ...` holding the expected fragment, no traceback,
nothing written, and every input file byte-identical afterwards.

Well-formed plans that are wrong (a layer out of range, an unknown op or field, an output inside
the input) are in test_errors.py; this file is for files that are broken or hostile as files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from surgery.plan.load import MAX_PLAN_BYTES

SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"
LLAMA_SHARD_1 = "model-00001-of-00005.safetensors"
LLAMA_SHARD_3 = "model-00003-of-00005.safetensors"
NORM_0 = "model.layers.0.input_layernorm.weight"
NORM_1 = "model.layers.0.post_attention_layernorm.weight"


# --- building bad checkpoints from a copy of a tiny fixture ------------------------------------------


def _copy(tmp: Path, tiny: Callable[[str], Path], arch: str = "mistral") -> Path:
    """A private copy of a tiny model (mistral: one shard; llama: five shards and an index)."""
    return Path(shutil.copytree(tiny(arch), tmp / "model"))


def _split(shard: Path) -> tuple[dict[str, Any], bytes]:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(shard: Path, header: dict[str, Any] | bytes, data: bytes, declared: int | None = None) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(body) if declared is None else declared) + body + data)


def _raw_shard(raw: Callable[[bytes], bytes]) -> Callable[[Path, Any], Path]:
    """A case that rewrites the single shard's bytes."""

    def make(tmp: Path, tiny: Any) -> Path:
        model = _copy(tmp, tiny)
        (model / SHARD).write_bytes(raw((model / SHARD).read_bytes()))
        return model

    return make


def _header(edit: Callable[[dict[str, Any], bytes], Any]) -> Callable[[Path, Any], Path]:
    """A case that edits the single shard's parsed header (and maybe its data), then re-frames it."""

    def make(tmp: Path, tiny: Any) -> Path:
        model = _copy(tmp, tiny)
        header, data = _split(model / SHARD)
        edited = edit(header, data)
        if isinstance(edited, tuple):  # else the edit changed `header` in place
            header, data = edited
        _write(model / SHARD, header, data)
        return model

    return make


def _header_bytes(body: bytes) -> Callable[[Path, Any], Path]:
    """A case whose header is these exact bytes (the data area kept)."""
    return _header(lambda h, d: (body, d))


def _entry(name: str, **fields: Any) -> Callable[[Path, Any], Path]:
    """A case that sets fields of one tensor's header entry."""

    def edit(header: dict[str, Any], data: bytes) -> None:
        header[name].update(fields)

    return _header(edit)


def _last(header: dict[str, Any]) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _gap(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    begin, end = header[_last(header)]["data_offsets"]
    header[_last(header)]["data_offsets"] = [begin + 4, end + 4]
    return header, data[:begin] + bytes(4) + data[begin:]


def _overlap(header: dict[str, Any], data: bytes) -> None:
    header[NORM_1]["data_offsets"] = header[NORM_0]["data_offsets"]


def _past_end(header: dict[str, Any], data: bytes) -> None:
    header[NORM_0]["data_offsets"] = [len(data), len(data) + 128]


def _index(edit: Callable[[dict[str, Any], Path], Any]) -> Callable[[Path, Any], Path]:
    """A case that edits the sharded llama's index (the edit may return a replacement document)."""

    def make(tmp: Path, tiny: Any) -> Path:
        model = _copy(tmp, tiny, "llama")
        index = json.loads((model / INDEX).read_text())
        edited = edit(index, model)
        (model / INDEX).write_text(edited if isinstance(edited, str) else json.dumps(index if edited is None else edited))
        return model

    return make


def _point_outside(shard_name: Callable[[Path], str]) -> Callable[[dict[str, Any], Path], None]:
    """Point every tensor of shard 3 at a valid shard outside the model folder."""

    def edit(index: dict[str, Any], model: Path) -> None:
        outside = model.parent / "outside.safetensors"
        shutil.copy(model / LLAMA_SHARD_3, outside)
        for name, file in index["weight_map"].items():
            if file == LLAMA_SHARD_3:
                index["weight_map"][name] = shard_name(outside)

    return edit


def _folder(build: Callable[[Path, Path], None], arch: str = "mistral") -> Callable[[Path, Any], Path]:
    """A case that edits the files of a model folder."""

    def make(tmp: Path, tiny: Any) -> Path:
        model = _copy(tmp, tiny, arch)
        build(model, tmp)
        return model

    return make


def _pickle_only(suffix: str) -> Callable[[Path, Any], Path]:
    def make(tmp: Path, tiny: Any) -> Path:
        model = tmp / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
        torch.save({"w": torch.zeros(1)}, model / f"pytorch_model{suffix}")
        return model

    return make


def _empty_folder(tmp: Path, tiny: Any) -> Path:
    (tmp / "model").mkdir()
    return tmp / "model"


def _a_file(tmp: Path, tiny: Any) -> Path:
    model = _copy(tmp, tiny)
    return model / SHARD


def _duplicate(model: Path, tmp: Path) -> None:
    (model / INDEX).unlink()  # every *.safetensors is read, and shard 1 is there twice
    shutil.copy(model / LLAMA_SHARD_1, model / "model-extra.safetensors")


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


CHECKPOINTS = [
    # the shard file
    pytest.param(_raw_shard(lambda b: b[:-100]), "truncated", id="truncated shard"),
    pytest.param(_raw_shard(lambda b: b[:5]), "shorter than its 8-byte header length", id="shorter than 8 bytes"),
    pytest.param(_raw_shard(lambda b: struct.pack("<Q", len(b)) + b[8:]), "declares", id="header length past the file"),
    pytest.param(_raw_shard(lambda b: struct.pack("<Q", 2**63) + b[8:]), "declares 9223372036854775808 header bytes",
                 id="header length absurd"),
    pytest.param(_header_bytes(b"{not json"), "not valid JSON", id="header not JSON"),
    pytest.param(_header_bytes(b'{"a": "\xff"}'), "not UTF-8", id="header not UTF-8"),
    pytest.param(_header_bytes(b"[1, 2]"), "a JSON list, not an object", id="header a JSON list"),
    pytest.param(_header_bytes(_deep(100_000)), "nested too deeply", id="header nested 100k deep"),
    pytest.param(_header_bytes(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                               b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
                 "trailing bytes", id="header replaced, data area left over"),
    # one tensor's entry
    pytest.param(_entry(NORM_0, dtype="F128"), "unsupported dtype 'F128'", id="unknown dtype"),
    pytest.param(_entry(NORM_0, dtype=4), "unsupported dtype 4", id="dtype not a string"),
    pytest.param(_entry(NORM_0, shape=[-32]), "shape [-32] is not a list of non-negative integers", id="negative shape"),
    pytest.param(_entry(NORM_0, shape=[32.0]), "shape [32.0] is not a list", id="float shape"),
    pytest.param(_entry(NORM_0, shape=[True]), "shape [True] is not a list", id="bool shape"),
    pytest.param(_entry(NORM_0, shape="32"), "shape '32' is not a list", id="shape a string"),
    pytest.param(_entry(NORM_0, shape=[33]), "holds 128 bytes, which does not match shape [33] of F32",
                 id="shape does not match byte count"),
    pytest.param(_header(lambda h, d: h[NORM_0].update(data_offsets=h[NORM_0]["data_offsets"][::-1])),
                 "is not [begin, end] with 0 <= begin <= end", id="offsets reversed"),
    pytest.param(_entry(NORM_0, data_offsets=[0, 64, 128]), "is not [begin, end]", id="three offsets"),
    pytest.param(_entry(NORM_0, data_offsets=[-128, 0]), "is not [begin, end]", id="negative offset"),
    pytest.param(_header(lambda h, d: h[NORM_0].pop("data_offsets")), "data_offsets None", id="offsets missing"),
    pytest.param(_header(lambda h, d: h.update({NORM_0: [1, 2]})), "header entry is not an object",
                 id="entry not an object"),
    pytest.param(_header(_overlap), "overlap", id="offsets overlapping"),
    pytest.param(_header(_gap), "4 unused bytes after tensor", id="gap in data area"),
    pytest.param(_raw_shard(lambda b: b + bytes(16)), "16 trailing bytes after the last tensor", id="trailing bytes"),
    pytest.param(_header(_past_end), "lies past the end of the file", id="data past end"),
    pytest.param(_header(lambda h, d: h.update(__metadata__={"format": 1})), "__metadata__ must map strings to strings",
                 id="metadata not str to str"),
    pytest.param(_header(lambda h, d: h.update(__metadata__=["pt"])), "__metadata__ must map strings to strings",
                 id="metadata a list"),
    # the index of a sharded checkpoint
    pytest.param(_index(lambda i, m: "{ nope"), "model.safetensors.index.json: not a valid index (not valid JSON",
                 id="index not JSON"),
    pytest.param(_index(lambda i, m: [i]), "needs a 'weight_map' object", id="index a JSON list"),
    pytest.param(_index(lambda i, m: {"metadata": i["metadata"]}), "needs a 'weight_map' object",
                 id="index without weight_map"),
    pytest.param(_index(lambda i, m: i["weight_map"].update({NORM_0: 3})), "is not string -> string",
                 id="index shard not a string"),
    pytest.param(_folder(lambda m, t: (m / LLAMA_SHARD_3).unlink(), "llama"),
                 f"names shard {LLAMA_SHARD_3} which does not exist", id="index naming missing shard"),
    pytest.param(_index(lambda i, m: i["weight_map"].update({"model.extra.weight": LLAMA_SHARD_1})),
                 f"names tensor 'model.extra.weight' which is not in shard {LLAMA_SHARD_1}",
                 id="index naming missing tensor"),
    pytest.param(_index(lambda i, m: i["weight_map"].update({NORM_0: LLAMA_SHARD_1})),
                 f"says '{NORM_0}' is in {LLAMA_SHARD_1} but it is in", id="index naming the wrong shard"),
    pytest.param(_index(_point_outside(lambda p: f"../{p.name}")), "'../outside.safetensors' (for tensor",
                 id="index pointing outside with ../"),
    pytest.param(_index(_point_outside(str)), "is not a plain file name in the model folder",
                 id="index pointing outside by absolute path"),
    pytest.param(_index(_point_outside(lambda p: f"sub/{p.name}")), "is not a plain file name",
                 id="index pointing into a sub-folder"),
    # the folder
    pytest.param(_folder(_duplicate, "llama"), "appears in both", id="duplicate tensor across shards"),
    pytest.param(_folder(lambda m, t: (m / "config.json").unlink()), "no config.json", id="no config.json"),
    pytest.param(_folder(lambda m, t: (m / "config.json").write_text("[1]")),
                 "config.json: expected a JSON object, found a JSON list", id="config.json not an object"),
    pytest.param(_folder(lambda m, t: (m / "config.json").write_text("{'model_type': 'llama'}")),
                 "config.json: not a valid config (not valid JSON", id="config.json not JSON"),
    pytest.param(_folder(lambda m, t: (m / "config.json").write_bytes(_deep(100_000))), "nested too deeply",
                 id="config.json nested 100k deep"),
    pytest.param(_folder(lambda m, t: (m / SHARD).unlink()), "no *.safetensors weights found", id="no weights"),
    pytest.param(_pickle_only(".bin"), "only pickle weights", id="pickle-only folder (.bin)"),
    pytest.param(_pickle_only(".ckpt"), "save_pretrained(..., safe_serialization=True)", id="pickle-only folder (.ckpt)"),
    pytest.param(_empty_folder, "no config.json", id="empty folder"),
    pytest.param(_a_file, "is not a folder", id="model is a file"),
]


# --- bad plans ------------------------------------------------------------------------------


def _plan(text: str | bytes | Callable[[str], str | bytes]) -> Callable[[Path, Any], Path]:
    """A case whose plan file holds this text (a callable gets the valid plan's text to edit)."""

    def make(tmp: Path, tiny: Any) -> Path:
        valid = f"model: {tiny('llama')}\noutput: {tmp / 'out'}\nsteps:\n  - op: chain\n    layers: [0-2]\n"
        content = text(valid) if callable(text) else text
        path = tmp / "plan.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 10)}]\n" for p, x in zip("abcdefgh", "bcdefghi")
)


def _plan_dir(tmp: Path, tiny: Any) -> Path:
    (tmp / "plan.yaml").mkdir()
    return tmp / "plan.yaml"


PLANS = [
    pytest.param(_plan(lambda v: v.replace("[0-2]", "[0, 1")), "plan.yaml:6: malformed YAML", id="plan: malformed YAML"),
    pytest.param(_plan("- just\n- a list\n"), "a plan is a YAML mapping", id="plan: a YAML list"),
    pytest.param(_plan(""), "the plan is empty", id="plan: empty"),
    pytest.param(_plan("# only a comment\n"), "the plan is empty", id="plan: only a comment"),
    pytest.param(_plan(lambda v: LAUGHS + v), "more than 100000 YAML values once aliases are expanded",
                 id="plan: billion laughs"),
    pytest.param(_plan(lambda v: "x: &x [*x]\n" + v), "plan.yaml:1: malformed YAML: an alias refers to its own anchor",
                 id="plan: recursive alias"),
    pytest.param(_plan(lambda v: v + "extra: " + "[" * 2000 + "]" * 2000 + "\n"), "nested deeper than 64 levels",
                 id="plan: deep nesting"),
    pytest.param(_plan(lambda v: v.replace("output:", "output: !!python/object/apply:os.system ['true']\nx:")),
                 "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed", id="plan: python tag"),
    pytest.param(_plan(lambda v: v.replace("model:", "model: !local")), "tag '!local' is not allowed",
                 id="plan: custom tag"),
    pytest.param(_plan(lambda v: v + "#" * MAX_PLAN_BYTES + "\n"), "larger than 1048576 bytes", id="plan: too large"),
    pytest.param(_plan(lambda v: v.encode() + "# caf\u00e9\n".encode("latin-1")), "not UTF-8 text", id="plan: not UTF-8"),
    pytest.param(_plan(lambda v: v.encode("utf-16")), "not UTF-8 text", id="plan: UTF-16"),
    pytest.param(_plan(lambda v: v + "# bell \x07\n"), "character #x0007", id="plan: control character"),
    pytest.param(_plan(lambda v: v + "---\n" + v), "expected a single document in the stream", id="plan: two documents"),
    pytest.param(_plan(lambda v: v.replace("[0-2]", "[!!int zero]")), "a value cannot be read", id="plan: bad !!int"),
    pytest.param(_plan(lambda v: v.replace("model: ", "model: [a, b]\nx: ")), "model: Input should be a valid string",
                 id="plan: model not a string"),
    pytest.param(_plan(lambda v: v.replace("steps:\n  - op: chain\n    layers: [0-2]", "steps: {op: chain}")),
                 "steps: Input should be a valid list", id="plan: steps a mapping"),
    pytest.param(_plan_dir, "cannot read", id="plan: a folder"),
]


# --- the test ---------------------------------------------------------------------------------


def _hashes(*folders: Path) -> dict[str, str]:
    """Every file and folder under these roots: a new file, a changed byte or a removal shows."""
    found = {}
    for root in folders:
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return found


def _assert_refused(result: Any, fragment: str) -> None:
    assert result.code == 2, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out


@pytest.mark.parametrize(("make", "fragment"), CHECKPOINTS)
def test_malformed_checkpoint(make, fragment, tiny, cli, tmp_path):
    model = make(tmp_path, tiny)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"model: {model}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n    layers: [0-1]\n")
    before = _hashes(tmp_path)
    _assert_refused(cli("inspect", model), fragment)
    _assert_refused(cli("apply", plan), fragment)
    assert not (tmp_path / "out").exists()
    assert _hashes(tmp_path) == before, "an input changed or something was written"


@pytest.mark.parametrize(("make", "fragment"), PLANS)
def test_malformed_plan(make, fragment, tiny, cli, tmp_path):
    plan = make(tmp_path, tiny)
    before = _hashes(tmp_path, tiny("llama"))
    _assert_refused(cli("check", plan), fragment)
    _assert_refused(cli("apply", plan), fragment)
    assert not (tmp_path / "out").exists()
    assert _hashes(tmp_path, tiny("llama")) == before, "an input changed or something was written"


def test_the_corpus_is_large_enough():
    assert len(CHECKPOINTS) + len(PLANS) >= 30
