"""How long building every demo/test model takes from nothing (target: <= 5 minutes on 2 cores).

    python benchmarks/bench_fixtures.py
"""

from __future__ import annotations

import os
import tempfile
import time


def main() -> None:
    os.environ["SURGERY_CACHE"] = tempfile.mkdtemp(prefix="surgery-fixtures-")
    from surgery.demo_models import demo_model, demo_names

    start = time.perf_counter()
    for name in demo_names():
        began = time.perf_counter()
        demo_model(name)
        print(f"{name:<18} {time.perf_counter() - began:6.1f} s")
    print(f"{'all':<18} {time.perf_counter() - start:6.1f} s  (cache: {os.environ['SURGERY_CACHE']})")


if __name__ == "__main__":
    main()
