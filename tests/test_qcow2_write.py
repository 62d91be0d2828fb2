"""Writing qcow2 images: new images byte for byte as `qemu-img create` makes them, and writes,
zero writes and discards that leave what qemu-io leaves (same data, same allocation in
`qemu-img map`, `qemu-img check` clean), the dirty bit of lazy refcounts, the header rewritten
as `qemu-img rebase -u` rewrites it. The image engine is driven directly (blocking calls);
the node and its jobs are tested over QMP elsewhere."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.block.drivers.qcow2.create import check_options, format_image
from qmpjobd.block.drivers.qcow2.header import Qcow2Error, parse_header
from qmpjobd.block.drivers.qcow2.hostfile import HostFile
from qmpjobd.block.drivers.qcow2.image import Qcow2Image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)
    return done.stdout


def ours(path: Path, options: dict[str, Any]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        format_image(HostFile(fd), check_options(options))
    finally:
        os.close(fd)


def theirs(path: Path, options: dict[str, Any]) -> None:
    opts = [f"cluster_size={options.get('cluster-size', 65536)}",
            f"refcount_bits={options.get('refcount-bits', 16)}",
            "compat=0.10" if options.get("version") == "v2" else "compat=1.1"]
    if options.get("lazy-refcounts"):
        opts.append("lazy_refcounts=on")
    if "preallocation" in options:
        opts.append(f"preallocation={options['preallocation']}")
    argv = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if "backing-file" in options:
        argv += ["-u", "-b", options["backing-file"], "-F", options["backing-fmt"]]
    qemu_img(*argv, str(path), str(options["size"]))


def info(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(qemu_img("info", "--output=json", str(path)))
    found.pop("filename")
    found.pop("actual-size")
    return found


def check(path: Path) -> dict[str, Any]:
    done = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                          capture_output=True, text=True)
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def assert_clean(path: Path) -> None:
    found = check(path)
    assert not found.get("corruptions") and not found.get("leaks"), found
    assert not found.get("check-errors"), found


# -- new images -------------------------------------------------------------------------------

def _create_cases() -> list[dict[str, Any]]:
    variants: list[dict[str, Any]] = [
        {}, {"version": "v2"}, {"lazy-refcounts": True}, {"refcount-bits": 1},
        {"refcount-bits": 64}, {"backing-file": "base.img", "backing-fmt": "raw"},
        {"preallocation": "metadata"},
    ]
    cases = []
    for cs in (512, 4096, 65536, 2 * MiB):
        # 512-byte clusters outgrow the refcount table at a few GiB already: 3 GiB does.
        for size in (0, MiB + 512, 1 << 30, 3 << 30 if cs == 512 else 100 << 30):
            for extra in variants:
                if "preallocation" in extra and (size > MiB + 512 or cs == 512):
                    continue
                cases.append({"size": size, "cluster-size": cs, **extra})
    return [*cases, {"size": 256 * MiB, "preallocation": "metadata"}]


CREATE_CASES = _create_cases()


@pytest.mark.parametrize("options", CREATE_CASES, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()))
def test_new_images_are_the_files_qemu_img_creates(tmp_path: Path, options: dict[str, Any],
                                                   ) -> None:
    ours(tmp_path / "ours.qcow2", options)
    theirs(tmp_path / "theirs.qcow2", options)
    assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "theirs.qcow2").read_bytes()


def test_metadata_preallocation_of_small_clusters(tmp_path: Path) -> None:
    """512-byte clusters and preallocation=metadata outgrow the refcount table several times:
    the layout is QEMU's, only the freed old tables' clusters hold other leftovers (QEMU
    writes table entries into a table it is about to replace)."""
    options = {"size": 16 * MiB, "cluster-size": 512, "preallocation": "metadata"}
    ours(tmp_path / "ours.qcow2", options)
    theirs(tmp_path / "theirs.qcow2", options)
    assert info(tmp_path / "ours.qcow2") == info(tmp_path / "theirs.qcow2")
    assert_clean(tmp_path / "ours.qcow2")
    assert (qemu_img("map", "--output=json", str(tmp_path / "ours.qcow2"))
            == qemu_img("map", "--output=json", str(tmp_path / "theirs.qcow2")))


@pytest.mark.parametrize(("options", "message"), [
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"size": MiB, "cluster-size": 1000}, "Cluster size must be a power of two between 512 and "
                                          "2048k"),
    ({"size": MiB, "cluster-size": 4 * MiB}, "Cluster size must be a power of two"),
    ({"size": MiB, "version": "v2", "lazy-refcounts": True}, "Lazy refcounts only supported "
                                                             "with compatibility level 1.1"),
    ({"size": MiB, "refcount-bits": 3}, "Refcount width must be a power of two"),
    ({"size": MiB, "version": "v2", "refcount-bits": 8}, "Different refcount widths than 16"),
    ({"size": MiB, "backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"size": MiB, "backing-file": "b", "preallocation": "metadata"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"size": MiB, "extended-l2": True}, "qcow2 option 'extended-l2' is not supported"),
    ({"size": MiB, "compression-type": "zstd"}, "qcow2 option 'compression-type' is not"),
    ({"size": MiB, "preallocation": "full"}, "qcow2 preallocation 'full' is not supported"),
])
def test_create_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(Qcow2Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_options(options)


# -- writes as qemu-io writes -------------------------------------------------------------------


class RawBacking:
    """A raw backing file, as the image reads it."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset) if offset < self.size else b""
        return data + bytes(length - len(data))

    def reads_zero(self, offset: int, length: int) -> bool:
        if offset >= self.size:
            return True
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) >= min(offset + length, self.size)
        except OSError:
            return True

    def close(self) -> None:
        os.close(self.fd)


