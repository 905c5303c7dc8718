"""Hostile and careless input: nothing outside the output, nothing mixed, nothing non-finite.

Each case was found by someone set on breaking the tool; each test fails without its fix. The rules
are in docs/reliability.md: links never lead a read or an upload out of a model folder, a partial
folder is only ever one surgery made, a resumed run refuses changed inputs, a plan's numbers are
finite, and every filesystem failure is one line with nothing left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.output.partial import lock_path, partial_folder
from tests.conftest import copy_without_shards, listing, write_plan

CHAIN = "steps:\n  - op: chain\n    layers: [0, 1]\n"


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of the tiny Llama in one model.safetensors (tests here change their input on purpose)."""
    folder = tmp_path / "model"
    save_file(copy_without_shards(tiny("llama"), folder), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _one_line(result) -> str:
    """The one error line of a refused command (progress lines before it aside), exit code 2."""
    assert result.code == 2, (result.code, result.err)
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.err, result.err
    return errors[0]


# --- links ----------------------------------------------------------------------------------------

def test_a_side_file_linking_out_of_the_model_folder_is_refused(cli, model, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (model / "special_tokens_map.json").unlink(missing_ok=True)
    (model / "special_tokens_map.json").symlink_to(secret)
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}")
    for command in ("check", "apply"):
        err = _one_line(cli(command, plan))
        assert "special_tokens_map.json" in err and "outside the model folder" in err
    assert not out.exists() and not partial_folder(out).exists()


def test_links_inside_the_folder_and_a_hub_cache_snapshot_are_read(cli, model, tmp_path):
    """A Hub cache snapshot is links into its repo's blobs/: that is where its files are."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for item in model.iterdir():
        shutil.copy(item, blobs / item.name)
        (snapshot / item.name).symlink_to(f"../../blobs/{item.name}")
    (snapshot / "tokenizer_copy.json").symlink_to(snapshot / "tokenizer.json")  # a link inside the folder
    out = tmp_path / "out"
    result = cli("apply", write_plan(tmp_path, f"model: {snapshot}\noutput: {out}\n{CHAIN}"))
    assert result.code == 0, result.err
    assert (out / "tokenizer_copy.json").is_file() and not (out / "tokenizer_copy.json").is_symlink()


def test_push_refuses_a_link_planted_in_an_output(cli, model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli("apply", write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}")).code == 0
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (out / "notes.txt").symlink_to(secret)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    err = _one_line(cli("push", out, "someone/model", "--dry-run"))
    assert "notes.txt is a link" in err


def test_a_link_at_the_partial_folder_name_is_never_written_through(cli, model, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    partial_folder(out).symlink_to(victim)
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}")
    for flags in ((), ("--resume",), ("--force",)):
        err = _one_line(cli("apply", plan, *flags))
        assert "is a link, not a partial output surgery made" in err
    assert listing(victim) == ["precious.txt"] and not out.exists() and not lock_path(out).exists()


# --- resume ---------------------------------------------------------------------------------------

def test_resume_refuses_a_source_whose_bytes_changed_under_the_same_header(cli, model, tmp_path):
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n"
                      "steps:\n  - op: chain\n    layers: [0, 1, 1, 0]\n")
    partial = partial_folder(out)
    assert cli("apply", plan, "--shard-size", "20KB").code == 0
    out.rename(partial)  # as an interrupted run leaves it: shards journaled, not yet renamed
    provenance = json.loads((partial / "surgery.json").read_text())
    journal = {"fingerprint": provenance["fingerprint"],
               "shards": {name: {"blake3": digest, "bytes": (partial / name).stat().st_size}
                          for name, digest in list(provenance["output_blake3"].items())[:2]}}
    (partial / ".surgery-journal.json").write_text(json.dumps(journal))
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    data[header + 5] ^= 0x40  # a tensor byte: the header (and so its hash) is unchanged
    weights.write_bytes(data)
    err = _one_line(cli("apply", plan, "--resume", "--shard-size", "20KB"))
    assert "made by another plan, inputs" in err and not out.exists()


# --- non-finite values ----------------------------------------------------------------------------

@pytest.mark.parametrize("step", [
    "  - op: chain\n    layers: [{{layers: [0, 1], scale: {{o_proj: .nan}}}}]\n",
    "  - op: task_arithmetic\n    models: [{{model: {model}, weight: .nan}}]\n",
    "  - op: ties\n    models: [{model}]\n    lambda: .inf\n",
    "  - op: lines\n    alpha: .nan\n    beta: 1\n",
])
def test_non_finite_plan_values_are_refused_by_check(step, cli, model, tmp_path):
    plan = write_plan(tmp_path, f"model: {model}\nbase: {model}\noutput: {tmp_path / 'out'}\nsteps:\n"
                      + step.format(model=model))
    assert "is not a finite number" in _one_line(cli("check", plan))


def test_bits_refuses_a_non_finite_weight_instead_of_writing_a_group_of_nan(cli, model, tmp_path):
    weights = load_file(model / "model.safetensors")
    name = next(n for n in weights if n.endswith("layers.0.mlp.down_proj.weight"))
    weights[name][0, 0] = float("inf")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\nsteps:\n  - op: bits\n    score: manual\n"
                      "    manual: {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4}\n    quantizer: {group_size: 16}\n")
    err = _one_line(cli("apply", plan))
    assert name in err and "1 non-finite value" in err and "bits.keep" in err
    assert not out.exists() and not partial_folder(out).exists()
    kept = plan.read_text().replace("group_size: 16}\n", "group_size: 16}\n    keep: [embed, lm_head, norms, down_proj]\n")
    assert cli("apply", write_plan(tmp_path, kept)).code == 0
    assert torch.isinf(load_file(out / "model.safetensors")[name]).sum() == 1  # kept as it is, no NaN made


@pytest.mark.parametrize("step, named, keep", [
    ("  - op: bits\n    width: 4\n    calibration: {data: builtin:mixed-dev, samples: 2, seq_len: 32}\n"
     "    quantizer: {method: gptq, group_size: 16}\n", "layer 0 mlp.down_proj.weight", "bits.keep"),
    ("  - op: ptqtp\n    group_size: 16\n", "layers.0.mlp.down_proj.weight", "ptqtp.keep"),
])
def test_gptq_and_ptqtp_refuse_a_non_finite_weight(step, named, keep, cli, model, tmp_path):
    weights = load_file(model / "model.safetensors")
    name = next(n for n in weights if n.endswith("layers.0.mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = cli("apply", write_plan(tmp_path, f"model: {model}\noutput: {out}\nsteps:\n{step}"))
    last = result.err.strip().splitlines()[-1]
    assert result.code == 2 and "Traceback" not in result.err
    assert named in last and "1 non-finite value" in last and keep in last
    assert not out.exists() and not partial_folder(out).exists()


# --- what is read ---------------------------------------------------------------------------------

def test_evaluate_compare_to_may_not_name_the_output(cli, model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(model, out)  # a previous output, replaced under --force
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}evaluate:\n  compare_to: {out}\n")
    err = _one_line(cli("apply", plan, "--force"))
    assert "compare_to" in err and "scored beside itself" in err
    assert listing(out) == listing(model)


def test_a_single_file_beside_an_index_is_an_ambiguity_refused(cli, model, tmp_path):
    tensors = load_file(model / "model.safetensors")
    save_file(tensors, model / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _one_line(cli("inspect", model))
    assert "has both model.safetensors and model.safetensors.index.json" in err and "stale" in err


# --- the output path ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["under a file", "name too long", "no such user", "link loop"])
def test_every_filesystem_failure_on_the_output_is_one_line_and_leaves_nothing(case, cli, model, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    if case == "under a file":
        (root / "file").write_text("")
        out = root / "file" / "out"
    elif case == "name too long":
        out = root / "new" / ("x" * 250)
    elif case == "no such user":
        out = "~surgery-no-such-user/out"
    else:
        (root / "loop").symlink_to(root / "loop")
        out = root / "loop" / "out"
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}")
    _one_line(cli("apply", plan))
    expected = {"under a file": ["file"], "name too long": [], "no such user": [], "link loop": ["loop"]}[case]
    assert listing(root) == expected  # the folders a failed run made are gone


def test_a_read_only_output_folder_is_one_line(cli, model, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        _one_line(cli("apply", write_plan(tmp_path, f"model: {model}\noutput: {parent / 'out'}\n{CHAIN}")))
    finally:
        parent.chmod(0o755)


# --- concurrency ----------------------------------------------------------------------------------

def test_the_lock_is_held_until_the_output_is_in_place(cli, model, tmp_path, monkeypatch):
    """A second run during the final rename must be refused, not take over the folder being renamed."""
    import fcntl

    import surgery.output.partial as partial_module

    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}")
    seen = []
    real_replace = partial_module._replace

    def replace_while_checking(staging, target):
        with open(lock_path(out)) as lock:  # the first run still holds it at the rename
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(True)
        real_replace(staging, target)

    monkeypatch.setattr(partial_module, "_replace", replace_while_checking)
    assert cli("apply", plan).code == 0 and seen
    assert not lock_path(out).exists() and (out / "model.safetensors").is_file()


# --- sizes are bounded ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, message", [("abc", "not a size"), ("0MB", "at least 1KB"), ("-1MB", "at least 1KB")])
def test_a_shard_size_that_is_no_size_is_one_line(size, message, cli, model, tmp_path):
    plan = write_plan(tmp_path, f"model: {model}\noutput: {tmp_path / 'out'}\n{CHAIN}")
    assert message in _one_line(cli("check", plan, f"--shard-size={size}"))


def test_binary_shard_sizes_are_read(cli, model, tmp_path):
    plan = write_plan(tmp_path, f"model: {model}\noutput: {tmp_path / 'out'}\n{CHAIN}")
    assert cli("apply", plan, "--shard-size", "64KiB").code == 0
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1


def test_sizes_in_a_plan_or_config_are_bounded_before_anything_is_allocated(cli, model, tmp_path):
    plan = write_plan(tmp_path, f"model: {model}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n"
                      "    layers: [0-999999999999]\n")
    assert "a plan lists at most 100,000" in _one_line(cli("check", plan))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 10**12}))
    assert "num_hidden_layers=1000000000000" in _one_line(cli("inspect", model))  # in moments, not out of memory


# --- every file read is bounded and typed ---------------------------------------------------------

def test_a_fifo_or_device_in_a_model_folder_is_refused_not_read(cli, model, tmp_path):
    (model / "config.json").rename(tmp_path / "config.json")
    os.mkfifo(model / "config.json")
    assert "not a regular file" in _one_line(cli("inspect", model))  # a read would block forever
    (model / "config.json").unlink()
    (tmp_path / "config.json").rename(model / "config.json")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("/dev/zero")  # a read would never end
    plan = write_plan(tmp_path, f"model: {model}\noutput: {tmp_path / 'out'}\n{CHAIN}")
    _one_line(cli("check", plan))
    assert "not a regular file" in _one_line(cli("eval", model))


@pytest.mark.parametrize("text, message", [("[1, 2]", "expected a JSON object"), ("{'a': 1}", "not valid JSON"),
                                           ("\xff", "not a valid config")])
def test_a_config_that_is_not_a_json_object_is_one_line(text, message, cli, model):
    (model / "config.json").write_bytes(text.encode("latin-1"))
    assert message in _one_line(cli("inspect", model))


def test_a_corrupt_journal_keeps_nothing_and_the_run_completes(cli, model, tmp_path):
    out = tmp_path / "out"
    partial_folder(out).mkdir()
    (partial_folder(out) / "model.safetensors").write_bytes(b"stale")
    (partial_folder(out) / ".surgery-journal.json").write_text(
        json.dumps({"fingerprint": 7, "shards": {"../model.safetensors": {"sha256": 1, "bytes": "x"}}}))
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}")
    assert cli("apply", plan, "--resume").code == 0
    assert cli("verify", out).code == 0


@pytest.mark.parametrize("record", [
    {"output_shards": ["../model/model.safetensors"], "output_blake3": {}},
    {"output_shards": "model.safetensors", "output_blake3": []},
    {"output_shards": [], "output_blake3": {"../../etc/passwd": "0" * 64}},
])
def test_a_corrupt_surgery_record_is_a_failed_check_never_a_read_outside(record, cli, model, tmp_path):
    out = tmp_path / "out"
    assert cli("apply", write_plan(tmp_path, f"model: {model}\noutput: {out}\n{CHAIN}")).code == 0
    provenance = json.loads((out / "surgery.json").read_text()) | record
    (out / "surgery.json").write_text(json.dumps(provenance))
    result = cli("verify", out, "--json")
    assert result.code == 1 and "Traceback" not in result.err
    failed = [c for c in json.loads(result.out)["checks"] if not c["ok"]]
    assert any("plain file names" in c["detail"] or "shard names" in c["detail"] for c in failed), failed


# --- check accepts only what apply can do ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_bits_on_already_quantized_layer_tensors_is_refused_by_check(dtype, cli, model, tmp_path):
    tensors = load_file(model / "model.safetensors")
    name = next(n for n in tensors if n.endswith("layers.0.mlp.down_proj.weight"))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    plan = write_plan(tmp_path, f"model: {model}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: bits\n"
                      "    score: manual\n    manual: {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4}\n"
                      "    quantizer: {group_size: 16, symmetric: true}\n")
    check = cli("check", plan)
    if dtype == torch.int8:  # not a float matrix: left as it is, and apply does what check said
        assert check.code == 0, check.err
        assert cli("apply", plan).code == 0
        assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[name], tensors[name])
    else:
        assert "already quantized" in _one_line(check) and not (tmp_path / "out").exists()


def test_a_zero_size_matrix_is_left_as_it_is_by_packed_bits(cli, model, tmp_path):
    pytest.importorskip("compressed_tensors")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.empty.weight"] = torch.zeros(0, 64)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\nsteps:\n  - op: bits\n    score: manual\n"
                      "    manual: {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4}\n    quantizer: {group_size: 16, symmetric: true}\n"
                      "    format: compressed-tensors\n")
    assert cli("check", plan).code == 0
    result = cli("apply", plan)
    assert result.code == 0, result.err
    assert load_file(out / "model.safetensors")["model.layers.0.mlp.empty.weight"].shape == (0, 64)


# --- derived files --------------------------------------------------------------------------------

def test_a_later_edit_drops_the_derived_files_of_its_input(cli, model, tmp_path):
    """bits writes llama-tensor-types.txt for its own layers; a chain of that output must not carry it."""
    quantized, chained = tmp_path / "bits", tmp_path / "chain"
    assert cli("apply", write_plan(tmp_path, f"model: {model}\noutput: {quantized}\nsteps:\n  - op: bits\n"
                                   "    score: manual\n    manual: {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4}\n"
                                   "    quantizer: {group_size: 16}\n", "bits.yaml")).code == 0
    assert (quantized / "llama-tensor-types.txt").is_file()
    assert cli("apply", write_plan(tmp_path, f"model: {quantized}\noutput: {chained}\n{CHAIN}", "chain.yaml")).code == 0
    assert not (chained / "llama-tensor-types.txt").exists() and (chained / "tokenizer.json").is_file()


def test_the_library_reads_shard_sizes_as_the_command_line_does(model, tmp_path):
    from surgery import pipeline
    from surgery.errors import SurgeryError

    plan = write_plan(tmp_path, f"model: {model}\noutput: {tmp_path / 'out'}\n{CHAIN}")
    for size in ("0MB", "infGiB"):
        with pytest.raises(SurgeryError, match="shard size"):
            pipeline.apply(plan, shard_size=size, fsync=False)
    assert not (tmp_path / "out").exists()
