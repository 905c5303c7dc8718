"""Plan parsing and layout detection, unit by unit."""

from __future__ import annotations

import pytest

from surgery.checkpoint.layout import find_layout
from surgery.errors import SurgeryError
from surgery.ops.fields import parse_layers
from surgery.plan.load import load_plan
from tests.conftest import write_plan


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, [3]), ("0-3", [0, 1, 2, 3]), (["0-2", 5, "1-1", 0], [0, 1, 2, 5, 1, 0]), ("7", [7]), (" 2 - 4 ", [2, 3, 4])],
)
def test_parse_layers(value, expected):
    assert parse_layers(value) == expected


@pytest.mark.parametrize("value", ["3-1", [], "a", [True], -2, "1-2-3", 1.5])
def test_parse_layers_rejects(value):
    with pytest.raises(ValueError):
        parse_layers(value)


def test_bare_items_merge_into_one_entry_and_mappings_stay_apart(tmp_path):
    plan = load_plan(write_plan(tmp_path, """
model: m
output: o
steps:
  - op: chain
    layers: [0-2, 5, {model: b, layers: [1, 1]}, 7]
"""))
    entries = plan.steps[0].layers
    assert [(e.model, e.layers) for e in entries] == [(None, [0, 1, 2, 5]), ("b", [1, 1]), (None, [7])]


def test_error_lines_point_at_the_field(tmp_path):
    path = write_plan(tmp_path, "model: m\noutput: o\nsteps:\n  - op: chain\n    layers:\n      - 0-2\n      - {layers: 4-1}\n")
    with pytest.raises(SurgeryError, match=r"plan.yaml:7: steps\[0\].layers\[1\].layers: range '4-1' is reversed"):
        load_plan(path)


def test_yaml_aliases_and_tags_are_not_code(tmp_path):
    path = write_plan(tmp_path, "model: !!python/object/apply:os.system ['echo hi']\nsteps: []\n")
    with pytest.raises(SurgeryError, match="malformed YAML"):
        load_plan(path)


@pytest.mark.parametrize(
    ("names", "config", "prefix"),
    [
        (["model.layers.0.w", "model.layers.1.w", "model.embed.weight"], {"num_hidden_layers": 2}, "model.layers"),
        (["transformer.h.0.w", "transformer.h.1.w", "transformer.h.2.w"], {"n_layer": 3}, "transformer.h"),
        (["model.decoder.layers.0.fc.weight", "model.decoder.layers.0.experts.3.w"], {"num_layers": 1},
         "model.decoder.layers"),
        (["backbone.blocks.0.x", "backbone.blocks.1.x", "heads.0.w"], {"n_layers": 2}, "backbone.blocks"),
    ],
)
def test_layout_is_found_from_names(names, config, prefix):
    layout = find_layout(config, names)
    assert layout.prefix == prefix
    assert layout.split(f"{prefix}.1.attn.weight") == (1, "attn.weight")


def test_layout_errors_are_clear():
    with pytest.raises(SurgeryError, match="config says num_hidden_layers=3 but the numbered tensor groups are"):
        find_layout({"num_hidden_layers": 3}, ["model.layers.0.w", "model.layers.1.w"])
    with pytest.raises(SurgeryError, match="no layer count"):
        find_layout({}, ["model.layers.0.w"])
