"""Invalid schemas are rejected with QEMU's message at QEMU's location.

Two corpora: our own (tests/qapi/bad, one rule each, the expected text on the first line) and
QEMU 7.2's test schemas with their recorded .err files, read from the fetched source.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpjobd.qapi import QapiError, load_schema
from tests.conftest import fetched_qemu_source, missing

HERE = Path(__file__).resolve().parent
OWN_CORPUS = sorted((HERE / "qapi" / "bad").glob("*.json")) + sorted(
    (HERE / "qapi" / "good").glob("*.json")
)
# Collected from QEMU's source, which is fetched here if it is not there yet.
QEMU_TESTS = fetched_qemu_source()[0] / "tests/qapi-schema"
QEMU_CORPUS = sorted(p for p in QEMU_TESTS.glob("*.json") if p.with_suffix(".err").exists())


def outcome(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What compiling PATH gives, as QEMU's tests record it: the error text, or ''."""
    monkeypatch.chdir(path.parent)  # messages name files relative to the working directory
    try:
        load_schema(path.name)
    except QapiError as exc:
        return str(exc)
    return ""


def expectation(path: Path) -> str:
    first = path.read_bytes().decode("utf-8", errors="replace").split("\n", 1)[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    expected = first.removeprefix("# expect: ")
    return "" if expected == "ok" else expected.replace(" | ", "\n")


@pytest.mark.parametrize("path", OWN_CORPUS, ids=lambda p: p.name)
def test_own_corpus(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert outcome(path, monkeypatch) == expectation(path)


def test_own_corpus_is_substantial() -> None:
    assert len(OWN_CORPUS) >= 100


@pytest.mark.parametrize("path", QEMU_CORPUS, ids=lambda p: p.name)
def test_qemu_corpus(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = path.with_suffix(".err").read_text(encoding="utf-8").rstrip("\n")
    assert outcome(path, monkeypatch) == expected


def test_qemu_corpus_is_present() -> None:
    if len(QEMU_CORPUS) < 150:
        missing(f"QEMU's schema tests not found in {QEMU_TESTS}; run scripts/fetch-qemu-source")
