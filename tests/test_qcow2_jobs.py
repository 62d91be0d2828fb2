"""Jobs on qcow2 backing chains, differentially against qemu-storage-daemon 7.2.

Each test builds the same chain of images with qemu-img and qemu-io on both sides (2 to 4
images, mixed cluster sizes, a raw or qcow2 base, partly written clusters, zero clusters, a base
with data past its overlay's size), runs the same conversation on both daemons, and compares
the replies, the events (timestamps left out) and what query-named-block-nodes says of the test's
nodes (actual-size left out: ext4 noise). Afterwards, on every image: `qemu-img check` finds
it clean, `qemu-img compare` finds both sides' equal, and `qemu-img map --output=json` (host
offsets left out) shows the same allocation.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_block_files import Side, daemons  # noqa: F401 (the module's daemons)
from tests.test_block_files import sides as sides
from tests.test_block_query import JOB_FILTERS, _normalise

WAIT = 30.0
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)

# Chains, as shell scripts run in each side's directory.
CHAINS = {
    # base.raw <- mid.qcow2 <- top.qcow2: a raw base, 64 KiB and 4 KiB clusters, a cluster
    # written in part, a zero cluster in the middle image.
    "three": """
        qemu-img create -q -f raw base.raw 4M
        qemu-io -f raw -c 'write -P 1 0 1M' -c 'write -P 4 3M 100k' base.raw
        qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 4M
        qemu-io -c 'write -P 2 1M 1M' -c 'write -z 3M 64k' -c 'write -P 5 3600k 3000' mid.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=4096 -b mid.qcow2 -F qcow2 top.qcow2 4M
        qemu-io -c 'write -P 3 2M 64k' -c 'write -P 6 1000k 5000' -c 'write -z 3080k 8k' top.qcow2
    """,
    # base.qcow2 (512-byte clusters, 6 MiB, data past 4 MiB) <- m1 (2 MiB clusters, version 2)
    # <- m2 <- top: four images, the overlays 4 MiB.
    "four": """
        qemu-img create -q -f qcow2 -o cluster_size=512 base.qcow2 6M
        qemu-io -c 'write -P 1 0 700k' -c 'write -P 7 5M 512k' -c 'write -z 2M 1M' \
            base.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=2M,compat=0.10 \
            -b base.qcow2 -F qcow2 m1.qcow2 4M
        qemu-io -c 'write -P 2 600k 100k' m1.qcow2
        qemu-img create -q -f qcow2 -b m1.qcow2 -F qcow2 m2.qcow2 4M
        qemu-io -c 'write -P 3 1M 64k' -c 'write -z 0 64k' -c 'write -P 8 2100k 70k' m2.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=4096 -b m2.qcow2 -F qcow2 top.qcow2 4M
        qemu-io -c 'write -P 9 3M 4k' top.qcow2
    """,
    # base.qcow2 (2 MiB) <- mid.qcow2 (4 MiB) <- top.qcow2: the base shorter than what is
    # committed into it; the mid image with data past the base's end.
    "short": """
        qemu-img create -q -f qcow2 base.qcow2 2M
        qemu-io -c 'write -P 1 0 2M' base.qcow2
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 4M
        qemu-io -c 'write -P 2 1M 64k' -c 'write -P 3 3M 128k' mid.qcow2
        qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M
        qemu-io -c 'write -P 4 0 4k' top.qcow2
    """,
}

# The images of each chain, top first.
IMAGES = {
    "three": ["top.qcow2", "mid.qcow2", "base.raw"],
    "four": ["top.qcow2", "m2.qcow2", "m1.qcow2", "base.qcow2"],
    "short": ["top.qcow2", "mid.qcow2", "base.qcow2"],
}


def shell(side: Side, script: str) -> str:
    done = subprocess.run(script, shell=True, cwd=side.dir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Conversation:
    """The same commands to both daemons; replies and events compared."""

    def __init__(self, sides: list[Side]) -> None:
        self.sides = sides

    def _args(self, side: Side, arguments: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(json.dumps(arguments).replace("DIR", str(side.dir)))
        return result

    def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        found = []
        for side in self.sides:
            reply = side.conn.execute(command, self._args(side, arguments or {}))
            found.append(_normalise(reply, str(side.dir)))
        assert found[0] == found[1], (command, arguments, found)
        return found[0]

    def wait(self, job: str, status: str) -> None:
        """Until JOB reaches STATUS on both sides."""
        for side in self.sides:
            conn = side.conn
            while not any(e["event"] == "JOB_STATUS_CHANGE"
                          and e["data"] == {"id": job, "status": status} for e in conn.events):
                conn.events.append(conn.receive(timeout=WAIT))

    def released(self, image: str) -> None:
        """Until no daemon holds IMAGE's lock (QEMU's lock byte that refuses writers, which
        every format node over the file takes): qmpjobd closes a drive-* target just after
        its job has concluded, QSD just before (docs/compat.md)."""
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 201, 1, 0)
        for side in self.sides:
            fd = os.open(side.dir / image, os.O_RDONLY)
            try:
                while struct.unpack("hhqqi4x", fcntl.fcntl(fd, F_OFD_GETLK, probe))[0] != (
                        fcntl.F_UNLCK):
                    pass
            finally:
                os.close(fd)

    def events(self, *, pauses: bool = True) -> list[Any]:
        """The events so far (without timestamps), equal on both sides; cleared. Without
        PAUSES, a job's `running` and `paused` are left out: QSD pauses a backup as it starts
        it (docs/compat.md, "No unrequested pauses")."""
        found = []
        for side in self.sides:
            found.append([_normalise({k: v for k, v in e.items() if k != "timestamp"},
                                     str(side.dir)) for e in side.conn.events
                          if pauses or e["event"] != "JOB_STATUS_CHANGE"
                          or e["data"]["status"] not in ("running", "paused")])
            side.conn.events.clear()
        assert found[0] == found[1]
        return found[0]

    def nodes(self, *, file_sizes: bool = True) -> Any:
        """query-named-block-nodes of this test's nodes (those over its files), equal. Without
        FILE_SIZES, the sizes of the files under qcow2 images are left out: where a mirror
        writes an image, QSD's requests in flight allocate clusters in an order that differs
        from run to run, and so does the length of the file."""
        found = []
        for side in self.sides:
            reply = side.conn.execute("query-named-block-nodes")["return"]
            mine = [n for n in reply
                    if str(side.dir) in n["file"] and n["drv"] not in JOB_FILTERS]
            for node in mine:
                _without_actual_size(node["image"])
                if not file_sizes and node["drv"] == "file" and node["file"].endswith(".qcow2"):
                    node["image"]["virtual-size"] = "(varies)"
            found.append(_normalise(mine, str(side.dir)))
        assert found[0] == found[1], "\n".join(difflib.unified_diff(
            *(json.dumps(f, indent=1, sort_keys=True).splitlines() for f in found),
            "qsd", "qmpjobd", lineterm=""))
        return found[0]

    def images(self, *names: str) -> None:
        """Every image clean; both sides' images equal, with the same allocation."""
        for name in names:
            maps = []
            for side in self.sides:
                path = side.dir / name
                if name.endswith(".qcow2"):
                    check = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                                           capture_output=True, text=True)
                    assert check.stdout, (side.label, name, check.stderr)
                    result = json.loads(check.stdout)
                    assert not result.get("corruptions") and not result.get("leaks"), result
                maps.append(merged_map(path))
            assert maps[0] == maps[1], name
            fmt = "qcow2" if name.endswith(".qcow2") else "raw"
            subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt,
                            *(str(side.dir / name) for side in self.sides)],
                           check=True, capture_output=True)


