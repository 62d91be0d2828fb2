"""The qcow2 fuzzer (scripts/fuzz.py qcow2, scripts/fuzz_qcow2.py), a seeded run of 20,000
damaged images and chains through the driver's open-and-read path: none may raise anything but
the driver's errors, take over a second, give an error that names neither the node nor the
file, or see a file it failed to open (or opened read-only) written. The million-input runs
are made outside CI with the same script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INPUTS = 20_000


def test_seeded_qcow2_fuzz(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz.py"), "qcow2", "-n", str(INPUTS),
         "-j", "2", "--seed", "7", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    report = json.loads((tmp_path / "report.json").read_text())
    failures = sorted(p.read_text(errors="replace")
                      for p in tmp_path.glob("p*/failures/*/why.txt"))
    assert (done.returncode, report["failures"]) == (0, 0), (done.stderr, failures[:5])
    assert report["inputs"] == INPUTS
    # The damage reached what it aims at: both outcomes, and each kind of refusal.
    assert report["opened"] > INPUTS // 10 and report["refused"] > INPUTS // 10
    words = " | ".join(report["errors"])
    for expected in ("lies past the end of the image file", "loops back",
                     "No such file or directory", "Reference count", "Unsupported cluster size",
                     "Could not open backing file", "header extension"):
        assert expected in words, expected
