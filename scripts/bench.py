#!/usr/bin/env python3
"""Benchmarks, each side by side with QEMU's own implementation in the same run, as ratios.

    scripts/bench.py schema     compile our schema, QSD's and the emulator's: qmpjobd's compiler
                                against QEMU 7.2's generator front end (scripts/qapi, from the
                                fetched source), best of N runs each

Timings are printed, never asserted: the suite has no timed tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def qemu_source() -> Path:
    out = subprocess.run(
        [str(REPO / "scripts" / "fetch-qemu-source")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def best_of(runs: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def bench_schema(runs: int) -> None:
    from qmpjobd.qapi import load_schema

    tree = qemu_source()
    sys.path.insert(0, str(tree / "scripts"))
    from qapi.schema import QAPISchema  # QEMU's generator, run from the fetched source

    files = {
        "qmpjobd schema/": REPO / "schema" / "qapi-schema.json",
        "QSD (storage-daemon/qapi)": tree / "storage-daemon" / "qapi" / "qapi-schema.json",
        "emulator (qapi/)": tree / "qapi" / "qapi-schema.json",
    }
    print(f"{'schema':28} {'qmpjobd':>10} {'QEMU 7.2':>10} {'ratio':>7}   (best of {runs})")
    for label, path in files.items():
        os.chdir(path.parent)
        ours = best_of(runs, lambda p=path: load_schema(p.name))
        theirs = best_of(runs, lambda p=path: QAPISchema(p.name))
        print(f"{label:28} {ours * 1e3:8.1f}ms {theirs * 1e3:8.1f}ms {ours / theirs:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", choices=["schema"])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if args.what == "schema":
        bench_schema(args.runs)


if __name__ == "__main__":
    main()
