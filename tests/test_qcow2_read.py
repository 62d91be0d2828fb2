"""The qcow2 reader (header, cluster map, reads) against images qemu-img and qemu-io make, and
against damaged headers.

qemu-img is the oracle: what `qemu-img info --output=json` says of an image, the parsed header
must say too; what qemu-img refuses to open, the parser refuses, in the same words where
qemu-img has some; what `qemu-img convert -O raw` reads, the reader reads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qmpjobd.block.drivers.qcow2.header import Header, Qcow2Error, parse_header
from tests.conftest import missing

if TYPE_CHECKING:
    from qmpjobd.block.drivers.qcow2.image import Qcow2Image

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        missing("qemu-img is not installed (apt-get install qemu-utils)")


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


def info(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(qemu_img("info", "--output=json", str(path)))
    return result


def parsed(path: Path) -> Header:
    data = path.read_bytes()
    return parse_header(data[:2 * MiB], len(data))


@pytest.mark.parametrize(
    "options",
    [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=4096,lazy_refcounts=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "preallocation=metadata,cluster_size=16384",
    ],
)
def test_images_qemu_img_makes(tmp_path: Path, options: str) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", options, str(image), "64M")
    header, theirs = parsed(image), info(image)
    specific = theirs["format-specific"]["data"]
    assert header.size == theirs["virtual-size"] == 64 * MiB
    assert header.cluster_size == theirs["cluster-size"]
    assert {2: "0.10", 3: "1.1"}[header.version] == specific["compat"]
    assert header.refcount_bits == specific["refcount-bits"]
    assert header.lazy_refcounts == specific.get("lazy-refcounts", False)
    assert header.corrupt == specific.get("corrupt", False)
    assert header.dirty == theirs.get("dirty-flag", False)
    assert header.backing_file is None and header.backing_format is None


def test_a_backing_file_and_its_format(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", str(base), "1M")
    image = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(image), "2M")
    header, theirs = parsed(image), info(image)
    assert header.backing_file == theirs["backing-filename"] == "base.raw"
    assert header.backing_format == theirs["backing-filename-format"] == "raw"


def damaged(tmp_path: Path, offset: int, value: bytes, options: str = "compat=1.1") -> Path:
    image = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", options, str(image), "1M")
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(value)
    return image


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"QFI\xfa", "Image is not in qcow2 format"),
        (4, struct.pack(">I", 4), "Unsupported qcow2 version 4"),
        (4, struct.pack(">I", 1), "Unsupported qcow2 version 1"),
        (20, struct.pack(">I", 8), "Unsupported cluster size: 2^8"),
        (20, struct.pack(">I", 22), "Unsupported cluster size: 2^22"),
        (72, struct.pack(">Q", 1 << 40), "Unsupported qcow2 feature(s): Unknown incompatible "
         "feature: 28"),
    ],
)
def test_what_qemu_img_refuses_the_parser_refuses(
    tmp_path: Path, offset: int, value: bytes, message: str
) -> None:
    image = damaged(tmp_path, offset, value)
    before = image.read_bytes()
    with pytest.raises(Qcow2Error) as refused:
        parsed(image)
    assert str(refused.value) == message
    qemu = subprocess.run(["qemu-img", "info", "-f", "qcow2", str(image)], capture_output=True,
                          text=True)
    assert qemu.returncode != 0 and message.split(":")[0] in qemu.stderr
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (32, struct.pack(">I", 2), "qcow2 encryption is not supported by qmpjobd"),
        (72, struct.pack(">Q", 1 << 2), "qcow2 external data files are not supported by qmpjobd"),
        (72, struct.pack(">Q", 1 << 4), "qcow2 extended L2 entries are not supported by qmpjobd"),
        (36, struct.pack(">I", 1 << 30), "Active L1 table too large"),
        (40, struct.pack(">Q", 12345), "L1 table offset invalid"),
        (40, struct.pack(">Q", 1 << 40), "Active L1 table lies past the end of the image file"),
        (48, struct.pack(">Q", 1 << 40),
         "Reference count table lies past the end of the image file"),
        (96, struct.pack(">I", 7), "Reference count entry width too large; may not exceed 64 "
         "bits"),
        (100, struct.pack(">I", 100), "qcow2 header too short"),
        (100, struct.pack(">I", 108), "qcow2 header length is not a multiple of 8"),
    ],
)
def test_damage_and_what_is_not_supported_are_clear_errors(
    tmp_path: Path, offset: int, value: bytes, message: str
) -> None:
    image = damaged(tmp_path, offset, value)
    before = image.read_bytes()
    with pytest.raises(Qcow2Error) as refused:
        parsed(image)
    assert str(refused.value) == message
    assert image.read_bytes() == before


def test_a_truncated_file(tmp_path: Path) -> None:
    image = damaged(tmp_path, 0, b"QFI\xfb")
    data = image.read_bytes()
    for length in (0, 4, 71, 100):
        with pytest.raises(Qcow2Error):
            parse_header(data[:length], length)


# -- reading images qemu-img and qemu-io wrote --------------------------------------------------


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


class RawFile:
    """A raw backing file, as the image reads it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def reads_zero(self, offset: int, length: int) -> bool:
        return not any(self.read(offset, length))