def _without_actual_size(image: dict[str, Any]) -> None:
    """Out of the comparison: ext4 counts the blocks of freshly written files a block more or
    less from one run to the next (qemu-io's own images do), so actual-size is noise here;
    images() compares the allocation itself, by qemu-img map."""
    while True:
        assert image.pop("actual-size") > 0
        if "backing-image" not in image:
            return
        image = image["backing-image"]


def merged_map(path: Path) -> list[dict[str, Any]]:
    """qemu-img map of one layer without host offsets, adjacent alike entries merged."""
    fmt = "qcow2" if path.name.endswith(".qcow2") else "raw"
    done = subprocess.run(["qemu-img", "map", "-f", fmt, "--output=json", str(path)],
                          capture_output=True, text=True, check=True)
    merged: list[dict[str, Any]] = []
    for entry in json.loads(done.stdout):
        entry.pop("offset", None)
        last = merged[-1] if merged else None
        if (last is not None and last["start"] + last["length"] == entry["start"]
                and all(last[k] == entry[k] for k in ("depth", "present", "zero", "data"))):
            last["length"] += entry["length"]
        else:
            merged.append(entry)
    return merged


@pytest.fixture
def talk(sides: list[Side]) -> Iterator[Conversation]:
    conversation = Conversation(sides)
    yield conversation
    # Whatever the test left open goes, so that the next test's lists are its own.
    for side in sides:
        for node in side.conn.execute("query-named-block-nodes")["return"]:
            if str(side.dir) in node["file"] and not node["node-name"].startswith("#"):
                side.conn.execute("blockdev-del", {"node-name": node["node-name"]})
        side.conn.events.clear()


