"""scripts/fuzz.py must keep working: short runs of each mode, checked through report.json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "scripts" / "fuzz.py"
CORPUS = REPO / "tests" / "fuzz-corpus"


def run(workdir: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, str(FUZZ), *args, "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    report = workdir / "report.json"
    assert report.exists(), result.stdout + result.stderr
    return result.returncode, json.loads(report.read_text())


def test_corpus_is_small_and_has_qsd_transcripts() -> None:
    files = list(CORPUS.iterdir())
    assert sum(f.stat().st_size for f in files) < 200 * 1024
    assert any(f.name.startswith("qsd-") for f in files)
    assert any(f.name.startswith("edge-") for f in files)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_protocol_atheris(tmp_path: Path) -> None:
    status, report = run(tmp_path, "protocol", "-n", "400", "--max-len", "128",
                         "--engine", "atheris")
    assert (status, report["failures"], report["inputs"]) == (0, 0, 400), report
    assert report["engine"] == "atheris"
    # The corpus (replayed under coverage.py) reaches nearly every branch already.
    assert report["coverage"]["branch_percent"] > 90, report["coverage"]


def test_protocol_random(tmp_path: Path) -> None:
    status, report = run(tmp_path, "protocol", "-n", "100", "--engine", "random", "--seed", "3",
                         "--max-len", "256")
    assert (status, report["failures"], report["inputs"]) == (0, 0, 100), report
    assert report["coverage"]["num_branches"] > 200


def test_replay(tmp_path: Path) -> None:
    """Replay (how a saved failure is reproduced) checks the inputs it is given."""
    clean = tmp_path / "clean.bin"
    clean.write_bytes(b'{"execute": "qmp_capabilities"}{"execute": "x", "id": 1e400}')
    status, report = run(tmp_path / "w", "replay", str(clean))
    assert (status, report["inputs"], report["failures"]) == (0, 1, 0), report


def test_live(tmp_path: Path) -> None:
    _, report = run(tmp_path, "live", "-n", "120", "--seed", "5")
    assert report["inputs"] == 120, report
    # No malformed reply, hang, lost connection, dead daemon, or internal error in the log.
    assert report["failure_kinds"] == {}, report
    assert report["coverage"]["num_branches"] > 200
