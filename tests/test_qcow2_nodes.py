"""qcow2 nodes and blockdev-create, differentially against qemu-storage-daemon 7.2.

The same images (made by qemu-img on both sides' directories) are opened with the same
blockdev-add commands on both daemons; replies and query-named-block-nodes (flat and not) must
agree, directories and generated node names normalised (tests/test_block_query.py). Images
made by blockdev-create on both sides must give the same `qemu-img info`. What qmpjobd refuses
on purpose (docs/compat.md) is checked on qmpjobd alone: a clear error, the file untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_block_query import Side, _normalise, same_nodes

# The fixture, by its name (a fresh pair of daemons per test: node lists are compared whole).
from tests.test_block_query import sides as sides

MiB = 1 << 20


def shell(side: Side, script: str) -> None:
    subprocess.run(script, shell=True, check=True, cwd=side.dir, capture_output=True)


def chain(sides: list[Side]) -> None:
    """base.raw <- mid.qcow2 <- top.qcow2 (data in each), a version 2 image, an image whose
    backing file is missing, and two that name each other."""
    for side in sides:
        shell(side, """
            qemu-img create -q -f raw base.raw 4M
            qemu-io -f raw -c 'write -P 1 0 1M' base.raw
            qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 4M
            qemu-io -c 'write -P 2 1M 1M' mid.qcow2
            qemu-img create -q -f qcow2 -o cluster_size=4096 -b mid.qcow2 -F qcow2 top.qcow2 4M
            qemu-io -c 'write -P 3 2M 64k' -c 'write -z 3M 64k' top.qcow2
            qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
            qemu-img create -q -f qcow2 -u -b missing.qcow2 -F qcow2 m.qcow2 1M
            qemu-img create -q -f qcow2 nofmt.qcow2 1M
            qemu-img create -q -f qcow2 -u -b nofmt.qcow2 -F raw wrongfmt.qcow2 1M
        """)


# qmpjobd names the image and the node before QEMU's words on a damaged image (docs/compat.md).
_NAMED = re.compile(r"Image '[^']*' \(node '[^']*'\): ")


def replies(sides: list[Side], command: str, arguments: dict[str, Any]) -> Any:
    """The command's reply on both daemons, which must agree (normalised); qmpjobd's."""
    found = []
    for side in sides:
        args = json.loads(json.dumps(arguments).replace("DIR", str(side.dir)))
        found.append(_normalise(side.conn.execute(command, args), str(side.dir)))
    ours = found[1]
    if "error" in ours:
        found[1] = {"error": {**ours["error"], "desc": _NAMED.sub("", ours["error"]["desc"])}}
    assert found[0] == found[1], (command, arguments, found)
    return ours


def qcow2(name: str, image: str, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": f"DIR/{image}"}, **extra}


def test_a_chain_opened_from_the_headers(sides: list[Side]) -> None:
    chain(sides)
    assert replies(sides, "blockdev-add", qcow2("top", "top.qcow2")) == {"return": {}}
    nodes = same_nodes(sides)
    top = next(node for node in nodes if node["node-name"] == "top")
    assert top["backing_file_depth"] == 2
    assert top["image"]["backing-image"]["backing-image"]["format"] == "raw"
    assert len(nodes) == 6  # three images, each a format node over a file node
    assert same_nodes(sides, flat=True)
    replies(sides, "blockdev-del", {"node-name": "top"})
    assert same_nodes(sides) == []


@pytest.mark.parametrize("cache", [
    {"l2-cache-size": 1024}, {"l2-cache-size": -1}, {"refcount-cache-size": -5},
    {"cache-size": 100, "l2-cache-size": 50, "refcount-cache-size": 10},
    {"cache-size": 100, "l2-cache-size": 200}, {"cache-size": 100, "refcount-cache-size": 200},
    {"l2-cache-entry-size": 1000}, {"l2-cache-entry-size": 256},
    {"l2-cache-entry-size": 131072}, {"l2-cache-entry-size": 4096, "cache-size": 0},
    {"cache-size": 1 << 62}, {"l2-cache-size": 1 << 62},
    {"l2-cache-size": 1 << 62, "l2-cache-entry-size": 512}, {"refcount-cache-size": 1 << 50},
    {"cache-size": 1 << 44, "l2-cache-size": 1 << 20},
    {"cache-size": 1 << 50, "refcount-cache-size": 1 << 20}, {"cache-size": 1000},
])
def test_cache_options(sides: list[Side], cache: dict[str, int]) -> None:
    """The metadata cache's sizes: QEMU's checks, in its order, with its words."""
    chain(sides)
    if replies(sides, "blockdev-add", qcow2("top", "top.qcow2", **cache)) == {"return": {}}:
        same_nodes(sides)


def test_backing_chosen_by_blockdev_add(sides: list[Side]) -> None:
    chain(sides)
    for arguments in (
        {"driver": "file", "node-name": "v2f", "filename": "DIR/v2.qcow2"},
        {"driver": "qcow2", "node-name": "v2", "file": "v2f", "read-only": True},
        qcow2("none", "m.qcow2", backing=None),
        qcow2("by-name", "mid.qcow2", backing="v2", **{"read-only": True}),
        qcow2("inline", "mid.qcow2", **{"read-only": True}, backing={
            "driver": "raw", "node-name": "inb",
            "file": {"driver": "file", "filename": "DIR/base.raw"}}),
        ("blockdev-del", {"node-name": "v2"}),
        ("blockdev-del", {"node-name": "inb"}),
    ):
        if isinstance(arguments, tuple):
            replies(sides, *arguments)
        else:
            replies(sides, "blockdev-add", arguments)
    same_nodes(sides)
    same_nodes(sides, flat=True)
    replies(sides, "blockdev-del", {"node-name": "by-name"})
    replies(sides, "blockdev-del", {"node-name": "v2"})
    same_nodes(sides)


@pytest.mark.parametrize(("name", "image", "extra"), [
    ("missing", "m.qcow2", {}),
    ("missing-ro", "m.qcow2", {"read-only": True}),
    ("not-qcow2", "base.raw", {}),
    ("no-file", "nothing.qcow2", {}),
])
def test_images_that_do_not_open(sides: list[Side], name: str, image: str,
                                 extra: dict[str, Any]) -> None:
    chain(sides)
    reply = replies(sides, "blockdev-add", qcow2(name, image, **extra))
    assert "error" in reply
    if name in ("not-qcow2", "missing", "missing-ro"):  # names the image and node
        assert reply["error"]["desc"].startswith(f"Image 'DIR/{image}' (node '{name}'): ")
    assert same_nodes(sides) == []


def without_format(image: Path, backing: str) -> None:
    """Name BACKING in IMAGE's header with no format (qemu-img no longer writes such)."""
    from qmpjobd.block.drivers.qcow2.hostfile import HostFile
    from qmpjobd.block.drivers.qcow2.image import Qcow2Image

    fd = os.open(image, os.O_RDWR)
    try:
        opened = Qcow2Image(HostFile(fd), writable=True)
        opened.set_backing(backing, None)
        opened.close()
    finally:
        os.close(fd)


