"""Nothing lost, nothing half-written: kills at many points, interrupts, a full disk, `verify`,
`--resume`, concurrent runs, and secrets kept out of every file and message."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from surgery.demo_models import demo_model
from surgery.output.partial import lock_path, partial_folder
from tests.conftest import REPO, copy_without_shards, listing, write_plan

# Looped and scaled layers: copied and computed tensors, over 11 shards of at most 600 KB.
PLAN = """model: {model}
steps:
  - op: chain
    layers:
      - {{layers: 0-5}}
      - {{layers: 3-5, scale: {{o_proj: 0.5, down_proj: 0.5}}}}
      - {{layers: 6-7}}
"""
SHARDS = ["--shard-size", "600KB"]


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    return write_plan(tmp_path, PLAN.format(model=demo_model("base")))


def faults(*args: object, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the fault-injection driver (tests/faults.py) in its own process."""
    return subprocess.run([sys.executable, "-m", "tests.faults", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_sigkill_at_60_points_leaves_nothing_or_a_whole_output_and_resume_is_byte_identical(plan, tmp_path):
    result = faults("kill", plan, "--out", tmp_path / "out", "--points", 60, *SHARDS)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    runs = report.pop("runs")
    print(json.dumps(report))  # the figures docs/reliability.md quotes
    assert report["points"] >= 50 and report["killed"] == report["points"]
    assert report["states"]["BROKEN"] == 0
    assert report["states"]["absent"] + report["states"]["complete"] == report["points"]
    assert report["resumed_identical"] == report["points"]
    assert report["resumed_with_kept_shards"] >= 10, "kills should land while shards are being written"
    assert report["resumes_killed_first"] >= 10
    for run in runs:
        assert run["resume_status"] == 0 and run["final_state"] == "complete", run
        assert run["leftovers"] == [], run  # no partial or replaced folder left beside the output


@pytest.mark.parametrize("signal", ["TERM", "INT"])
def test_interrupt_keeps_finished_shards_for_resume(plan, tmp_path, signal):
    result = faults("interrupt", plan, "--out", tmp_path / "out", "--signal", signal, *SHARDS)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == 130 and report["state"] == "absent" and report["partial_kept"]
    assert len(report["stderr"]) == 1 and "--resume" in report["stderr"][0]
    assert report["resume_status"] == 0 and report["resumed_identical"]


def test_resume_re_hashes_and_rewrites_a_damaged_shard(cli, plan, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert cli("apply", plan, "--out", reference, *SHARDS).code == 0
    partial = partial_folder(out)
    shutil.copytree(reference, partial)  # as a run killed just before its rename would leave it
    (partial / "README.md").unlink()
    journal = {"fingerprint": json.loads((reference / "surgery.json").read_text())["fingerprint"],
               "shards": {name: {"blake3": digest, "bytes": (reference / name).stat().st_size}
                          for name, digest in json.loads((reference / "surgery.json").read_text())["output_blake3"].items()}}
    (partial / ".surgery-journal.json").write_text(json.dumps(journal))
    damaged = partial / "model-00003-of-00011.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(data)
    result = cli("apply", plan, "--out", out, "--resume", *SHARDS)
    assert result.code == 0, result.err
    assert "10 of 11 shards verified and kept" in result.err
    assert _shards(out) == _shards(reference)
    assert not partial.exists()


def test_partial_output_needs_resume_or_force(cli, plan, tmp_path):
    out = tmp_path / "out"
    partial_folder(out).mkdir()
    (partial_folder(out) / "model-00001-of-00011.safetensors").write_bytes(b"half")
    result = cli("apply", plan, "--out", out, *SHARDS)
    assert result.code == 2 and "--resume" in result.err and "--force" in result.err
    assert not out.exists()
    assert cli("apply", plan, "--out", out, "--force", *SHARDS).code == 0
    assert not partial_folder(out).exists() and _verify(cli, out).code == 0


def test_resume_refuses_the_partial_output_of_another_plan(cli, plan, tmp_path):
    out = tmp_path / "out"
    partial = partial_folder(out)
    partial.mkdir()
    (partial / ".surgery-journal.json").write_text(json.dumps({"fingerprint": "another", "shards": {}}))
    result = cli("apply", plan, "--out", out, "--resume", *SHARDS)
    assert result.code == 2 and "another plan" in result.err and "--force" in result.err
    assert listing(partial) == [".surgery-journal.json"] and not lock_path(out).exists()


def test_resume_of_a_finished_output_is_a_no_op(cli, plan, tmp_path):
    out = tmp_path / "out"
    assert cli("apply", plan, "--out", out, *SHARDS).code == 0
    before = _shards(out)
    result = cli("apply", plan, "--out", out, "--resume", *SHARDS)
    assert result.code == 0 and "already complete" in result.err
    assert "wrote" not in result.out  # one thing said: nothing was written
    assert _shards(out) == before


def test_a_lock_left_by_a_run_killed_after_its_rename_goes_with_the_next_resume(cli, plan, tmp_path):
    """Killed between publishing the output and letting go of its lock, a run leaves the lock file (held
    by nobody); the resume that finds the output complete removes it, and one still held stays."""
    out = tmp_path / "out"
    assert cli("apply", plan, "--out", out, *SHARDS).code == 0
    lock_path(out).touch()
    assert cli("apply", plan, "--out", out, "--resume", *SHARDS).code == 0
    assert not lock_path(out).exists()
    with open(lock_path(out), "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert cli("apply", plan, "--out", out, "--resume", *SHARDS).code == 0
        assert lock_path(out).exists()


def test_a_second_run_on_the_same_output_waits_its_turn(cli, plan, tmp_path):
    out = tmp_path / "out"
    partial_folder(out).mkdir()
    with open(lock_path(out), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = cli("apply", plan, "--out", out, "--resume", *SHARDS)
    assert result.code == 2 and "another surgery run is writing" in result.err
    assert not out.exists()


def test_verify_passes_a_fresh_output_and_names_each_problem(cli, plan, tmp_path):
    out = tmp_path / "out"
    assert cli("apply", plan, "--out", out, *SHARDS).code == 0
    result = _verify(cli, out)
    assert result.code == 0, result.out
    report = json.loads(result.out)
    assert report["ok"] and sum(c["subject"].endswith("blake3") for c in report["checks"]) == 11

    flipped = out / "model-00002-of-00011.safetensors"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(data)
    truncated = out / "model-00005-of-00011.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-8])
    (out / "model-00007-of-00011.safetensors").unlink()
    shutil.copy(out / "model-00001-of-00011.safetensors", out / "model-00099.safetensors")
    result = _verify(cli, out)
    assert result.code == 1
    failed = {c["subject"]: c["detail"] for c in json.loads(result.out)["checks"] if not c["ok"]}
    assert "content changed" in failed["model-00002-of-00011.safetensors blake3"]
    assert "model-00005-of-00011.safetensors" in failed
    assert failed["model-00007-of-00011.safetensors"] == "missing"
    assert "stray" in failed["model-00099.safetensors"]


def test_shard_digests_are_blake3_and_older_sha256_records_still_verify(cli, plan, tmp_path):
    import hashlib

    from blake3 import blake3

    out = tmp_path / "out"
    assert cli("apply", plan, "--out", out, *SHARDS).code == 0
    record = json.loads((out / "surgery.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert record["output_blake3"] == {p.name: blake3(p.read_bytes()).hexdigest() for p in shards}
    legacy = {k: v for k, v in record.items() if k != "output_blake3"}
    legacy["output_sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    (out / "surgery.json").write_text(json.dumps(legacy))
    report = json.loads(_verify(cli, out).out)
    assert report["ok"] and sum(c["subject"].endswith(" sha256") for c in report["checks"]) == len(shards)
    data = bytearray(shards[0].read_bytes())
    data[-1] ^= 1
    shards[0].write_bytes(data)
    failed = {c["subject"]: c["detail"] for c in json.loads(_verify(cli, out).out)["checks"] if not c["ok"]}
    assert "content changed" in failed[f"{shards[0].name} sha256"]


def test_verify_checks_what_it_can_of_a_model_surgery_did_not_write(cli, tiny, tmp_path):
    result = cli("verify", tiny("llama"))
    assert result.code == 0 and "not a surgery output" in result.out
    assert cli("verify", tmp_path / "nothing-here").code == 2


def test_verify_checks_the_members_of_an_ensemble_by_reference(cli, tmp_path):
    members = [tmp_path / "a", tmp_path / "b"]
    for member in members:
        shutil.copytree(demo_model("tiny-llama"), member)
    plan = write_plan(tmp_path, f"output: {tmp_path / 'ens'}\nsteps:\n  - op: ensemble\n    members: [{members[0]}, {members[1]}]\n")
    assert cli("apply", plan).code == 0
    assert _verify(cli, tmp_path / "ens").code == 0
    (members[1] / "config.json").write_text((members[1] / "config.json").read_text() + " ")
    result = _verify(cli, tmp_path / "ens")
    assert result.code == 1 and "changed since the ensemble was made" in result.out


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(
    not _unshare_available(), reason="mounting a size-limited tmpfs needs user namespaces (`unshare -rm`), not permitted here"
)


def _on_small_disk(size: str, command: list[str], disk: Path) -> subprocess.CompletedProcess[str]:
    """Run `command` with `disk` a fresh tmpfs of `size` (private to the command), then list what is left on it."""
    disk.mkdir()
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && "$@"; echo "exit=$?"; ls -A "$DISK"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", size, str(disk), *command], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DISK": str(disk)})


@needs_tmpfs
def test_too_little_free_space_is_refused_before_writing(plan, tmp_path):
    disk = tmp_path / "disk"
    result = _on_small_disk("4m", [sys.executable, "-m", "surgery", "apply", str(plan), "--out", str(disk / "out")], disk)
    lines = result.stdout.splitlines()
    assert "exit=2" in lines and lines[-1] == "exit=2", result.stdout + result.stderr  # nothing listed after it
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "not enough free space" in error[0] and "needs" in error[0]


@needs_tmpfs
def test_disk_filling_up_during_the_run_fails_cleanly(plan, tmp_path):
    disk = tmp_path / "disk"
    command = [sys.executable, "-m", "tests.faults", "fill-disk", str(plan), "--out", str(disk / "out"), *SHARDS]
    result = _on_small_disk("64m", command, disk)
    lines = result.stdout.splitlines()
    assert lines[-2:] == ["exit=1", "filler"], result.stdout + result.stderr  # only the file that filled the disk
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "no space left on the device" in error[0] and "partial output was removed" in error[0]


def test_hub_tokens_stay_out_of_outputs_logs_and_errors(cli, plan, tmp_path, monkeypatch):
    token = "hf_surgeryTestSecret0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the push fails
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "out"
    applied = cli("apply", plan, "--out", out, "--push", "someone/model")
    assert applied.code == 2 and "cannot reach" in applied.err  # written, then the push failed
    pushed = cli("push", out, "someone/model")
    assert pushed.code != 0
    texts = [r.out + r.err for r in (applied, pushed)] + [p.read_text() for p in (out / "surgery.json", out / "README.md")]
    assert not any(token in text for text in texts)


def _verify(cli, folder: Path):
    return cli("verify", folder, "--json")


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_models_that_need_their_own_code_are_refused(cli, tmp_path):
    model = tmp_path / "remote"
    shutil.copytree(demo_model("tiny-llama"), model)
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "evil_arch", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    result = cli("eval", model, "--max-tokens", "64")
    assert result.code == 2 and "never runs remote code" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_output_file_names_cannot_leave_the_output_folder(plan, tmp_path):
    from surgery.errors import SurgeryError
    from surgery.output.execute import execute
    from surgery.plan.resolve import resolve

    recipe = resolve(plan, tmp_path / "out")
    recipe = replace(recipe, view=replace(recipe.view, extra_files={"../escaped.txt": "x"}))  # values: a new one
    with pytest.raises(SurgeryError, match="plain names inside the output folder"):
        execute(recipe, fsync=False)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()
    assert not partial_folder(tmp_path / "out").exists()


def test_eval_never_loads_pickle_weights(cli, tmp_path):
    import torch

    model = tmp_path / "pickled"
    torch.save(copy_without_shards(demo_model("tiny-llama"), model), model / "pytorch_model.bin")
    result = cli("eval", model, "--max-tokens", "64")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "pickle" in result.err or "safetensors" in result.err


def test_ctrl_c_during_a_fit_is_one_line_and_writes_nothing(tmp_path):
    """An interrupt no step catches (here: aTLAS learning, before any output exists) ends in one line and exit
    130, not typer's silent exit."""
    import signal
    import time

    base, code = demo_model("base"), demo_model("code")
    plan = write_plan(tmp_path, f"model: {base}\nbase: {base}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: atlas\n"
                                f"    models: [{code}]\n    learn: {{data: builtin:mixed-dev, steps: 100000}}\n")
    log = tmp_path / "stderr"
    with log.open("w") as err:
        run = subprocess.Popen([sys.executable, "-m", "surgery", "apply", str(plan)], stdout=subprocess.DEVNULL,
                               stderr=err, cwd=tmp_path, env={**os.environ, "SURGERY_CACHE": str(tmp_path / "cache")},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
        deadline = time.monotonic() + 120
        while "step 1/" not in log.read_text() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130
    lines = log.read_text().strip().splitlines()
    assert lines[-1] == "error: interrupted before the command finished (Ctrl-C)" and "Traceback" not in log.read_text()
    assert not (tmp_path / "out").exists()
