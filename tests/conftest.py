"""Shared fixtures: where QEMU's source is, and a live qemu-storage-daemon to compare with."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import DaemonProcess, QmpConnection, QsdProcess, start_qmpjobd

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "schema" / "qapi-schema.json"
# Where scripts/fetch-qemu-source unpacks QEMU's source (the same rule as the script's).
_CACHE = Path(
    os.environ.get("QMPJOBD_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qmpjobd"
)
DEFAULT_QEMU_SOURCE = _CACHE / "qemu-src" / "tree"


def missing(reason: str) -> None:
    """Skip a test whose reference is not installed, except in CI, where that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


@functools.cache
def fetched_qemu_source() -> tuple[Path, str]:
    """The unpacked QEMU 7.2 source tree, and why it is missing ("" if it is there). The first
    test that needs it fetches it with scripts/fetch-qemu-source (once: it stays in the cache,
    outside the repository); setting up and running the daemon never needs it."""
    given = os.environ.get("QMPJOBD_QEMU_SOURCE")
    path = Path(given or DEFAULT_QEMU_SOURCE)
    if not _is_qemu_tree(path) and not given:
        fetch = subprocess.run(
            [str(REPO / "scripts" / "fetch-qemu-source")], capture_output=True, text=True
        )
        if fetch.returncode != 0:
            return path, f"scripts/fetch-qemu-source failed: {fetch.stderr.strip()[-500:]}"
        path = Path(fetch.stdout.strip())
    if not _is_qemu_tree(path):
        return path, f"QEMU source not found at {path}; run scripts/fetch-qemu-source"
    return path, ""


@pytest.fixture(scope="session")
def qemu_source() -> Path:
    """The unpacked QEMU 7.2 source tree (fetched_qemu_source)."""
    path, why = fetched_qemu_source()
    if why:
        missing(why)
    return path


def _is_qemu_tree(path: Path) -> bool:
    return (path / "storage-daemon" / "qapi" / "qapi-schema.json").is_file()


@pytest.fixture(scope="module")
def qsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QsdProcess]:
    """A qemu-storage-daemon with one QMP monitor socket, for the module's tests."""
    if shutil.which("qemu-storage-daemon") is None:
        missing("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    with QsdProcess.start(tmp_path_factory.mktemp("qsd")) as daemon:
        yield daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """qmpjobd with its product schema, logging to tmp_path/qmpjobd.log."""
    with start_qmpjobd(tmp_path) as process:
        yield process


@pytest.fixture
def conn(daemon: DaemonProcess) -> Iterator[QmpConnection]:
    """A negotiated connection to `daemon`."""
    with daemon.connect() as connection:
        yield connection