def test_backing_formats_named_wrongly_or_not_at_all(sides: list[Side]) -> None:
    """A backing file opened in the format the header names, even a wrong one; without one,
    in the format its first bytes show."""
    chain(sides)
    for side in sides:
        shell(side, "qemu-img create -q -f qcow2 probe-q.qcow2 1M; "
                    "qemu-img create -q -f qcow2 probe-r.qcow2 1M")
        without_format(side.dir / "probe-q.qcow2", "nofmt.qcow2")
        without_format(side.dir / "probe-r.qcow2", "base.raw")
    for name, image in (("wrong", "wrongfmt.qcow2"), ("pq", "probe-q.qcow2"),
                        ("pr", "probe-r.qcow2")):
        assert replies(sides, "blockdev-add", qcow2(name, image, **{"read-only": True})) == {
            "return": {}}
    same_nodes(sides)


def test_an_image_opened_twice_meets_its_lock(sides: list[Side]) -> None:
    chain(sides)
    replies(sides, "blockdev-add", qcow2("top", "top.qcow2"))
    assert "lock" in replies(sides, "blockdev-add", qcow2("again", "top.qcow2"))["error"]["desc"]
    assert "lock" in replies(sides, "blockdev-add", qcow2("again", "top.qcow2", **{
        "read-only": True}))["error"]["desc"]
    # Its backing file is read by both: a second reader is welcome.
    replies(sides, "blockdev-add", qcow2("mid", "mid.qcow2", **{"read-only": True}))
    same_nodes(sides)