def merged_map(path: Path) -> list[dict[str, Any]]:
    """qemu-img map without host offsets, adjacent alike entries merged."""
    merged: list[dict[str, Any]] = []
    for entry in json.loads(qemu_img("map", "--output=json", str(path))):
        entry.pop("offset", None)
        last = merged[-1] if merged else None
        if (last is not None and last["start"] + last["length"] == entry["start"]
                and all(last[k] == entry[k] for k in ("depth", "present", "zero", "data"))):
            last["length"] += entry["length"]
        else:
            merged.append(entry)
    return merged


def random_requests(rnd: random.Random, size: int, cluster: int, count: int,
                    ) -> list[tuple[str, int, int, int]]:
    requests = []
    while len(requests) < count:
        kind = rnd.choice(["write", "write", "write", "zero", "zero-unmap", "discard"])
        align = rnd.choice([512, cluster])
        offset = rnd.randrange(0, size // align) * align
        length = rnd.choice([512, cluster, 3 * cluster, rnd.randrange(1, 4 * cluster)])
        length = min(max(512, length - length % 512), size - offset)
        if length > 0:
            requests.append((kind, offset, length, rnd.randrange(1, 255)))
    return requests


def apply_ours(image: Qcow2Image, requests: list[tuple[str, int, int, int]]) -> None:
    for kind, offset, length, pattern in requests:
        if kind == "write":
            image.write(offset, bytes([pattern]) * length, length)
        elif kind == "zero":
            image.zero(offset, length)
        elif kind == "zero-unmap":
            image.zero(offset, length, may_unmap=True)
        else:
            image.discard(offset, length)


def apply_qemu_io(path: Path, requests: list[tuple[str, int, int, int]]) -> None:
    argv = ["qemu-io", "-d", "unmap", "-f", "qcow2"]
    for kind, offset, length, pattern in requests:
        argv += ["-c", {"write": f"write -P {pattern} {offset} {length}",
                        "zero": f"write -z {offset} {length}",
                        "zero-unmap": f"write -z -u {offset} {length}",
                        "discard": f"discard {offset} {length}"}[kind]]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


@pytest.mark.parametrize("seed", range(40))
def test_requests_leave_what_qemu_io_leaves(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    cluster = rnd.choice([512, 4096, 65536])
    size = rnd.choice([1, 2, 5]) * MiB + rnd.choice([0, 512, 3 * 4096])
    options: dict[str, Any] = {"size": size, "cluster-size": cluster,
                               "version": rnd.choice(["v2", "v3", "v3"])}
    backing = None
    if rnd.random() < 0.5:
        data = bytearray(rnd.randbytes(size * 3 // 4))
        data[size // 4:size // 2] = bytes(size // 4)
        (tmp_path / "base.raw").write_bytes(data)
        options |= {"backing-file": "base.raw", "backing-fmt": "raw"}
        backing = RawBacking(tmp_path / "base.raw")
    mine, reference = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    ours(mine, options)
    shutil.copy(mine, reference)
    requests = random_requests(rnd, size, cluster, 30)
    fd = os.open(mine, os.O_RDWR)
    try:
        image = Qcow2Image(HostFile(fd), writable=True, backing=backing)
        apply_ours(image, requests)
        image.close()
    finally:
        os.close(fd)
        if backing is not None:
            backing.close()
    apply_qemu_io(reference, requests)
    assert_clean(mine)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(mine),
                    str(reference)], check=True, capture_output=True)
    assert merged_map(mine) == merged_map(reference)


def test_a_long_write_places_clusters_where_qemu_does(tmp_path: Path) -> None:
    """One write past what the refcount table covers (512-byte clusters): the table grows and
    every cluster lands where QEMU puts it (host offsets included)."""
    mine, reference = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    ours(mine, {"size": 32 * MiB, "cluster-size": 512})
    shutil.copy(mine, reference)
    requests = [("write", 0, 12 * MiB, 7), ("write", 20 * MiB + 100 * 512, 3 * MiB, 9)]
    fd = os.open(mine, os.O_RDWR)
    try:
        image = Qcow2Image(HostFile(fd), writable=True)
        apply_ours(image, requests)
        image.close()
    finally:
        os.close(fd)
    apply_qemu_io(reference, requests)
    assert_clean(mine)
    assert (qemu_img("map", "--output=json", str(mine))
            == qemu_img("map", "--output=json", str(reference)))


# -- header bits --------------------------------------------------------------------------------


def open_image(path: Path, **kwargs: Any) -> tuple[int, Qcow2Image]:
    fd = os.open(path, os.O_RDWR)
    try:
        return fd, Qcow2Image(HostFile(fd), **kwargs)
    except BaseException:
        os.close(fd)
        raise


def test_lazy_refcounts_mark_the_image_dirty_until_closed(tmp_path: Path) -> None:
    path = tmp_path / "lazy.qcow2"
    ours(path, {"size": 4 * MiB, "lazy-refcounts": True})
    fd, image = open_image(path, writable=True)
    image.write(MiB, b"\x5a" * 70000, 70000)
    image.flush()
    assert parse_header(path.read_bytes()[:65536], path.stat().st_size).dirty
    assert json.loads(qemu_img("info", "--output=json", "-U", str(path)))["dirty-flag"]
    # Left without closing, as a crash leaves it; the next writable open recounts.
    os.close(fd)
    fd, image = open_image(path, writable=True)
    image.close()
    os.close(fd)
    assert not parse_header(path.read_bytes()[:65536], path.stat().st_size).dirty
    assert_clean(path)


def test_a_dirty_image_with_wrong_counts_is_repaired_on_a_writable_open(tmp_path: Path) -> None:
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "4M")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "sigraise 9", str(path)],
                   capture_output=True)
    assert check(path).get("corruptions"), "qemu-io left no corruption to repair"
    fd, image = open_image(path, writable=True)
    image.close()
    os.close(fd)
    assert_clean(path)
    assert not json.loads(qemu_img("info", "--output=json", str(path)))["dirty-flag"]


