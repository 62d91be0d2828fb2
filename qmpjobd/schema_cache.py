"""The compiled schema, kept between starts.

Reading the QAPI files is most of what the daemon does at start-up beside importing trio (about
20 ms of parsing, against 3 to unpickle the result), and the files seldom change. An entry is
one file in the cache directory, named by what was asked of the compiler: the root file and the
users' files by path, the transaction actions amended in, and the versions of qmpjobd, Python and
the compiler's own source. It holds every file the compile read, with a BLAKE2 digest of the
bytes read, then the schema, pickled, without its documentation comments.

An entry is used only when each file it lists still has the same digest: a changed, moved or
vanished file compiles afresh, and so does an entry that cannot be read for any reason (it is
then replaced). A compile that fails is not kept: a bad schema is reported at every start.

Unpickling can run code, so an entry is read only from a directory that is this user's and
that nobody else may write, and only if the file is this user's and nobody else's to write. The
directory is $CACHE_DIRECTORY (systemd's CacheDirectory=), else $XDG_CACHE_HOME/qmpjobd, else
~/.cache/qmpjobd. When none can be used the schema is compiled at every start, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .qapi.schema import Schema, load_schema_sources

if TYPE_CHECKING:
    from .qapi.parser import TopLevel

log = logging.getLogger(__name__)

# Changed whenever an entry's layout changes.
FORMAT = 1
# Entries kept; beyond that the least recently used go (each distinct set of users' files makes
# one, and a test suite makes many).
KEEP = 16
PREFIX, SUFFIX, TEMPORARY = "schema-", ".pickle", ".tmp-"
_COMPILER = Path(__file__).resolve().parent / "qapi"


def default_directory() -> str | None:
    """Where entries go: $CACHE_DIRECTORY, $XDG_CACHE_HOME/qmpjobd or ~/.cache/qmpjobd."""
    given = os.environ.get("CACHE_DIRECTORY")
    if given:
        return given.split(":")[0]  # systemd lists several when the unit names several
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "qmpjobd")
    home = os.path.expanduser("~")
    return None if home == "~" else os.path.join(home, ".cache", "qmpjobd")


def load(fname: str, extra: Sequence[str], amend: Callable[[list[TopLevel]], None] | None,
         amended: Sequence[object], directory: str | None) -> Schema:
    """load_schema(FNAME, EXTRA, AMEND), from DIRECTORY's entry when it is still good, else
    compiled (and the entry written, if DIRECTORY allows). AMENDED is what AMEND adds, by
    value: it is part of the entry's name."""
    entry = None
    if directory is not None:
        entry = os.path.join(directory, PREFIX + _key(fname, extra, amended) + SUFFIX)
        schema = _read(directory, entry)
        if schema is not None:
            log.debug("schema: from the cache, %s", entry)
            return schema
    schema, sources = load_schema_sources(fname, extra, amend)
    schema.drop_docs()
    if directory is not None and entry is not None:
        _write(directory, entry, schema, sources)
    return schema


def _key(fname: str, extra: Sequence[str], amended: Sequence[object]) -> str:
    compiler = sorted(
        (entry.name, info.st_size, info.st_mtime_ns)
        for entry in os.scandir(_COMPILER) if entry.name.endswith(".py")
        for info in (entry.stat(),)
    )
    # Paths both as given (the schema's messages name them so) and absolute (what they are).
    files = [(name, os.path.abspath(name)) for name in (fname, *extra)]
    material = repr((FORMAT, __version__, sys.version, compiler, files, list(amended)))
    return hashlib.blake2b(material.encode(), digest_size=16).hexdigest()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _trusted(info: os.stat_result) -> bool:
    """Whether only this user could have written what INFO describes."""
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _read(directory: str, entry: str) -> Schema | None:
    try:
        where = os.lstat(directory)
        if not stat.S_ISDIR(where.st_mode) or not _trusted(where):
            log.info("schema cache: %s is not a directory of this user's alone: not used",
                     directory)
            return None
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # no directory or no entry yet (a symlink is refused: ELOOP)
    with open(fd, "rb") as stream:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not _trusted(info):
            log.info("schema cache: %s is not a file of this user's alone: not used", entry)
            return None
        try:
            sources = pickle.load(stream)
            for path, digest in sources.items():
                with open(path, "rb") as source:
                    if _digest(source.read()) != digest:
                        return None
            schema = pickle.load(stream)
        except Exception as exc:  # a file vanished, a torn or older entry: compile afresh
            log.debug("schema cache: %s not used: %s", entry, exc)
            return None
    if not isinstance(schema, Schema):
        return None
    with contextlib.suppress(OSError):
        os.utime(entry)  # recently used: kept when older entries go
    return schema


def _write(directory: str, entry: str, schema: Schema, sources: dict[str, bytes]) -> None:
    """Best effort: a cache that cannot be written costs the next start its compile."""
    digests = {path: _digest(data) for path, data in sources.items()}
    temporary = None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        where = os.lstat(directory)
        if not stat.S_ISDIR(where.st_mode) or not _trusted(where):
            return
        data = pickle.dumps(digests, pickle.HIGHEST_PROTOCOL) + pickle.dumps(
            schema, pickle.HIGHEST_PROTOCOL)
        fd, temporary = tempfile.mkstemp(prefix=TEMPORARY, dir=directory)
        with open(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, entry)
        temporary = None
        _prune(directory)
    except (OSError, RecursionError, pickle.PicklingError) as exc:
        log.debug("schema cache: %s not written: %s", entry, exc)
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _prune(directory: str) -> None:
    """Only the KEEP most recently used entries stay, and no temporary file a start that was
    killed as it wrote left a day ago (only files named as ours go)."""
    entries: list[tuple[int, str]] = []
    day_ago = (time.time() - 86400) * 1e9
    for found in os.scandir(directory):
        with contextlib.suppress(OSError):
            when = found.stat(follow_symlinks=False).st_mtime_ns
            if found.name.startswith(PREFIX) and found.name.endswith(SUFFIX):
                entries.append((when, found.path))
            elif found.name.startswith(TEMPORARY) and when < day_ago:
                os.unlink(found.path)
    entries.sort(reverse=True)
    for _, path in entries[KEEP:]:
        with contextlib.suppress(OSError):
            os.unlink(path)