def build(talk: Conversation, chain: str) -> None:
    for side in talk.sides:
        shell(side, CHAINS[chain])


def top(name: str = "top", image: str = "top.qcow2", **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": f"DIR/{image}"}, **extra}


def explicit_three() -> dict[str, Any]:
    """top <- mid <- base of the three-image chain, every node named by blockdev-add."""
    return top(backing=top("mid", "mid.qcow2", backing={
        "driver": "raw", "node-name": "base",
        "file": {"driver": "file", "filename": "DIR/base.raw"}}))


# -- block-stream -------------------------------------------------------------------------------


@pytest.mark.parametrize(("chain", "arguments", "explicit"), [
    ("three", {}, False),
    ("three", {"base": "mid.qcow2"}, False),
    ("three", {"base-node": "base"}, True),
    ("three", {"base-node": "base", "backing-file": "renamed.raw"}, True),
    ("three", {"bottom": "mid"}, True),
    ("three", {"base-node": "mid"}, True),
    ("four", {}, False),
    ("four", {"base": "m1.qcow2"}, False),
    ("four", {"base": "base.qcow2", "speed": 1 << 30}, False),
])
def test_block_stream(talk: Conversation, chain: str, arguments: dict[str, Any],
                      explicit: bool) -> None:
    build(talk, chain)
    talk.cmd("blockdev-add", explicit_three() if explicit else top())
    assert talk.cmd("block-stream", {"job-id": "s", "device": "top", **arguments}) == {
        "return": {}}
    talk.wait("s", "null")
    events = talk.events()
    assert events[-3]["event"] == "BLOCK_JOB_COMPLETED"
    assert "error" not in events[-3]["data"]
    talk.nodes()
    talk.cmd("blockdev-del", {"node-name": "top"})
    if "backing-file" in arguments:  # the header names it; qemu-img opens what it names
        for side in talk.sides:
            shell(side, "cp base.raw renamed.raw")
    talk.images("top.qcow2", *(["mid.qcow2"] if chain == "three" else ["m1.qcow2", "m2.qcow2"]))


def test_block_stream_paused_cancelled_and_refused(talk: Conversation) -> None:
    build(talk, "four")
    talk.cmd("blockdev-add", top())
    talk.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 1, "auto-dismiss": False})
    talk.wait("s", "running")
    talk.cmd("block-stream", {"job-id": "s2", "device": "top"})
    talk.cmd("block-commit", {"job-id": "c", "device": "top"})
    talk.cmd("job-pause", {"id": "s"})
    talk.wait("s", "paused")
    talk.cmd("job-resume", {"id": "s"})
    talk.cmd("job-cancel", {"id": "s"})
    talk.wait("s", "concluded")
    talk.cmd("job-dismiss", {"id": "s"})
    talk.events()
    talk.nodes()  # the chain as it was
    for arguments in ({"base": "nothing.qcow2"}, {"base-node": "top"},
                      {"backing-file": "x"}, {"bottom": "top", "base-node": "top"}):
        talk.cmd("block-stream", {"job-id": "s3", "device": "top", **arguments})
    talk.cmd("blockdev-del", {"node-name": "top"})