def test_a_corrupt_image_opens_read_only_only(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    ours(path, {"size": MiB})
    with open(path, "r+b") as f:
        f.seek(72)
        f.write((2).to_bytes(8, "big"))
    before = path.read_bytes()
    with pytest.raises(Qcow2Error, match="Image is corrupt; cannot be opened read/write"):
        open_image(path, writable=True)
    fd, image = open_image(path)
    assert image.read(0, 512) == bytes(512)
    os.close(fd)
    assert path.read_bytes() == before


@pytest.mark.parametrize(("backing", "fmt"), [("base.raw", "raw"), ("../x/b.qcow2", "qcow2"),
                                              (None, None)])
def test_the_header_as_qemu_img_rebase_writes_it(tmp_path: Path, backing: str | None,
                                                 fmt: str | None) -> None:
    mine, reference = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    ours(mine, {"size": 4 * MiB, "backing-file": "old-base.qcow2", "backing-fmt": "qcow2"})
    shutil.copy(mine, reference)
    fd, image = open_image(mine, writable=True)
    image.set_backing(backing, fmt)
    image.close()
    os.close(fd)
    argv = ["rebase", "-u", "-b", backing or ""]
    if fmt is not None:
        argv += ["-F", fmt]
    qemu_img(*argv, str(reference))
    assert mine.read_bytes() == reference.read_bytes()


def test_a_longer_file_reaches_its_end_on_disk_before_anything_else_is_written(
        tmp_path: Path) -> None:
    """HostFile.extend (a new L2 table) makes the file longer for the driver at once, and on
    disk before the next write or sync: no metadata written can name a cluster past the end
    of the file; a write that reaches further makes the file longer itself."""
    from qmpjobd.block.drivers.qcow2.hostfile import HostFile

    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        file = HostFile(fd)
        file.extend(1 << 20)
        assert file.size == 1 << 20
        file.pwrite(0, b"x" * 512)  # short of the new end
        assert os.fstat(fd).st_size == 1 << 20
        file.extend(2 << 20)
        file.pwrite(3 << 20, b"y" * 512)  # past it
        assert os.fstat(fd).st_size == (3 << 20) + 512
        file.extend(4 << 20)
        file.sync()
        assert os.fstat(fd).st_size == 4 << 20
    finally:
        os.close(fd)


def test_reserved_blocks_are_allocated_zeroes_and_leave_the_length(tmp_path: Path) -> None:
    """What HostFile does before a long write past the file's end (reserve_blocks): the
    range's blocks are allocated, the file keeps its length and what it holds, and a write
    into the range then lengthens the file as any write would."""
    from qmpjobd.block.drivers.file import reserve_blocks

    path = tmp_path / "f"
    path.write_bytes(b"a" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        before = os.fstat(fd).st_blocks
        if not reserve_blocks(fd, 1 << 20, 1 << 20):
            pytest.skip("this file system cannot reserve blocks")
        after = os.fstat(fd)
        assert after.st_size == 4096
        assert (after.st_blocks - before) * 512 >= 1 << 20
        assert path.read_bytes() == b"a" * 4096
        os.pwrite(fd, b"b" * 512, (2 << 20) - 512)
        assert os.fstat(fd).st_size == 2 << 20
        assert path.read_bytes() == b"a" * 4096 + bytes((2 << 20) - 4096 - 512) + b"b" * 512
        assert os.fstat(fd).st_blocks == after.st_blocks  # written where it was reserved
    finally:
        os.close(fd)


@pytest.mark.parametrize("bits", [1, 8, 16, 64])
def test_new_clusters_go_in_the_first_free_run_as_qemus_do(tmp_path: Path, bits: int) -> None:
    """Holes of 1 to 5 clusters among counted ones (written, then some discarded by qemu-io):
    writes of runs of clusters land where qemu-io puts them, host offsets and all (first fit
    from the start of the file; entries of whole bytes are scanned a stretch at a time)."""
    cluster = 4096
    mine, reference = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster},refcount_bits={bits}",
             str(mine), "4M")
    argv = ["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {400 * cluster}"]
    offset = 0
    for hole in [1, 2, 1, 3, 5, 2, 4, 1, 3] * 4:
        offset += 7 * cluster
        argv += ["-c", f"discard {offset} {hole * cluster}"]
        offset += hole * cluster
    subprocess.run([*argv, str(mine)], check=True, capture_output=True)
    shutil.copy(mine, reference)
    runs = [3, 1, 2, 5, 4, 1, 1, 6, 2]
    writes = [(600 * cluster + 40 * cluster * n, run * cluster) for n, run in enumerate(runs)]
    fd, image = open_image(mine, writable=True)
    try:
        for offset, length in writes:
            image.write(offset, b"\x02" * length, length)
        image.close()
    finally:
        os.close(fd)
    subprocess.run(["qemu-io", "-f", "qcow2"]
                   + [arg for offset, length in writes
                      for arg in ("-c", f"write -P 2 {offset} {length}")]
                   + [str(reference)], check=True, capture_output=True)
    assert_clean(mine)
    assert (qemu_img("map", "--output=json", str(mine))
            == qemu_img("map", "--output=json", str(reference)))


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_the_free_run_scan_finds_what_an_entry_by_entry_scan_finds(tmp_path: Path,
                                                                     bits: int) -> None:
    """Random refcount blocks, counts whose low bytes are zero among them (256: a zero byte
    that is not an entry's start): the stretch-at-a-time scan stops where one entry at a
    time does, with the same run."""
    path = tmp_path / "i.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={bits}",
             str(path), "1M")
    fd, image = open_image(path)
    try:
        refcounts = image.refcounts
        width, entries = bits // 8, refcounts.block_entries
        rnd = random.Random(bits)
        for _ in range(300):
            values = [rnd.choice([0, 0, 0, 1, 256, 1 << (bits - 8)]) for _ in range(entries)]
            block = bytearray(b"".join(v.to_bytes(width, "big") for v in values))
            index, n, found = rnd.randrange(entries), rnd.randrange(1, 6), rnd.randrange(0, 2)
            expected_found, at = found, index
            while at < entries and expected_found < n:
                expected_found = expected_found + 1 if values[at] == 0 else 0
                at += 1
            assert refcounts._free_run(block, index, n, found) == (expected_found, at)
        image.close()
    finally:
        os.close(fd)
