"""Crash safety of the qcow2 driver: whatever moment a crash picks, the images stay consistent
(`qemu-img check` finds no corruption; leaked clusters are allowed), reopen, and every sector
of what a job writes reads either as it was or as the job left it, never anything else; what
a sync made durable stays.

Two kinds of crash, for each job kind that writes qcow2 images (stream, commit, mirror,
backup):

- SIGKILL of the daemon at a random point of the job's progress, ROUNDS times. The page cache
  survives a killed process, so this shows the state the driver's own steps leave (its
  in-memory metadata lost, its writes kept), not the order the disk sees them in.
- A power cut, by replay: the daemon records every write and sync it issues to an image
  (the write log, QMPJOBD_QCOW2_WRITE_LOG), and the test rebuilds the image as a disk could
  have kept it at CUTS random moments: everything before the last sync, and any subset of
  the writes issued since (a disk may reorder them).

The images hold random data (a misplaced cluster shows) and use 512-byte to 64 KiB clusters,
so that jobs allocate many L2 tables and refcount blocks; the written image is opened with the
smallest L2 cache (two tables), so that its tables are written out, each time in the full
crash-safe order, many times while the job runs rather than once at its end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.block.drivers.qcow2.hostfile import EXTEND, SYNC, WRITE, read_log
from tests.daemons import QMPJOBD, DaemonProcess, QmpConnection, daemon_env

ROUNDS = 20  # SIGKILLs per job kind
CUTS = 60  # replayed crashes per job kind (240 in all)
SECTOR = 512
SIZE = 4 << 20
# The fewest L2 tables a qcow2 node keeps (QEMU's minimum, two).
SMALL_CACHE = {"l2-cache-size": 1}


@dataclass(frozen=True)
class Scenario:
    """A job on images the setup script makes (in a directory holding rand*.bin files of
    random data): the nodes to add, the job's command, the image it writes, and an image
    whose guest view must never change (or None)."""

    setup: str
    nodes: list[dict[str, Any]]
    command: str
    arguments: dict[str, Any]
    written: str
    constant: str | None = None
    ready: bool = False  # a mirror: completed once ready
    # The written image is judged by its own layer, not by its chain (a stream: the chain
    # reads the same throughout; what the top holds is what changes).
    own_layer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _qcow2(name: str, image: str, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": f"DIR/{image}"}, **extra}


SCENARIOS = {
    # The top (1 KiB clusters) takes what its 64 KiB-cluster base holds.
    "stream": Scenario(
        setup="""
            qemu-img create -q -f qcow2 base.qcow2 4M
            qemu-io -c 'write -q -s rand1.bin 0 3M' -c 'write -q -z 3M 512k' base.qcow2
            qemu-img create -q -f qcow2 -o cluster_size=1k -b base.qcow2 -F qcow2 top.qcow2 4M
            qemu-io -c 'write -q -s rand2.bin 100k 300k' -c 'write -q -s rand3.bin 2001k 9k' \
                top.qcow2
        """,
        nodes=[_qcow2("top", "top.qcow2", **SMALL_CACHE)],
        command="block-stream", arguments={"device": "top"},
        written="top.qcow2", constant="top.qcow2", own_layer=True,
    ),
    # The middle image is committed into a base of 1 KiB clusters with data of its own; the
    # chain's view from the top stays what it was.
    "commit": Scenario(
        setup="""
            qemu-img create -q -f qcow2 -o cluster_size=1k base.qcow2 4M
            qemu-io -c 'write -q -s rand1.bin 0 1M' base.qcow2
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 4M
            qemu-io -c 'write -q -s rand2.bin 512k 3M' mid.qcow2
            qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M
            qemu-io -c 'write -q -s rand3.bin 3M 64k' top.qcow2
        """,
        nodes=[_qcow2("top", "top.qcow2", backing=_qcow2("mid", "mid.qcow2", backing=_qcow2(
            "base", "base.qcow2", **SMALL_CACHE)))],
        command="block-commit",
        # The overlay's header names the base as the other images do (by a relative name),
        # so that the chain replayed elsewhere reads the replayed base.
        arguments={"device": "top", "top-node": "mid", "base-node": "base",
                   "backing-file": "base.qcow2"},
        written="base.qcow2", constant="top.qcow2",
    ),
    # A 64 KiB-cluster image with holes into an empty one of 2 KiB clusters.
    "mirror": Scenario(
        setup="""
            qemu-img create -q -f qcow2 src.qcow2 4M
            qemu-io -c 'write -q -s rand1.bin 0 1500k' -c 'write -q -s rand2.bin 2M 1M' \
                -c 'write -q -z 3200k 200k' src.qcow2
            qemu-img create -q -f qcow2 -o cluster_size=2k t.qcow2 4M
        """,
        nodes=[_qcow2("src", "src.qcow2"), _qcow2("t", "t.qcow2", **SMALL_CACHE)],
        command="blockdev-mirror", arguments={"device": "src", "target": "t", "sync": "full"},
        written="t.qcow2", ready=True,
    ),
    # A raw base under a qcow2 overlay into an image of 512-byte clusters: 8192 clusters,
    # 128 L2 tables, 32 refcount blocks.
    "backup": Scenario(
        setup="""
            cp rand1.bin base.raw
            qemu-img create -q -f qcow2 -b base.raw -F raw src.qcow2 4M
            qemu-io -c 'write -q -s rand2.bin 1M 700k' -c 'write -q -z 3M 100k' src.qcow2
            qemu-img create -q -f qcow2 -o cluster_size=512 t.qcow2 4M
        """,
        nodes=[_qcow2("src", "src.qcow2"), _qcow2("t", "t.qcow2", **SMALL_CACHE)],
        command="blockdev-backup", arguments={"device": "src", "target": "t", "sync": "full"},
        written="t.qcow2",
    ),
}


def make_images(directory: Path, scenario: Scenario, seed: int) -> None:
    directory.mkdir(parents=True)
    rng = random.Random(seed)
    for i in (1, 2, 3):
        (directory / f"rand{i}.bin").write_bytes(rng.randbytes(SIZE))
    subprocess.run(scenario.setup, shell=True, cwd=directory, check=True)


def guest_view(image: Path, own_layer: bool = False) -> bytes:
    """What a guest reads from IMAGE (through its backing chain, or OWN_LAYER only: what the
    chain below holds reads as zeroes)."""
    out = image.with_name(image.name + ".view")
    source = (["json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {
        "driver": "file", "filename": str(image)}})] if own_layer
        else ["-f", "qcow2", str(image)])
    subprocess.run(["qemu-img", "convert", "-U", *source, "-O", "raw", str(out)],
                   check=True, capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def check_clean(image: Path) -> dict[str, Any]:
    """qemu-img check: no corruption, no error (leaks allowed: exit status 3)."""
    done = subprocess.run(["qemu-img", "check", "-U", "--output=json", str(image)],
                          capture_output=True, text=True)
    assert done.returncode in (0, 3), (image, done.returncode, done.stdout, done.stderr)
    result: dict[str, Any] = json.loads(done.stdout)
    assert not result.get("corruptions") and not result.get("check-errors"), result
    return result


def sectors_between(found: bytes, before: bytes, after: bytes) -> None:
    """Every sector of FOUND reads as in BEFORE or as in AFTER."""
    assert len(found) == len(before) == len(after)
    if found in (before, after):
        return
    for offset in range(0, len(found), SECTOR):
        sector = found[offset:offset + SECTOR]
        assert sector in (before[offset:offset + SECTOR], after[offset:offset + SECTOR]), (
            f"sector at {offset} reads as neither before nor after the job")


def _arguments(value: Any, directory: Path) -> Any:
    return json.loads(json.dumps(value).replace("DIR", str(directory)))


def start_job(conn: QmpConnection, scenario: Scenario, directory: Path, speed: int) -> None:
    for node in scenario.nodes:
        assert conn.execute("blockdev-add", _arguments(node, directory)) == {"return": {}}
    arguments = {"job-id": "j", "speed": speed, **scenario.arguments}
    reply = conn.execute(scenario.command, _arguments(arguments, directory))
    assert reply == {"return": {}}, reply


def run_to_end(conn: QmpConnection, scenario: Scenario) -> None:
    """Until the job has gone (completing a mirror once it is ready); then the nodes go."""
    while True:
        event = conn.receive(timeout=60)
        if event.get("event") != "JOB_STATUS_CHANGE":
            continue
        status = event["data"]["status"]
        if status == "ready":
            conn.execute("job-complete", {"id": "j"})
        elif status == "null":
            break
    for node in scenario.nodes:
        assert conn.execute("blockdev-del", {"node-name": node["node-name"]}) == {
            "return": {}}


@contextmanager
def logging_daemon(root: Path) -> Iterator[tuple[QmpConnection, Path]]:
    """A daemon in ROOT that records every write and sync to its images in ROOT/log (the
    write log), and a connection to it: (connection, log directory)."""
    log = root / "log"
    log.mkdir()
    env = daemon_env(QMPJOBD_QCOW2_WRITE_LOG=str(log))
    with DaemonProcess.start(root, "--log", str(root / "qmpjobd.log"), program=QMPJOBD,
                             env=env) as daemon, daemon.connect() as conn:
        yield conn, log


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per scenario: a directory with its starting images, and the job's result (the
    written image's guest view, in `after.raw`) from a run to the end with a write log
    (in `log/`)."""
    found = {}
    for seed, (name, scenario) in enumerate(SCENARIOS.items()):
        root = tmp_path_factory.mktemp(f"crash-{name}")
        start = root / "start"
        make_images(start, scenario, seed)
        run = root / "run"
        shutil.copytree(start, run)
        with logging_daemon(root) as (conn, _):
            start_job(conn, scenario, run, 0)
            run_to_end(conn, scenario)
        check_clean(run / scenario.written)
        (root / "after.raw").write_bytes(guest_view(run / scenario.written, scenario.own_layer))
        found[name] = root
    return found


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon that reopens the images a crash left."""
    workdir = tmp_path_factory.mktemp("crash-checker")
    with DaemonProcess.start(workdir, "--log", str(workdir / "qmpjobd.log"), program=QMPJOBD,
                             env=daemon_env()) as daemon:
        yield daemon


def reopens(checker: DaemonProcess, image: Path) -> None:
    """The image opens read-write in qmpjobd (through its chain), and reads to its end."""
    with checker.connect() as conn:
        reply = conn.execute("blockdev-add", _qcow2("c", "c.qcow2") | {
            "file": {"driver": "file", "filename": str(image)}})
        assert reply == {"return": {}}, reply
        assert conn.execute("blockdev-add", {"driver": "null-co", "node-name": "n",
                                              "size": SIZE}) == {"return": {}}
        assert conn.execute("blockdev-backup", {"job-id": "read", "device": "c",
                                                 "target": "n", "sync": "full"}) == {
            "return": {}}
        while True:
            event = conn.receive(timeout=60)
            if event.get("event") == "BLOCK_JOB_COMPLETED":
                assert "error" not in event["data"], event
                break
        for node in ("c", "n"):
            assert conn.execute("blockdev-del", {"node-name": node}) == {"return": {}}


# -- SIGKILL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SCENARIOS))
def test_sigkill_during_job(kind: str, references: dict[str, Path], checker: DaemonProcess,
                            tmp_path: Path) -> None:
    """ROUNDS times: the job started on fresh copies of the images, the daemon killed once
    the job's progress passes a random point (or in its last steps); then every image is
    consistent and reopens, and the written one reads as before or as after, sector by
    sector."""
    scenario = SCENARIOS[kind]
    reference = references[kind]
    before = guest_view(reference / "start" / scenario.written, scenario.own_layer)
    after = (reference / "after.raw").read_bytes()
    constant = (guest_view(reference / "start" / scenario.constant)
                if scenario.constant else None)
    rng = random.Random(kind)
    mid_job = 0
    for round_ in range(ROUNDS):
        workdir = tmp_path / f"r{round_}"
        images = workdir / "images"
        shutil.copytree(reference / "start", images)
        # The job takes about a quarter of a second at its speed; the kill comes once its
        # progress passes POINT.
        point = rng.random()
        with DaemonProcess.start(workdir, "--log", str(workdir / "qmpjobd.log"),
                                 program=QMPJOBD, env=daemon_env()) as daemon, \
                daemon.connect() as conn:
            start_job(conn, scenario, images, 16 << 20)
            mid_job += _progress_until(conn, point)
            daemon.wait(signal.SIGKILL)
        for image in sorted(images.glob("*.qcow2")):
            check_clean(image)
        sectors_between(guest_view(images / scenario.written, scenario.own_layer), before, after)
        if constant is not None:
            assert guest_view(images / scenario.constant) == constant
        reopens(checker, images / scenario.written)
        check_clean(images / scenario.written)
    # Most kills came while the job was copying (not after it had ended).
    assert mid_job >= ROUNDS // 2, mid_job


def _progress_until(conn: QmpConnection, point: float) -> bool:
    """Until the job's progress has passed POINT (a fraction), or it is ready or gone; whether
    it was still running then."""
    while True:
        jobs = conn.execute("query-jobs")["return"]
        if not jobs or jobs[0]["status"] in ("ready", "concluded", "pending", "waiting"):
            return False
        job = jobs[0]
        if job["total-progress"] and job["current-progress"] >= point * job["total-progress"]:
            return True


# -- power cuts, replayed from the write log ----------------------------------------------------


Record = tuple[bytes, int, bytes, int]  # the write log's: kind, offset, data, sequence


def apply(path: Path, records: list[Record]) -> None:
    with open(path, "r+b") as f:
        for kind, offset, data, _ in records:
            if kind == WRITE:
                f.seek(offset)
                f.write(data)
            elif kind == EXTEND and os.fstat(f.fileno()).st_size < offset:
                f.truncate(offset)


@pytest.mark.parametrize("kind", list(SCENARIOS))
def test_power_cut_replayed(kind: str, references: dict[str, Path], tmp_path: Path) -> None:
    """CUTS crashes rebuilt from the write logs of the images the job writes (the log's
    sequence numbers order the writes of all of them: a crash cuts every file at one moment):
    consistent; the written image's every sector as the last syncs left it or as the job
    leaves it; the chain's view from the top as it was."""
    scenario = SCENARIOS[kind]
    reference = references[kind]
    names = list(dict.fromkeys(n for n in (scenario.written, scenario.constant) if n))
    logs = {name: read_log(str(reference / "log" / f"{name}.log")) for name in names}
    merged = sorted((record[3], name, i) for name, records in logs.items()
                    for i, record in enumerate(records))
    syncs = [j for j, (_, name, i) in enumerate(merged) if logs[name][i][0] == SYNC]
    assert len(syncs) >= 3, "the job synced too seldom to test the order of its writes"
    after = (reference / "after.raw").read_bytes()
    constant = (guest_view(reference / "start" / scenario.constant)
                if scenario.constant else None)
    images = tmp_path / "images"
    shutil.copytree(reference / "start", images)
    start = {name: (reference / "start" / name).read_bytes() for name in names}
    durable_views: dict[tuple[int, ...], bytes] = {}
    rng = random.Random(kind)
    # Epochs: the records between two syncs (of any image). Each cut falls in a random epoch
    # (so that the few epochs of a flush's steps are hit as often as the long one of the
    # data), at a random record of it.
    bounds = [-1, *syncs, len(merged)]
    for _ in range(CUTS):
        epoch = rng.randrange(len(bounds) - 1)
        cut = rng.randint(bounds[epoch] + 1, bounds[epoch + 1])
        durable: dict[str, list[Record]] = {}
        kept: dict[str, list[Record]] = {}
        for name, records in logs.items():
            before_cut = [records[i] for _, image, i in merged[:cut] if image == name]
            last = max((i for i, r in enumerate(before_cut) if r[0] == SYNC), default=-1)
            durable[name] = before_cut[:last + 1]
            kept[name] = [r for r in before_cut[last + 1:]
                          if r[0] != SYNC and rng.random() < 0.5]
        key = tuple(len(durable[name]) for name in names)
        if key not in durable_views:
            for name in names:
                (images / name).write_bytes(start[name])
                apply(images / name, durable[name])
            durable_views[key] = guest_view(images / scenario.written, scenario.own_layer)
        for name in names:
            (images / name).write_bytes(start[name])
            apply(images / name, durable[name] + kept[name])
            check_clean(images / name)
        sectors_between(guest_view(images / scenario.written, scenario.own_layer),
                        durable_views[key], after)
        if constant is not None:
            assert guest_view(images / scenario.constant) == constant, "the chain's view changed"


# -- durable when ready ---------------------------------------------------------------------------


def test_a_mirror_target_is_durable_once_ready(tmp_path: Path) -> None:
    """What a mirror copied is synced before BLOCK_JOB_READY (QEMU's mirror flushes its target
    there): when the event comes, the target's write log has no write after its last sync.
    (The target keeps the default cache, which writes nothing out on its own.)"""
    scenario = replace(SCENARIOS["mirror"],
                       nodes=[_qcow2("src", "src.qcow2"), _qcow2("t", "t.qcow2")])
    images = tmp_path / "images"
    make_images(images, scenario, 0)
    with logging_daemon(tmp_path) as (conn, log):
        start_job(conn, scenario, images, 0)
        while True:
            event = conn.receive(timeout=60)
            if event.get("event") == "BLOCK_JOB_READY":
                break
        kinds = [record[0] for record in read_log(str(log / "t.qcow2.log"))]
        assert WRITE in kinds
        assert SYNC in kinds, kinds[-10:]
        last_sync = len(kinds) - 1 - kinds[::-1].index(SYNC)
        assert WRITE not in kinds[last_sync:], kinds[-10:]
        assert conn.execute("job-complete", {"id": "j"}) == {"return": {}}
        run_to_end(conn, scenario)