def explicit_four() -> dict[str, Any]:
    """top <- m2 <- m1 <- base of the four-image chain, every node named by blockdev-add."""
    return top(backing=top("m2", "m2.qcow2", backing=top("m1", "m1.qcow2", backing=top(
        "base", "base.qcow2"))))


# -- block-commit -------------------------------------------------------------------------------


@pytest.mark.parametrize(("chain", "arguments", "explicit"), [
    ("three", {"top": "mid.qcow2"}, False),
    ("three", {"top-node": "mid", "base-node": "base", "backing-file": "renamed.raw"}, True),
    ("four", {"top": "m2.qcow2", "base": "m1.qcow2"}, False),
    ("four", {"top": "m2.qcow2", "speed": 1 << 30}, False),
    # The overlay of what is committed is a backing file, opened read-only: its header is
    # rewritten all the same.
    ("four", {"top-node": "m1", "base-node": "base"}, True),
    ("four", {"top-node": "m2", "base-node": "base", "on-error": "stop"}, True),
    ("short", {"top": "mid.qcow2"}, False),
])
def test_block_commit_intermediate(talk: Conversation, chain: str, arguments: dict[str, Any],
                                   explicit: bool) -> None:
    build(talk, chain)
    talk.cmd("blockdev-add", explicit_four() if explicit and chain == "four"
             else explicit_three() if explicit else top())
    assert talk.cmd("block-commit", {"job-id": "c", "device": "top", **arguments}) == {
        "return": {}}
    talk.wait("c", "null")
    events = talk.events()
    assert events[-3]["event"] == "BLOCK_JOB_COMPLETED"
    assert "error" not in events[-3]["data"]
    talk.nodes()
    talk.cmd("blockdev-del", {"node-name": "top"})
    if "backing-file" in arguments:
        for side in talk.sides:
            shell(side, "cp base.raw renamed.raw")
    talk.images(*IMAGES[chain])


@pytest.mark.parametrize("order", [("base", "mid", "top"), ("top", "base", "mid"),
                                   ("top", "mid", "base"), ("mid", "base", "top")])
@pytest.mark.parametrize("job", ["block-commit", "block-stream"])
def test_dropped_images_the_monitor_added_keep_their_backing(talk: Conversation, job: str,
                                                             order: tuple[str, ...]) -> None:
    """A commit or stream drops the middle image of a chain whose every node blockdev-add
    made on its own: the overlay falls through to the base, and the dropped node, still the
    monitor's, keeps the base as its backing: the base is busy until both are gone, named by
    the newest user first; the dropped node may be deleted (an internal error here once)."""
    build(talk, "four")
    talk.cmd("blockdev-add", top("base", "m1.qcow2", backing=None))
    talk.cmd("blockdev-add", top("mid", "m2.qcow2", backing="base"))
    talk.cmd("blockdev-add", top(backing="mid"))
    arguments = ({"top-node": "mid", "base-node": "base"} if job == "block-commit"
                 else {"base-node": "base"})
    assert talk.cmd(job, {"job-id": "j", "device": "top", **arguments}) == {"return": {}}
    talk.wait("j", "null")
    talk.events()
    talk.nodes()
    for node in order:
        talk.cmd("blockdev-del", {"node-name": node})
    talk.nodes()


@pytest.mark.parametrize(("chain", "arguments", "end"), [
    ("three", {"base": "mid.qcow2"}, "job-complete"),
    ("three", {}, "block-job-cancel"),
    ("four", {"base": "m1.qcow2"}, "job-cancel"),
    ("four", {"speed": 1 << 30}, "job-complete"),
    ("short", {}, "job-complete"),
])
def test_block_commit_active(talk: Conversation, chain: str, arguments: dict[str, Any],
                             end: str) -> None:
    build(talk, chain)
    talk.cmd("blockdev-add", top())
    assert talk.cmd("block-commit", {"job-id": "c", "device": "top", **arguments}) == {
        "return": {}}
    talk.wait("c", "ready")
    talk.cmd("query-block-jobs")
    talk.nodes(file_sizes=False)
    talk.cmd(end, {"device": "c"} if end == "block-job-cancel" else {"id": "c"})
    talk.wait("c", "null")
    talk.events()
    talk.nodes(file_sizes=False)
    talk.cmd("blockdev-del", {"node-name": "top"})
    talk.images(*IMAGES[chain])


