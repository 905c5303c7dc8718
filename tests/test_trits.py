"""PTQTP: the alternating fit never raises its objective, each half-step is the exact minimiser it
claims to be, trits pack five to a byte and come back, and the planes approximate like a 3-bit grid."""

from __future__ import annotations

import itertools

import pytest
import torch

from surgery.compute.trits import RIDGE, fit, pack_trits, unpack_trits


@pytest.mark.parametrize("seed", range(4))
def test_the_objective_never_increases_from_one_iteration_to_the_next(seed):
    torch.manual_seed(seed)
    w = torch.randn(24, 64, dtype=torch.float64) * torch.rand(24, 1, dtype=torch.float64)
    planes = fit(w, 32, iterations=30, dtype=torch.float64, tolerance=0)
    objective = planes.objective
    assert len(objective) >= 3
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(objective, objective[1:]))
    assert objective[-1] < objective[0]
    error = float((planes.dense() - w).square().sum())
    assert error <= objective[-1]  # F adds lambda ||a||^2 to the error


def test_each_half_step_is_the_exact_minimiser():
    """Given the fitted scales no other trits do better (all 9 pairs tried per weight); given the trits the
    scales solve the ridge problem (lstsq of the augmented system)."""
    torch.manual_seed(7)
    w = torch.randn(4, 8, dtype=torch.float64)
    planes = fit(w, 8, iterations=50, dtype=torch.float64, tolerance=0)
    t1, t2 = (p.double() for p in planes.planes)
    for row in range(4):
        a1, a2 = planes.scales[row, 0].tolist()
        values = [a1 * i + a2 * j for i, j in itertools.product((-1, 0, 1), repeat=2)]
        for column in range(8):
            best = min(abs(w[row, column] - v) for v in values)
            assert abs(w[row, column] - a1 * t1[row, column] - a2 * t2[row, column]) <= best + 1e-12
        s = torch.stack((t1[row], t2[row]), 1)
        augmented = torch.cat((s, RIDGE ** 0.5 * torch.eye(2, dtype=torch.float64)))
        target = torch.cat((w[row], torch.zeros(2, dtype=torch.float64)))
        ridge = torch.linalg.lstsq(augmented, target.unsqueeze(1)).solution.squeeze(1)
        # the stored scales are the last ridge solve's, and its trits are those the last trit step chose
        # (the fit stops on an unchanged objective, where the next trit step changes nothing)
        torch.testing.assert_close(planes.scales[row, 0], ridge, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("columns", [5, 7, 96, 257])
def test_trits_pack_five_to_a_byte_and_round_trip(columns):
    trits = torch.randint(-1, 2, (3, columns), dtype=torch.int8, generator=torch.Generator().manual_seed(columns))
    packed = pack_trits(trits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-columns // 5))
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_trits(packed, columns), trits)


def test_two_planes_approximate_between_a_2_and_a_4_bit_grid():
    """Nine values per group: the error lies between RTN's at 2 bits (4 values) and at 4 bits (16)."""
    from surgery.compute.quantize import quantize

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    planes = fit(w, 128, iterations=50, dtype=torch.float32)
    error = float((planes.dense() - w).square().mean())
    rtn = {b: float((quantize(w, b, 128, False, torch.float32).dequantized() - w).square().mean()) for b in (2, 4)}
    assert rtn[4] < error < rtn[2]


def _ptqtp(cli, tmp_path, body: str, name: str):
    from surgery.demo_models import demo_model
    from tests.conftest import write_plan

    out = tmp_path / name
    result = cli("apply", write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {out}\nsteps:\n  - op: ptqtp\n"
                                     f"{body}", f"{name}.yaml"))
    assert result.code == 0, result.err
    return out


def test_packed_trit_planes_score_as_their_dense_model_and_hold_3_2_bits_a_weight(cli, tmp_path):
    """The dense output: each matrix takes at most 9 values per group row, as fitted; the packed output:
    uint8 planes of five trits a byte, refused by plain transformers, loaded by `surgery eval` and
    materialized tensor for tensor into the dense output."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig

    from surgery.demo_models import demo_model
    from tests.reference import load, outputs

    dense = _ptqtp(cli, tmp_path, "    group_size: 32\n", "dense")
    packed = _ptqtp(cli, tmp_path, "    group_size: 32\n    format: trit-planes\n", "packed")
    source, written = load_file(demo_model("base") / "model.safetensors"), load_file(dense / "model.safetensors")
    stored = load_file(packed / "model.safetensors")
    for name, w in source.items():
        if ".layers." not in name or w.dim() != 2:
            assert torch.equal(written[name], w) and torch.equal(stored[name], w), name
            continue
        expected = fit(w.float(), 32, 50, w.dtype)
        assert torch.equal(written[name], expected.dense()), name
        groups = written[name].reshape(w.shape[0], -1, 32)
        assert max(len(set(g.tolist())) for g in groups.reshape(-1, 32)) <= 9
        module = name.removesuffix(".weight")
        assert stored[f"{module}.trits_1"].dtype == torch.uint8
        assert stored[f"{module}.trits_1"].shape == (w.shape[0], -(-w.shape[1] // 5))
        assert torch.equal(unpack_trits(stored[f"{module}.trits_2"], w.shape[1]), expected.planes[1])
    fits = json.loads((packed / "surgery.json").read_text())["fits"][0]
    matrices = [w for n, w in source.items() if ".layers." in n and w.dim() == 2]
    planes = sum(2 * 8 * w.shape[0] * -(-w.shape[1] // 5) for w in matrices)  # 8 bits per five trits
    scales = sum(2 * 32 * w.numel() // 32 for w in matrices)  # two float32 scales per group of 32
    assert fits["bits_per_weight"] == pytest.approx((planes + scales) / sum(w.numel() for w in matrices))
    with pytest.raises(ValueError):
        AutoConfig.from_pretrained(packed)  # plain transformers refuses it, never loads random weights
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3, 11, 250, 42, 8, 90, 31]])
    from surgery.evaluation.loading import load_for_eval

    loaded = load_for_eval(packed, "cpu", "float32").model
    assert torch.equal(outputs(loaded, ids), outputs(load(dense), ids))
    assert cli("eval", packed, "--max-tokens", "256", "--device", "cpu").code == 0
    card = (packed / "README.md").read_text()
    assert "surgery trit-plane model" in card and "surgery materialize" in card and "from_pretrained" not in card
    assert cli("materialize", packed, tmp_path / "materialized").code == 0
    materialized = load_file(tmp_path / "materialized" / "model.safetensors")
    assert materialized.keys() == written.keys() and all(torch.equal(materialized[n], t) for n, t in written.items())


@pytest.mark.parametrize("body, message", [
    ("    group_size: 64\n", "group_size: 64 does not divide the input dimension 96"),
    ("    group_size: 32\n    keep: [proj]\n", "no layer matrix is left to quantize"),
    ("    group_size: 32\n    format: trit-planes\n  - op: chain\n    layers: [0-3]\n",
     "ptqtp with format: trit-planes must be the last step"),
])
def test_bad_ptqtp_plans(body, message, cli, tmp_path):
    from surgery.demo_models import demo_model
    from tests.conftest import assert_plan_refused

    assert_plan_refused(cli, tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n"
                        f"  - op: ptqtp\n{body}", message)
