"""Fault injection for the reliability tests: run `surgery apply` in a child process and SIGKILL it at
the Nth event of its write phase, or fill its disk right after the free-space check.

`python -m tests.faults kill PLAN --points 60` runs the whole kill experiment and prints its figures
as JSON (docs/reliability.md quotes them). The driver imports surgery once, then forks one child per
run, so each run costs its own work and not Python's start-up. The parent never computes with
torch, so a forked child starts with a clean thread pool.

An "event" is a call of a builtin (open, write, copy_file_range, fsync, rename, sha256 update...)
made from surgery's own code on the main thread once `execute` has started: every effect the run
has on the disk is one, so the process can die before or after each of them. (The hashing and
syncing threads run meanwhile; their own calls are not counted, because their number varies with
timing and the points must be the same in every run.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

# Imported (never run) before forking, so no child pays for them: torch, and the model card's
# huggingface_hub modules.
import huggingface_hub.repocard  # noqa: F401
import torch  # noqa: F401

import surgery
import surgery.cli
import surgery.output.execute
import surgery.output.partial
import surgery.output.verify

SURGERY_DIR = str(Path(surgery.__file__).parent)
COUNT_FILE_ENV = "SURGERY_FAULT_COUNT_FILE"


def _install_killer(kill_at: int | None, count_file: Path | None, sig: int) -> None:
    """Wrap `execute` so events are counted (and signal `sig` sent at `kill_at`) from its first call."""
    original = surgery.output.execute.execute
    count = 0

    def hook(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event == "c_call" and frame.f_code.co_filename.startswith(SURGERY_DIR):
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), sig)

    def counted(*args: Any, **kwargs: Any) -> Any:
        sys.setprofile(hook)
        try:
            return original(*args, **kwargs)
        finally:
            sys.setprofile(None)
            if count_file is not None:
                count_file.write_text(str(count))

    surgery.output.execute.execute = counted


def _fill_disk_after_check(leave: int) -> None:
    """Wrap the free-space check so that, once it passed, another 'process' fills the disk."""
    original = surgery.output.execute._check_free_space

    def check_then_fill(out: Path, needed: int) -> None:
        original(out, needed)
        free = shutil.disk_usage(out.parent).free
        with open(out.parent / "filler", "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(free - leave, 0))

    surgery.output.execute._check_free_space = check_then_fill


def run_child(
    argv: list[str],
    kill_at: int | None = None,
    count_file: Path | None = None,
    sig: int = signal.SIGKILL,
    stderr: Path | None = None,
) -> int:
    """Fork, run `surgery ARGV` in the child (sent `sig` at event `kill_at`), return its exit status
    (negative: the signal that ended it). The child's stdout is dropped, its stderr goes to `stderr`."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ["COLUMNS"] = "200"
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(stderr or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            # As in an interactive terminal: a shell starting background jobs (CI, nohup) makes them
            # ignore SIGINT, and Python then leaves it ignored.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _install_killer(kill_at, count_file, sig)
            sys.argv = ["surgery", *argv]
            try:
                surgery.cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def output_state(out: Path) -> str:
    """'absent', 'complete' (every verify check holds) or 'BROKEN' (a folder that is not whole)."""
    if not out.exists():
        return "absent"
    return "complete" if all(check.ok for check in surgery.output.verify.verify(out)) else "BROKEN"


def kill_experiment(plan: Path, out: Path, points: int, extra: list[str]) -> dict[str, Any]:
    """Kill `apply` at `points` events spread evenly over its write phase; after each kill check the
    output name, then `--resume` and compare the shards with an uninterrupted run's."""
    started = time.perf_counter()
    count_file = out.parent / "events"
    reference = out.parent / "reference"
    assert run_child(["apply", str(plan), "--out", str(reference), *extra], count_file=count_file) == 0
    events = int(count_file.read_text())
    expected = shard_digests(reference)
    kill_points = sorted({round(1 + i * (events - 1) / (points - 1)) for i in range(points)})
    results = []
    for kill_at in kill_points:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(surgery.output.partial.partial_folder(out), ignore_errors=True)
        status = run_child(["apply", str(plan), "--out", str(out), *extra], kill_at=kill_at)
        state = output_state(out)
        partial = surgery.output.partial.partial_folder(out)
        journaled = len(surgery.output.partial.read_journal(partial).get("shards", {})) if partial.exists() else 0
        resume = ["apply", str(plan), "--out", str(out), "--resume", *extra]
        resume_killed = len(results) % 5 == 4  # every fifth time the resume itself is killed half-way first
        if resume_killed:
            run_child(resume, kill_at=max(1, kill_at // 2))
        resumed = run_child(resume)
        identical = out.exists() and shard_digests(out) == expected
        final = output_state(out)
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
        results.append({"kill_at": kill_at, "status": status, "state": state, "journaled_shards": journaled,
                        "resume_killed": resume_killed, "resume_status": resumed, "resumed_identical": identical, "final_state": final,
                        "leftovers": leftovers})
    return {
        "events": events,
        "points": len(kill_points),
        "shards": len(expected),
        "killed": sum(r["status"] == -signal.SIGKILL for r in results),
        "states": {s: sum(r["state"] == s for r in results) for s in ("absent", "complete", "BROKEN")},
        "resumed_with_kept_shards": sum(r["journaled_shards"] > 0 for r in results),
        "resumes_killed_first": sum(r["resume_killed"] for r in results),
        "resumed_identical": sum(r["resumed_identical"] for r in results),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": results,
    }


def interrupt_experiment(plan: Path, out: Path, sig: int, extra: list[str]) -> dict[str, Any]:
    """Stop `apply` with `sig` half-way through its write phase; report what it said and left, then resume."""
    count_file, log = out.parent / "events", out.parent / "stderr"
    assert run_child(["apply", str(plan), "--out", str(out.parent / "reference"), *extra], count_file=count_file) == 0
    status = run_child(["apply", str(plan), "--out", str(out), *extra], int(count_file.read_text()) // 2, sig=sig, stderr=log)
    partial = surgery.output.partial.partial_folder(out)
    report = {"status": status, "stderr": log.read_text().strip().splitlines(), "state": output_state(out),
              "partial_kept": partial.exists(),
              "journaled_shards": len(surgery.output.partial.read_journal(partial).get("shards", {}))}
    report["resume_status"] = run_child(["apply", str(plan), "--out", str(out), "--resume", *extra], stderr=log)
    report["resume_stderr"] = log.read_text().strip().splitlines()
    report["resumed_identical"] = shard_digests(out) == shard_digests(out.parent / "reference")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    kill = commands.add_parser("kill", help="the kill experiment; prints JSON")
    kill.add_argument("plan", type=Path)
    kill.add_argument("--out", type=Path, required=True)
    kill.add_argument("--points", type=int, default=60)
    kill.add_argument("--summary", action="store_true", help="leave out the per-run records")
    term = commands.add_parser("interrupt", help="one run sent SIGTERM or SIGINT half-way; prints JSON")
    term.add_argument("plan", type=Path)
    term.add_argument("--out", type=Path, required=True)
    term.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    fill = commands.add_parser("fill-disk", help="apply with the disk filled after the free-space check")
    fill.add_argument("plan", type=Path)
    fill.add_argument("--out", type=Path, required=True)
    fill.add_argument("--leave", type=int, default=64 << 10, help="bytes left free")
    args, extra = parser.parse_known_args()
    if args.command != "fill-disk":
        # Resolved once here, so each forked run starts with what resolving imports (transformers, for
        # the structure check) already loaded, as in a long-lived caller: the kills land in the writes.
        surgery.check(args.plan, out=args.out)
    if args.command == "kill":
        result = kill_experiment(args.plan, args.out, args.points, extra)
        if args.summary:
            result.pop("runs")
        print(json.dumps(result, indent=1))
    elif args.command == "interrupt":
        print(json.dumps(interrupt_experiment(args.plan, args.out, getattr(signal, f"SIG{args.signal}"), extra), indent=1))
    else:
        _fill_disk_after_check(args.leave)
        sys.argv = ["surgery", "apply", str(args.plan), "--out", str(args.out), *extra]
        surgery.cli.main()


if __name__ == "__main__":
    main()