def test_block_commit_refused(talk: Conversation) -> None:
    build(talk, "four")
    talk.cmd("blockdev-add", explicit_four())
    for arguments in (
        {"device": "nothing"}, {"device": "m2"}, {"device": "top", "top": "nothing.qcow2"},
        {"device": "top", "top-node": "nothing"}, {"device": "top", "top": "x", "top-node": "m2"},
        {"device": "top", "base": "x", "base-node": "m1"},
        {"device": "top", "top-node": "m1", "base-node": "m2"},
        {"device": "top", "base": "nothing.qcow2"}, {"device": "top", "base-node": "top"},
        {"device": "top", "top-node": "base"}, {"device": "top", "backing-file": "x"},
        {"device": "top", "top-node": "m2", "base-node": "m2"},
        {"device": "top", "top-node": "m2", "job-id": "1x"},
    ):
        talk.cmd("block-commit", {"job-id": "c", **arguments})
    # Busy nodes: a stream of the device holds its chain.
    talk.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 1})
    talk.wait("s", "running")
    talk.cmd("block-commit", {"job-id": "c", "device": "top", "top-node": "m2"})
    talk.cmd("block-job-cancel", {"device": "s"})
    talk.wait("s", "null")
    talk.events()
    talk.nodes()
    talk.cmd("blockdev-del", {"node-name": "top"})
    talk.images(*IMAGES["four"])


# -- blockdev-backup and blockdev-mirror --------------------------------------------------------

TARGETS = {
    # An empty image of 16 KiB clusters, one of 2 MiB clusters (larger than a backup's), and a
    # raw file.
    "small": "qemu-img create -q -f qcow2 -o cluster_size=16k t.qcow2 4M",
    "large": "qemu-img create -q -f qcow2 -o cluster_size=2M t.qcow2 4M",
    "raw": "qemu-img create -q -f raw t.raw 4M",
}


@pytest.mark.parametrize("job", ["blockdev-backup", "blockdev-mirror"])
@pytest.mark.parametrize(("chain", "sync", "target"), [
    ("three", "full", "small"), ("three", "top", "small"), ("three", "full", "large"),
    ("four", "full", "small"), ("four", "top", "large"), ("three", "full", "raw"),
    ("four", "top", "raw"),
])
def test_copy_from_chain(talk: Conversation, job: str, chain: str, sync: str,
                                    target: str) -> None:
    build(talk, chain)
    for side in talk.sides:
        shell(side, TARGETS[target])
    talk.cmd("blockdev-add", top())
    image = "t.raw" if target == "raw" else "t.qcow2"
    talk.cmd("blockdev-add", {"driver": "raw", "node-name": "t", "file": {
        "driver": "file", "filename": "DIR/t.raw"}} if target == "raw" else top("t", image))
    assert talk.cmd(job, {"job-id": "j", "device": "top", "target": "t", "sync": sync}) == {
        "return": {}}
    if job == "blockdev-mirror":
        talk.wait("j", "ready")
        talk.cmd("job-complete", {"id": "j"})
    talk.wait("j", "null")
    events = talk.events(pauses=False)
    assert events[-3]["event"] == "BLOCK_JOB_COMPLETED"
    assert "error" not in events[-3]["data"]
    talk.nodes(file_sizes=False)
    talk.cmd("blockdev-del", {"node-name": "top"})
    talk.cmd("blockdev-del", {"node-name": "t"})
    talk.images(image)
    if sync == "full":  # the whole chain's data, in one image
        for side in talk.sides:
            subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F",
                            "raw" if target == "raw" else "qcow2",
                            str(side.dir / "top.qcow2"), str(side.dir / image)],
                           check=True, capture_output=True)


# -- a long chain -------------------------------------------------------------------------------

