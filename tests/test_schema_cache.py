"""The compiled schema kept between starts (qmpjobd/schema_cache.py): a second start reads it
and serves exactly what the first compiled; a changed file, a damaged entry or an entry that
others could have written is compiled afresh, never read."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from qmpjobd import schema_cache
from tests.daemons import QMPJOBD, DaemonProcess, daemon_env, ok

REPO = Path(__file__).resolve().parent.parent
FROM_CACHE = "schema: from the cache"
DOC = "##\n# @{0}:\n#\n# {1}\n##\n"


def run(tmp_path: Path, cache: Path, *options: str, **env: str) -> tuple[Any, str]:
    """Start qmpjobd with CACHE as its cache home; its query-qmp-schema and its log."""
    log = tmp_path / "qmpjobd.log"
    log.unlink(missing_ok=True)
    with DaemonProcess.start(tmp_path, "--log-level", "debug", "--log", str(log), *options,
                             program=QMPJOBD, env=daemon_env(XDG_CACHE_HOME=str(cache), **env)
                             ) as daemon, daemon.connect() as conn:
        schema = ok(conn, "query-qmp-schema")
    return schema, log.read_text()


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "qmpjobd").glob("schema-*.pickle"))


def test_a_second_start_serves_what_the_first_compiled(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, log = run(tmp_path, cache)
    assert FROM_CACHE not in log
    (entry,) = entries(cache)
    assert entry.stat().st_mode & 0o777 == 0o600
    second, log = run(tmp_path, cache)
    assert FROM_CACHE in log
    assert second == first


def test_a_changed_file_is_compiled_again_even_with_its_old_size_and_time(
        tmp_path: Path) -> None:
    schema = tmp_path / "paint.json"
    (tmp_path / "paint.py").write_text(
        "from qmpjobd.api import Context, handler\n\n\n"
        "@handler('x-paint')\nasync def x_paint(ctx: Context, colour: str) -> None:\n"
        "    pass\n")

    def write(colours: str) -> None:
        schema.write_text(DOC.format("XColour", "Colours.") + f"{{ 'enum': 'XColour', 'data': "
                          f"{colours} }}\n" + DOC.format("x-paint", "Paint.")
                          + "{ 'command': 'x-paint', 'data': { 'colour': 'XColour' } }\n")

    def values(served: list[dict[str, Any]]) -> set[str]:
        return {v for entity in served if entity["meta-type"] == "enum"
                for v in entity["values"] if v in ("red", "tan")}

    cache = tmp_path / "cache"
    options = ("--schema", str(schema), "--handlers", "paint")
    write("['red', 'blue']")
    before = schema.stat()
    path = f"{REPO}{os.pathsep}{tmp_path}"  # the handlers' module beside the checkout
    served, _ = run(tmp_path, cache, *options, PYTHONPATH=path)
    assert values(served) == {"red"}
    write("['tan', 'blue']")  # the same length, and the same times put back
    os.utime(schema, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (schema.stat().st_size, schema.stat().st_mtime_ns) == (before.st_size,
                                                                 before.st_mtime_ns)
    served, log = run(tmp_path, cache, *options, PYTHONPATH=path)
    assert FROM_CACHE not in log
    assert values(served) == {"tan"}


def test_a_damaged_entry_is_compiled_again_and_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, _ = run(tmp_path, cache)
    (entry,) = entries(cache)
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])  # torn, as by a crash while it was written
    served, log = run(tmp_path, cache)
    assert FROM_CACHE not in log and served == first
    assert entry.read_bytes() == good
    _, log = run(tmp_path, cache)
    assert FROM_CACHE in log


class _Marks:
    """Unpickled, it makes the directory PATH: proof that an entry was read."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("who", ["the directory", "the file", "nobody"])