def test_a_chain_that_loops_is_refused(sides: list[Side]) -> None:
    """QSD hangs on a read-only chain that loops (docs/compat.md): qmpjobd alone here."""
    ours = sides[1]
    shell(ours, """
        qemu-img create -q -f qcow2 a.qcow2 1M
        qemu-img create -q -f qcow2 -u -b a.qcow2 -F qcow2 b.qcow2 1M
        qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2
    """)
    for read_only in (False, True):
        reply = ours.conn.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "a", "read-only": read_only,
            "file": {"driver": "file", "filename": str(ours.dir / "a.qcow2")}})
        assert "loops back" in reply["error"]["desc"] or "lock" in reply["error"]["desc"]
    assert ours.conn.execute("query-named-block-nodes")["return"] == []


# -- blockdev-create ----------------------------------------------------------------------------


def create(side: Side, options: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """blockdev-create of a qcow2 image in a new file: the reply and query-jobs at the end."""
    conn = side.conn
    path = str(side.dir / "new.qcow2")
    for job, opts in (("f", {"driver": "file", "filename": path, "size": 0}),
                      ("q", {"driver": "qcow2", "file": "new", **options})):
        if job == "q":
            assert conn.execute("blockdev-add", {"driver": "file", "node-name": "new",
                                                 "filename": path}) == {"return": {}}
        reply = conn.execute("blockdev-create", {"job-id": job, "options": opts})
        if "error" in reply:
            return reply, []
        done = {"event": "JOB_STATUS_CHANGE", "data": {"id": job, "status": "concluded"}}
        while not any(e["event"] == done["event"] and e["data"] == done["data"]
                      for e in conn.events):
            conn.events.append(conn.receive(timeout=30))
        conn.events.clear()
        jobs = conn.execute("query-jobs")["return"]
        conn.execute("job-dismiss", {"id": job})
    return reply, jobs


def info(path: Path) -> Any:
    done = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                          text=True, check=True)
    found = json.loads(done.stdout)
    found.pop("filename")
    return _normalise(found, str(path.parent))


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The ranges of PATH that hold blocks (SEEK_DATA / SEEK_HOLE)."""
    ranges = []
    with open(path, "rb") as f:
        fd, end, position = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while position < end:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past POSITION
                break
            position = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, position))
    return ranges


@pytest.mark.parametrize("options", [
    {"size": 4 * MiB},
    {"size": 1 << 30, "cluster-size": 4096, "lazy-refcounts": True, "refcount-bits": 8},
    {"size": MiB, "version": "v2", "backing-file": "base.img", "backing-fmt": "raw"},
    {"size": 16 * MiB, "preallocation": "metadata"},
    {"size": MiB, "cluster-size": 512, "refcount-bits": 1, "version": "v3"},
    {"size": 1 << 50},
    {"size": 1000},
    {"size": MiB, "cluster-size": 1000},
    {"size": MiB, "version": "v2", "lazy-refcounts": True},
])
def test_blockdev_create(sides: list[Side], options: dict[str, Any]) -> None:
    results = [create(side, options) for side in sides]
    assert results[0] == results[1]
    paths = [side.dir / "new.qcow2" for side in sides]
    if "error" not in results[0][1][0]:
        # actual-size counts the file system's own blocks too (an extent index block once a
        # file is in enough pieces, which depends on the free space): the blocks that hold
        # the image's data are compared instead, range by range.
        found = [info(path) for path in paths]
        for entry in found:
            entry.pop("actual-size")
        assert found[0] == found[1]
        assert data_ranges(paths[0]) == data_ranges(paths[1])
        assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize(("options", "words"), [
    ({"extended-l2": True}, "qcow2 option 'extended-l2' is not supported by qmpjobd"),
    ({"compression-type": "zstd"}, "qcow2 option 'compression-type' is not supported"),
    ({"preallocation": "full"}, "qcow2 preallocation 'full' is not supported by qmpjobd"),
    ({"preallocation": "falloc"}, "qcow2 preallocation 'falloc' is not supported"),
    ({"encrypt": {"format": "luks", "key-secret": "s"}}, "qcow2 option 'encrypt' is not"),
])
def test_blockdev_create_refusals(sides: list[Side], options: dict[str, Any],
                                  words: str) -> None:
    ours = sides[1]
    _, jobs = create(ours, {"size": MiB, **options})
    assert jobs[0]["error"].startswith(words)
    assert (ours.dir / "new.qcow2").stat().st_size == 0  # nothing written