LONG_CHAIN = """
    qemu-img create -q -f qcow2 -o cluster_size=4096 c0.qcow2 4M
    qemu-io -c 'write -P 1 0 64k' c0.qcow2
    for i in $(seq 1 63); do
        qemu-img create -q -f qcow2 -o cluster_size=4096 -b c$((i-1)).qcow2 -F qcow2 c$i.qcow2 4M
        qemu-io -c "write -P $((i+1)) $((i*60))k 5000" c$i.qcow2 >/dev/null
    done
    qemu-img create -q -f raw t.raw 4M
"""


def test_chain_of_64_images(talk: Conversation) -> None:
    """A chain 64 images deep opens from its headers, reads as qemu-img reads it (a backup of
    it equals the chain), and is described as QSD describes it; then it streams into its top."""
    for side in talk.sides:
        shell(side, LONG_CHAIN)
    talk.cmd("blockdev-add", top("top", "c63.qcow2"))
    talk.cmd("blockdev-add", {"driver": "raw", "node-name": "t", "file": {
        "driver": "file", "filename": "DIR/t.raw"}})
    talk.cmd("blockdev-backup", {"job-id": "b", "device": "top", "target": "t", "sync": "full"})
    talk.wait("b", "null")
    talk.events(pauses=False)
    [node] = [n for n in talk.nodes() if n["node-name"] == "top"]
    assert node["backing_file_depth"] == 63
    for side in talk.sides:
        subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                        str(side.dir / "c63.qcow2"), str(side.dir / "t.raw")],
                       check=True, capture_output=True)
    talk.cmd("blockdev-del", {"node-name": "t"})
    talk.cmd("block-stream", {"job-id": "s", "device": "top", "base": "c0.qcow2"})
    talk.wait("s", "null")
    talk.events()
    talk.nodes()
    talk.cmd("blockdev-del", {"node-name": "top"})
    talk.images("c63.qcow2", "c0.qcow2")


def test_backup_compress(talk: Conversation) -> None:
    """compress: true. Into a raw file both daemons refuse it with QEMU's words; into a qcow2
    image QSD writes compressed clusters, qmpjobd refuses it (docs/compat.md), the image
    untouched."""
    for side in talk.sides:
        shell(side, "qemu-img create -q -f raw s.raw 1M; qemu-img create -q -f raw r.raw 1M;"
                    "qemu-img create -q -f qcow2 t.qcow2 1M")
    talk.cmd("blockdev-add", {"driver": "raw", "node-name": "s", "file": {
        "driver": "file", "filename": "DIR/s.raw"}})
    talk.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": {
        "driver": "file", "filename": "DIR/r.raw"}})
    talk.cmd("blockdev-add", top("t", "t.qcow2"))
    assert "error" in talk.cmd("blockdev-backup", {
        "job-id": "j", "device": "s", "target": "r", "sync": "full", "compress": True})
    ours = talk.sides[1]
    before = (ours.dir / "t.qcow2").read_bytes()
    reply = ours.conn.execute("blockdev-backup", {
        "job-id": "j", "device": "s", "target": "t", "sync": "full", "compress": True})
    assert reply == {"error": {"class": "GenericError", "desc": (
        "qmpjobd does not write compressed clusters: backup 'compress' into node 't' is not "
        "supported")}}
    assert ours.conn.execute("query-jobs") == {"return": []}
    assert (ours.dir / "t.qcow2").read_bytes() == before
    talk.cmd("blockdev-del", {"node-name": "t"})
    talk.cmd("blockdev-del", {"node-name": "r"})
    talk.cmd("blockdev-del", {"node-name": "s"})


# -- drive-backup and drive-mirror: targets they make or open ------------------------------------

# An existing image for mode=existing: backed by the chain's middle image, with data of its own.
EXISTING = {
    "three": "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 ex.qcow2 4M;"
             "qemu-io -c 'write -P 7 0 128k' -c 'write -P 8 3M 64k' ex.qcow2 >/dev/null",
    "four": "qemu-img create -q -f qcow2 -o cluster_size=16k -b m2.qcow2 -F qcow2 ex.qcow2 4M;"
            "qemu-io -c 'write -P 7 1M 128k' ex.qcow2 >/dev/null",
}