def read_all(image: Path, backing: Path | None = None) -> bytes:
    from qmpjobd.block.drivers.qcow2.hostfile import HostFile
    from qmpjobd.block.drivers.qcow2.image import Qcow2Image

    fd = os.open(image, os.O_RDONLY)
    base_fd = os.open(backing, os.O_RDONLY) if backing is not None else -1
    try:
        reader = Qcow2Image(HostFile(fd), backing=RawFile(base_fd) if backing else None)
        return reader.read(0, reader.size)
    finally:
        os.close(fd)
        if base_fd >= 0:
            os.close(base_fd)


def as_raw(tmp_path: Path, image: Path) -> bytes:
    raw = tmp_path / "converted.raw"
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    return raw.read_bytes()


@pytest.mark.parametrize("options", ["compat=1.1,cluster_size=65536", "compat=0.10",
                                     "cluster_size=512", "cluster_size=2M"])
def test_reads_equal_qemu_img_convert(tmp_path: Path, options: str) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", options, str(image), "8M")
    commands = ["write -P 0xaa 0 64k", "write -P 0xbb 100000 5000", "write -P 0xcc 7M 1M"]
    if "0.10" not in options:
        commands.append("write -z 7M 64k")  # a zero cluster (version 3)
    qemu_io(image, *commands)
    assert read_all(image) == as_raw(tmp_path, image)


def test_reads_of_compressed_clusters(tmp_path: Path) -> None:
    source = tmp_path / "s.raw"
    source.write_bytes(bytes(range(256)) * 4096 + os.urandom(MiB) + bytes(MiB))
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(source), str(image))
    assert read_all(image) == source.read_bytes()


def test_reads_fall_through_to_the_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(3 * MiB))
    image = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(image), "4M")
    qemu_io(image, "write -P 0x11 1M 4k", "write -z 2M 64k")
    assert read_all(image, base) == as_raw(tmp_path, image)


@contextmanager
def opened(image: Path) -> Iterator[Qcow2Image]:
    """IMAGE open read-only, without a backing file."""
    from qmpjobd.block.drivers.qcow2.hostfile import HostFile
    from qmpjobd.block.drivers.qcow2.image import Qcow2Image

    fd = os.open(image, os.O_RDONLY)
    try:
        yield Qcow2Image(HostFile(fd))
    finally:
        os.close(fd)


def our_map(image: Path) -> list[dict[str, Any]]:
    """The image's allocation as `qemu-img map --output=json` writes it (one layer)."""
    from qmpjobd.block.drivers.qcow2.image import Kind

    with opened(image) as reader:
        entries: list[dict[str, Any]] = []
        offset = 0
        while offset < reader.size:
            length, kind, host = reader.status(offset, reader.size - offset)
            entry: dict[str, Any] = {
                "start": offset, "length": length, "depth": 0,
                "present": kind is not Kind.UNALLOCATED,
                "zero": kind in (Kind.ZERO, Kind.UNALLOCATED),
                "data": kind in (Kind.NORMAL, Kind.COMPRESSED),
            }
            if host is not None:
                entry["offset"] = host
            entries.append(entry)
            offset += length
        return entries


@pytest.mark.parametrize("compress", [False, True])
def test_allocation_equals_qemu_img_map(tmp_path: Path, compress: bool) -> None:
    image = tmp_path / "m.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", str(image), "4M")
    qemu_io(image, "write -P 1 0 64k", "write -P 2 128k 128k", "write -z 1M 64k",
            "write -P 3 2M 4k", "write -P 4 3M 192k")
    if compress:
        packed = tmp_path / "c.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", str(image), str(packed))
        image = packed
    theirs = json.loads(qemu_img("map", "--output=json", str(image)))
    assert our_map(image) == theirs


@pytest.mark.parametrize("seed", range(8))
def test_allocation_of_long_and_broken_runs_equals_qemu_img_map(tmp_path: Path,
                                                               seed: int) -> None:
    """Runs of data clusters up to a whole table long, and runs the file breaks (clusters
    written out of order, rewritten, zeroed, discarded): the runs our status measures in one
    go must end where qemu-img's do."""
    rng = random.Random(seed)
    image = tmp_path / "m.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", str(image), "64M")
    commands = [f"write -P 7 0 {rng.choice([8, 24, 40]) * MiB}"]
    for _ in range(40):
        offset = rng.randrange(0, 64 * 16) * 4096
        length = min(rng.choice([4096, 65536, 300 * 1024, 2 * MiB]), 64 * MiB - offset)
        verb = rng.choice(["write -P 9", "write -P 9", "write -z", "discard"])
        commands.append(f"{verb} {offset} {length}")
    qemu_io(image, *commands)
    theirs = json.loads(qemu_img("map", "--output=json", str(image)))
    assert our_map(image) == theirs