def test_an_entry_others_could_have_written_is_never_read(tmp_path: Path, who: str) -> None:
    """Unpickling runs code: an entry is read only if this user alone could have written it
    and its directory. ("nobody": the same entry, private, is read: the check is what keeps
    the others out.)"""
    cache = tmp_path / "cache"
    first, _ = run(tmp_path, cache)
    (entry,) = entries(cache)
    mark = tmp_path / "unpickled"
    entry.write_bytes(pickle.dumps(_Marks(str(mark))))
    if who == "the directory":
        entry.parent.chmod(0o777)
    elif who == "the file":
        entry.chmod(0o666)
    served, log = run(tmp_path, cache)
    assert served == first
    if who == "nobody":
        assert mark.is_dir()  # read (and, being no schema, compiled afresh)
        return
    assert not mark.exists()
    assert f"{entry if who == 'the file' else entry.parent} is not a " in log


@pytest.mark.parametrize("sticky", [False, True])
def test_a_cache_others_could_move_is_not_used(tmp_path: Path, sticky: bool) -> None:
    """Under a directory others may write, the cache's own could be swapped for another:
    unless that directory is sticky (as /tmp is), the cache is not used at all."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777 if sticky else 0o777)
    cache = shared / "home"
    first, log = run(tmp_path, cache)
    if sticky:
        assert entries(cache) and "which others may change" not in log
        assert FROM_CACHE in run(tmp_path, cache)[1]
        return
    assert f"is in {shared}, which others may change: not used" in log
    assert not entries(cache)
    again, log = run(tmp_path, cache)
    assert FROM_CACHE not in log and again == first


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a link to another uid")
@pytest.mark.parametrize("owner", [0, 65534])
def test_a_link_on_the_way_is_followed_only_if_it_is_ours(tmp_path: Path, owner: int) -> None:
    """A link in a sticky directory (as systemd's DynamicUser= makes $CACHE_DIRECTORY one),
    to a directory of ours: followed if the link is ours or root's, not if another user's
    (who could point it at any directory of ours)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (shared / "home").symlink_to(target)
    os.lchown(shared / "home", owner, owner)
    (target / "qmpjobd").mkdir(mode=0o700)
    keep = target / "qmpjobd" / ".tmp-keep"
    keep.write_bytes(b"")
    os.utime(keep, (0, 0))  # old: a prune there would remove it
    _, log = run(tmp_path, shared / "home")
    if owner == 0:
        assert entries(target) and not keep.exists()
        assert FROM_CACHE in run(tmp_path, shared / "home")[1]
    else:
        assert "goes through a link that is another user's" in log
        assert not entries(target) and keep.exists()


def test_a_fifo_for_an_entry_stops_nothing(tmp_path: Path) -> None:
    """Opened without waiting: a FIFO where an entry should be is not read, and replaced."""
    cache = tmp_path / "cache"
    first, _ = run(tmp_path, cache)
    (entry,) = entries(cache)
    entry.unlink()
    os.mkfifo(entry, 0o600)
    served, log = run(tmp_path, cache)
    assert served == first and "is not a file of this user's alone" in log
    assert entry.is_file()


def test_only_the_most_recently_used_entries_stay(tmp_path: Path) -> None:
    now = time.time()
    for n in range(schema_cache.KEEP + 4):
        path = tmp_path / f"schema-{n}.pickle"
        path.write_bytes(b"")
        os.utime(path, (now - 1000 + n, now - 1000 + n))
    for name, age in ((".tmp-old", 2 * 86400), (".tmp-new", 60), ("notes.txt", 3 * 86400)):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (now - age, now - age))
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        schema_cache._prune(directory)
    finally:
        os.close(directory)
    left = {path.name for path in tmp_path.iterdir()}
    assert left == {f"schema-{n}.pickle" for n in range(4, schema_cache.KEEP + 4)} | {
        ".tmp-new", "notes.txt"}


def test_no_cache_where_none_can_be(tmp_path: Path) -> None:
    """A cache home that cannot be made (a file in its way): the schema is compiled, as
    before there was a cache."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    served, log = run(tmp_path, blocked)
    again, log = run(tmp_path, blocked)
    assert FROM_CACHE not in log and again == served
    assert blocked.read_text() == "not a directory"