def chain_and_target(talk: Conversation, chain: str, mode: str) -> str:
    """CHAIN built on both sides, with the image mode=existing opens; the target's name."""
    build(talk, chain)
    if mode != "existing":
        return "new.qcow2"
    for side in talk.sides:
        shell(side, EXISTING[chain])
    return "ex.qcow2"


@pytest.mark.parametrize(("chain", "sync", "mode", "fmt"), [
    ("three", "full", "absolute-paths", "qcow2"),
    ("three", "top", "absolute-paths", None),  # the source's format
    ("four", "top", "absolute-paths", "qcow2"),
    ("four", "full", "existing", "qcow2"),
    ("three", "top", "existing", None),  # probed
    ("three", "none", "absolute-paths", "qcow2"),
    ("four", "none", "existing", "qcow2"),
])
def test_drive_backup_qcow2(talk: Conversation, chain: str, sync: str, mode: str,
                            fmt: str | None) -> None:
    """drive-backup makes its target as QEMU does (the source's backing file named in the new
    image for sync=top, the source itself for sync=none, attached as the target's backing
    node) or opens the one there is, and copies what sync asks."""
    target = chain_and_target(talk, chain, mode)
    talk.cmd("blockdev-add", top())
    format_arg = {"format": fmt} if fmt else {}
    assert talk.cmd("drive-backup", {
        "job-id": "b", "device": "top", "sync": sync, "mode": mode, "target": f"DIR/{target}",
        "auto-dismiss": False, **format_arg}) == {"return": {}}
    if sync == "none":  # runs until cancelled: the target is seen while it runs
        talk.wait("b", "running")
        talk.nodes(file_sizes=False)
        talk.cmd("job-cancel", {"id": "b"})
    talk.wait("b", "concluded")
    talk.cmd("job-dismiss", {"id": "b"})
    events = talk.events(pauses=False)
    assert events[-3]["event"] == ("BLOCK_JOB_CANCELLED" if sync == "none"
                                   else "BLOCK_JOB_COMPLETED")
    talk.released(target)
    talk.nodes()  # the target closed, the source's chain as it was
    talk.cmd("blockdev-del", {"node-name": "top"})
    talk.images(target, *IMAGES[chain])
    if sync != "none" and mode != "existing":  # the target reads as the source
        for side in talk.sides:
            subprocess.run(["qemu-img", "compare", str(side.dir / "top.qcow2"),
                            str(side.dir / target)], check=True, capture_output=True)


@pytest.mark.parametrize(("chain", "sync", "mode", "end"), [
    ("three", "full", "absolute-paths", "job-complete"),
    ("three", "top", "absolute-paths", "job-complete"),
    ("four", "top", "absolute-paths", "block-job-cancel"),
    ("three", "none", "absolute-paths", "job-complete"),
    ("three", "top", "existing", "job-complete"),
    ("four", "full", "existing", "job-cancel"),
])
def test_drive_mirror_qcow2(talk: Conversation, chain: str, sync: str, mode: str,
                            end: str) -> None:
    """drive-mirror into a new qcow2 image (with the source's backing file for sync=top and
    none) or an existing one (sync=full copies all of the source over what it holds): the
    target opened without its backing file, what is copied, and the images after."""
    target = chain_and_target(talk, chain, mode)
    talk.cmd("blockdev-add", top())
    assert talk.cmd("drive-mirror", {
        "job-id": "m", "device": "top", "sync": sync, "mode": mode, "format": "qcow2",
        "target": f"DIR/{target}"}) == {"return": {}}
    talk.wait("m", "ready")
    talk.cmd("query-block-jobs")
    talk.nodes(file_sizes=False)
    talk.cmd(end, {"device": "m"} if end == "block-job-cancel" else {"id": "m"})
    talk.wait("m", "null")
    talk.events()
    talk.released(target)
    talk.nodes()
    talk.cmd("blockdev-del", {"node-name": "top"})
    if sync != "none":
        talk.images(target, *IMAGES[chain])
    else:  # the new image is empty; it names the source as its backing file
        talk.images(*IMAGES[chain])
        for side in talk.sides:
            info = json.loads(shell(side, f"qemu-img info -U --output=json {target}"))
            assert info["backing-filename"] == str(side.dir / "top.qcow2")


