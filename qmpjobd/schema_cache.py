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

Unpickling can run code, so an entry is read only if nobody but this user could have put it
there: the file and its directory are this user's and nobody else's to write, every directory
above is this user's or root's and, if others may write it, sticky (as /tmp is), and every
symbolic link on the way is this user's or root's. The path is walked one component at a time,
each opened relative to the last, and every entry is reached through the directory's
descriptor: nobody can swap a directory for another between the checks and the use. The
directory is $CACHE_DIRECTORY (systemd's CacheDirectory=), else $XDG_CACHE_HOME/qmpjobd, else
~/.cache/qmpjobd. When none can be used the schema is compiled at every start, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import secrets
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

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
    value: it is part of the entry's name, as is the file AMEND's code is in."""
    where = name = None
    if directory is not None:
        try:
            name = PREFIX + _key(fname, extra, amended, amend) + SUFFIX
            where = _open_directory(directory)
        except OSError as exc:  # (a source file moved as it was looked at, say)
            log.debug("schema cache: not used: %s", exc)
    try:
        if where is not None and name is not None:
            schema = _read(where, name)
            if schema is not None:
                log.debug("schema: from the cache, %s", os.path.join(where.path, name))
                return schema
        schema, sources = load_schema_sources(fname, extra, amend)
        schema.drop_docs()
        if where is not None and name is not None:
            _write(where, name, schema, sources)
        return schema
    finally:
        if where is not None:
            os.close(where.fd)


def _stat(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def _key(fname: str, extra: Sequence[str], amended: Sequence[object],
         amend: Callable[..., object] | None) -> str:
    # The compiler's code, and the code that amends what it reads: either may change the
    # result (a development checkout changes them without a new version).
    code = sorted((entry.name, *_stat(entry.path)) for entry in os.scandir(_COMPILER)
                  if entry.name.endswith(".py"))
    if amend is not None:
        code.append((amend.__code__.co_filename, *_stat(amend.__code__.co_filename)))
    # Paths both as given (the schema's messages name them so) and absolute (what they are).
    files = [(name, os.path.abspath(name)) for name in (fname, *extra)]
    material = repr((FORMAT, __version__, sys.version, code, files, list(amended)))
    return hashlib.blake2b(material.encode(), digest_size=16).hexdigest()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _trusted(info: os.stat_result) -> bool:
    """Whether only this user could have written what INFO describes."""
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class _Directory(NamedTuple):
    path: str  # for messages: every use goes through the descriptor
    fd: int


def _open_directory(directory: str) -> _Directory | None:
    """DIRECTORY, made if need be and opened, if only this user could have put anything in
    it; else None, said in the log. It is walked from / one component at a time, each opened
    relative to the one before, never by path again: every directory on the way is this
    user's or root's and, if others may write it, sticky (where others cannot move what is
    not theirs); a symbolic link on the way is followed only if it is this user's or root's;
    the directory itself is this user's, and nobody else's to write."""
    pending = [part for part in os.path.abspath(directory).split(os.sep) if part]
    if not pending:
        return None  # not / itself
    fd = os.open(os.sep, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked: list[str] = []  # the path of fd, for messages and links
    hops = 0
    try:
        while True:
            info = os.fstat(fd)
            here = os.sep + os.sep.join(walked)
            if info.st_uid not in (0, os.geteuid()):
                log.info("schema cache: %s is in %s, which is another user's: not used",
                         directory, here)
                return None
            if not pending:
                if not _trusted(info):
                    log.info("schema cache: %s is not a directory of this user's alone: not "
                             "used", directory)
                    return None
                found, fd = _Directory(here, fd), -1
                return found
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
                log.info("schema cache: %s is in %s, which others may change: not used",
                         directory, here)
                return None
            part = pending.pop(0)
            try:
                link = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):  # (another start made it first)
                    os.mkdir(part, 0o700, dir_fd=fd)
                link = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(link.st_mode):
                hops += 1
                if hops > 16 or link.st_uid not in (0, os.geteuid()):
                    log.info("schema cache: %s goes through a link that is another user's "
                             "(or too many): not used", directory)
                    return None
                target = os.readlink(part, dir_fd=fd)
                base = os.sep if target.startswith(os.sep) else here
                pending = [p for p in os.path.join(base, target).split(os.sep) if p] + pending
                os.close(fd)
                fd, walked = os.open(os.sep, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), []
                continue
            if part == "..":  # (a link's target may climb)
                walked = walked[:-1]
            elif part != ".":
                walked.append(part)
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError as exc:
        log.debug("schema cache: %s cannot be used: %s", directory, exc.strerror)
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _read(where: _Directory, name: str) -> Schema | None:
    try:
        # (Not blocking: a FIFO in its place must not stop start-up before fstat sees it.)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=where.fd)
    except OSError:
        return None  # no entry yet (a symlink is refused: ELOOP)
    with open(fd, "rb") as stream:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not _trusted(info):
            log.info("schema cache: %s is not a file of this user's alone: not used",
                     os.path.join(where.path, name))
            return None
        try:
            sources = pickle.load(stream)
            for path, digest in sources.items():
                with open(path, "rb") as source:
                    if _digest(source.read()) != digest:
                        return None
            schema = pickle.load(stream)
        except Exception as exc:  # a file vanished, a torn or older entry: compile afresh
            log.debug("schema cache: %s not used: %s", name, exc)
            return None
    if not isinstance(schema, Schema):
        return None
    with contextlib.suppress(OSError):
        os.utime(name, dir_fd=where.fd)  # recently used: kept when older entries go
    return schema


def _write(where: _Directory, name: str, schema: Schema, sources: dict[str, bytes]) -> None:
    """Best effort: a cache that cannot be written costs the next start its compile."""
    digests = {path: _digest(data) for path, data in sources.items()}
    temporary = None
    try:
        data = pickle.dumps(digests, pickle.HIGHEST_PROTOCOL) + pickle.dumps(
            schema, pickle.HIGHEST_PROTOCOL)
        temporary = TEMPORARY + secrets.token_hex(8)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=where.fd)
        with open(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, name, src_dir_fd=where.fd, dst_dir_fd=where.fd)
        temporary = None
        _prune(where.fd)
    except (OSError, RecursionError, pickle.PicklingError) as exc:
        log.debug("schema cache: %s not written: %s", name, exc)
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=where.fd)


def _prune(directory: int) -> None:
    """Only the KEEP most recently used entries stay in the DIRECTORY (a descriptor), and no
    temporary file a start that was killed as it wrote left a day ago (only files named as
    ours go)."""
    entries: list[tuple[int, str]] = []
    day_ago = (time.time() - 86400) * 1e9
    for found in os.scandir(directory):
        with contextlib.suppress(OSError):
            when = found.stat(follow_symlinks=False).st_mtime_ns
            if found.name.startswith(PREFIX) and found.name.endswith(SUFFIX):
                entries.append((when, found.name))
            elif found.name.startswith(TEMPORARY) and when < day_ago:
                os.unlink(found.name, dir_fd=directory)
    entries.sort(reverse=True)
    for _, name in entries[KEEP:]:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=directory)