@pytest.mark.parametrize(("cluster", "tables_of", "long_runs"), [
    (65536, 512 * MiB, True), (4096, 2 * MiB, True), (2048, 512 * 1024, False)])
def test_unallocated_runs_go_on_through_tables_that_do_not_exist(
        tmp_path: Path, cluster: int, tables_of: int, long_runs: bool) -> None:
    """A run of unallocated clusters that reaches the end of its L2 table's range goes on
    through the ranges that have no table, up to the next that has one, where a table covers
    2 MiB or more; with smaller tables it stops at its table's end, as QEMU's answers do (a
    job asks again there)."""
    from qmpjobd.block.drivers.qcow2.image import Kind

    image = tmp_path / "r.qcow2"
    size = 8 * tables_of
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(image), str(size))
    # Tables 0 and 5 exist (a cluster written at the start of each); 1-4 and 6-7 do not.
    qemu_io(image, f"write -P 1 0 {cluster}", f"write -P 2 {5 * tables_of} {cluster}")
    with opened(image) as reader:
        assert reader.status(cluster, size) == (
            (5 * tables_of if long_runs else tables_of) - cluster, Kind.UNALLOCATED, None)
        assert reader.status(tables_of, size)[0] == (4 * tables_of if long_runs else tables_of)
        # To the end of the image, and never past the range asked about.
        after = 5 * tables_of + cluster
        assert reader.status(after, size - after)[0] == (
            (size if long_runs else 6 * tables_of) - after)
        assert reader.status(cluster, 3 * tables_of)[0] == (
            3 * tables_of if long_runs else tables_of - cluster)
        assert reader.status(0, size) == (cluster, Kind.NORMAL, reader.status(0, cluster)[2])


def test_one_answer_spans_at_most_1024_tables_that_do_not_exist(tmp_path: Path) -> None:
    """However many tables are missing after an unallocated run, one status answer goes over
    at most 1024 of them (a step each): a large empty image is walked in bounded calls."""
    from qmpjobd.block.drivers.qcow2.image import Kind

    image = tmp_path / "e.qcow2"
    span = 2 * MiB  # 4 KiB clusters
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(image), str(4000 * span))
    with opened(image) as reader:
        assert reader.status(0, reader.size) == (1025 * span, Kind.UNALLOCATED, None)
        assert reader.status(3000 * span, reader.size - 3000 * span)[0] == 1000 * span


# -- reference counts and the consistency check --------------------------------------------------


def our_check(image: Path) -> Any:
    from qmpjobd.block.drivers.qcow2.header import parse_header as parse
    from qmpjobd.block.drivers.qcow2.hostfile import HostFile
    from qmpjobd.block.drivers.qcow2.refcount import check

    fd = os.open(image, os.O_RDONLY)
    try:
        file = HostFile(fd)
        return check(file, parse(file.pread(0, 2 * MiB), file.size))
    finally:
        os.close(fd)


@pytest.mark.parametrize("options", ["refcount_bits=1", "refcount_bits=2", "refcount_bits=4",
                                     "refcount_bits=8", "refcount_bits=16", "refcount_bits=32",
                                     "refcount_bits=64", "cluster_size=512", "compat=0.10"])
def test_images_qemu_img_finds_clean_are_clean(tmp_path: Path, options: str) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", options, str(image), "8M")
    qemu_io(image, "write -P 1 0 64k", "write -P 2 1M 300k", "write -P 3 7M 1M")
    result = our_check(image)
    assert (result.leaks, result.corruptions) == ([], [])
    assert result.allocated > 0


def test_leaks_and_corruptions_as_qemu_img_check_finds_them(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    qemu_io(image, "write -P 1 0 64k", "write -P 2 128k 128k")
    header = parse_header(image.read_bytes()[:MiB], image.stat().st_size)
    end = image.stat().st_size // header.cluster_size
    with open(image, "r+b") as f:
        f.truncate((end + 2) * header.cluster_size)
        f.seek(header.refcount_table_offset)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * end)  # a cluster nobody uses, counted: a leak
        f.write(struct.pack(">H", 1))
        first_data = end - 3
        f.seek(block + 2 * first_data)  # a data cluster, not counted: a corruption
        f.write(struct.pack(">H", 0))
    qemu = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    leaked = [int(n) for n in re.findall(r"Leaked cluster (\d+)", qemu.stdout + qemu.stderr)]
    broken = [int(n) for n in re.findall(r"ERROR cluster (\d+)", qemu.stdout + qemu.stderr)]
    result = our_check(image)
    assert (result.leaks, result.corruptions) == (leaked, broken) == ([end], [first_data])