def test_drive_targets_refused(talk: Conversation) -> None:
    """What the formats cannot do, with QEMU's words; nothing left running."""
    build(talk, "three")
    for side in talk.sides:
        shell(side, "qemu-img create -q -f raw r.raw 4M")
    talk.cmd("blockdev-add", top())
    for command, arguments in (
        ("drive-backup", {"sync": "top", "format": "raw", "target": "DIR/x.raw"}),
        ("drive-backup", {"sync": "none", "format": "raw", "target": "DIR/x.raw"}),
        ("drive-backup", {"sync": "none", "format": "raw", "target": "DIR/r.raw",
                          "mode": "existing"}),
        ("drive-backup", {"sync": "full", "format": "qcow2", "target": "DIR/no/x.qcow2"}),
        ("drive-mirror", {"sync": "top", "format": "raw", "target": "DIR/x.raw"}),
        ("drive-mirror", {"sync": "full", "format": "qcow2", "target": "DIR/none.qcow2",
                          "mode": "existing"}),
        # Images of the chain itself: nothing is made over them.
        ("drive-backup", {"sync": "top", "format": "qcow2", "target": "DIR/mid.qcow2"}),
        ("drive-backup", {"sync": "full", "format": "qcow2", "target": "DIR/top.qcow2"}),
        ("drive-backup", {"sync": "full", "format": "raw", "target": "DIR/mid.qcow2"}),
        ("drive-mirror", {"sync": "full", "format": "qcow2", "target": "DIR/mid.qcow2"}),
    ):
        talk.cmd(command, {"job-id": "j", "device": "top", **arguments})
    talk.cmd("query-jobs")
    talk.nodes()
    # The chain's raw base: its node holds no image lock, and QSD empties the file before it
    # refuses the job; qmpjobd refuses it untouched (docs/compat.md).
    ours = talk.sides[1]
    before = (ours.dir / "base.raw").read_bytes()
    assert ours.conn.execute("drive-mirror", {
        "job-id": "j", "device": "top", "sync": "full", "format": "raw",
        "target": str(ours.dir / "base.raw")}) == {
        "error": {"class": "GenericError", "desc": 'Failed to get "write" lock'}}
    assert (ours.dir / "base.raw").read_bytes() == before
    assert ours.conn.execute("query-jobs") == {"return": []}
    talk.cmd("blockdev-del", {"node-name": "top"})
    talk.images(*IMAGES["three"])


@pytest.mark.parametrize("target", ["small", "raw"])
def test_mirror_full_zeroes_a_discarding_target(talk: Conversation, target: str) -> None:
    """blockdev-mirror sync=full into a node opened with discard=unmap that holds data: the
    target is zeroed (its space freed) first, then what the source's chain holds is copied;
    without discard everything is copied."""
    build(talk, "four")  # a qcow2 base: parts of the chain hold nothing
    image = "t.raw" if target == "raw" else "t.qcow2"
    for side in talk.sides:
        shell(side, TARGETS[target])
        shell(side, f"qemu-io -f {'raw' if target == 'raw' else 'qcow2'} "
                    f"-c 'write -P 9 0 4M' {image} >/dev/null")
    talk.cmd("blockdev-add", top())
    file = {"driver": "file", "filename": f"DIR/{image}"}
    talk.cmd("blockdev-add", {"driver": "raw", "node-name": "t", "discard": "unmap", "file": file}
             if target == "raw" else top("t", image, discard="unmap"))
    assert talk.cmd("blockdev-mirror", {"job-id": "j", "device": "top", "target": "t",
                                        "sync": "full"}) == {"return": {}}
    talk.wait("j", "ready")
    talk.cmd("query-block-jobs")
    talk.cmd("job-complete", {"id": "j"})
    talk.wait("j", "null")
    talk.events()
    talk.cmd("blockdev-del", {"node-name": "top"})
    talk.cmd("blockdev-del", {"node-name": "t"})
    talk.images(image)
