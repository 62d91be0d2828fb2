"""The qcow2 fuzzer of scripts/fuzz.py (mode `qcow2`): damaged images through the driver's
open-and-read path, in-process.

Seeds are healthy chains qemu-img makes (versions 2 and 3, 512-byte to 2 MiB clusters,
refcount widths 1 to 64, lazy refcounts left dirty, compressed and zero clusters, raw and
qcow2 backing files). Each input takes one seed chain and damages it where qcow2 keeps its
structure: header fields (sizes, offsets past the end or into other metadata, feature bits,
refcount order), header extensions, L1, L2 and refcount table entries (offsets past the end,
unaligned, pointing at metadata, reserved bits, compressed descriptors, counts at their
maximum), the backing file's name (itself, a loop of two, a missing file, a directory) and
its format, the file's length (cut at a metadata boundary or anywhere), or random bytes.

Each input is opened as blockdev-add would open it (read-only for most inputs, read-write for
the rest) and, if it opens, read: block status walked from the start, runs read, a few random
reads, through the backing chain. It must end within HANG_LIMIT seconds with the node open or
a BlockError, reads returning data or an I/O error naming the node; nothing else may escape;
a file that failed to open, or was opened read-only, must be byte for byte what it was.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from qmpjobd.block.drivers.base import Node
from qmpjobd.block.errors import BlockError
from qmpjobd.block.graph import BlockGraph
from qmpjobd.block.nodes import close_with_owned, open_node

HANG_LIMIT = 1.0  # seconds: an input that takes longer is a failure
NODE = "fz"
MAGIC = b"QFI\xfb"
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62

# Healthy chains (shell, run once in the seed directory), and the top image of each.
SEEDS: dict[str, tuple[str, str]] = {
    "v3": ("qemu-img create -q -f qcow2 v3.qcow2 2M;"
           "qemu-io -c 'write -P 1 0 100k' -c 'write -z 1M 64k' v3.qcow2", "v3.qcow2"),
    "v2": ("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 1M;"
           "qemu-io -c 'write -P 2 5k 20k' -c 'write -z 512k 8k' v2.qcow2", "v2.qcow2"),
    "small": ("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 s.qcow2 256k;"
              "qemu-io -c 'write -P 3 0 10k' -c 'write -P 4 100k 3k' s.qcow2", "s.qcow2"),
    "wide": ("qemu-img create -q -f qcow2 -o cluster_size=1k,refcount_bits=64 w.qcow2 512k;"
             "qemu-io -c 'write -P 5 2k 9k' w.qcow2", "w.qcow2"),
    "big": ("qemu-img create -q -f qcow2 -o cluster_size=256k b.qcow2 8M;"
            "qemu-io -c 'write -P 6 3M 100k' b.qcow2", "b.qcow2"),
    "huge": ("qemu-img create -q -f qcow2 -o cluster_size=2M h.qcow2 8M;"
             "qemu-io -c 'write -P 6 3M 100k' h.qcow2", "h.qcow2"),
    "lazy": ("qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4k l.qcow2 1M;"
             "qemu-io -c 'write -P 7 0 30k' -c 'sigraise 9' l.qcow2 || true", "l.qcow2"),
    "compressed": ("head -c 200k /dev/zero | tr '\\0' 'x' > c.raw;"
                   "qemu-img convert -q -c -O qcow2 -o cluster_size=4k c.raw c.qcow2;"
                   "rm c.raw", "c.qcow2"),
    "chain": ("qemu-img create -q -f raw cb.raw 1M;"
              "qemu-io -f raw -c 'write -P 8 0 200k' cb.raw;"
              "qemu-img create -q -f qcow2 -o cluster_size=4k -b cb.raw -F raw cm.qcow2 1M;"
              "qemu-io -c 'write -P 9 100k 50k' cm.qcow2;"
              "qemu-img create -q -f qcow2 -o cluster_size=8k -b cm.qcow2 -F qcow2 ct.qcow2 1M;"
              "qemu-io -c 'write -P 10 300k 20k' -c 'write -z 0 8k' ct.qcow2", "ct.qcow2"),
}


@dataclass
class Case:
    """One input: the files of a chain (name -> bytes), the one opened, how, and what was
    done to it."""

    files: dict[str, bytes]
    top: str
    read_only: bool
    damage: list[str] = field(default_factory=list)


def make_seeds(directory: Path) -> dict[str, dict[str, bytes]]:
    """Each seed chain's files, made by qemu-img (once: kept in DIRECTORY)."""
    chains: dict[str, dict[str, bytes]] = {}
    for name, (script, _) in SEEDS.items():
        where = directory / name
        if not (where / ".done").exists():
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir(parents=True)
            subprocess.run(script, shell=True, cwd=where, check=True, capture_output=True)
            (where / ".done").touch()
        chains[name] = {p.name: p.read_bytes() for p in sorted(where.iterdir())
                        if p.name != ".done"}
    return chains


# -- damage -------------------------------------------------------------------------------------


class Layout:
    """Where an image keeps its structures, read from its header (as written: it may already
    be damaged, so every lookup is bounded)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.ok = len(data) >= 72 and data[:4] == MAGIC
        if not self.ok:
            return
        (self.version, self.backing_offset, self.backing_size, self.cluster_bits, self.size,
         _, self.l1_size, self.l1_offset, self.rt_offset, self.rt_clusters, _,
         _) = struct.unpack_from(">IQIIQIIQQIIQ", data, 4)
        self.cluster = 1 << min(max(self.cluster_bits, 9), 21)
        self.header_length = 72
        self.refcount_order = 4
        if self.version >= 3 and len(data) >= 104:
            self.refcount_order, self.header_length = struct.unpack_from(">II", data, 96)

    def l2_offsets(self) -> list[int]:
        out = []
        for i in range(min(self.l1_size, 4096)):
            at = self.l1_offset + 8 * i
            if at + 8 > len(self.data):
                break
            entry = int.from_bytes(self.data[at:at + 8], "big") & OFFSET_MASK
            if entry and entry + self.cluster <= len(self.data):
                out.append(entry)
        return out

    def refcount_blocks(self) -> list[int]:
        out = []
        for i in range(min(self.rt_clusters * self.cluster // 8, 4096)):
            at = self.rt_offset + 8 * i
            if at + 8 > len(self.data):
                break
            entry = int.from_bytes(self.data[at:at + 8], "big") & ~0x1FF
            if entry and entry + self.cluster <= len(self.data):
                out.append(entry)
        return out

    def metadata_offsets(self) -> list[int]:
        return [0, self.l1_offset, self.rt_offset, *self.l2_offsets(),
                *self.refcount_blocks()]


def _interesting(rng: random.Random, layout: Layout, width: int) -> int:
    """A value likely to find a bug where a WIDTH-byte field goes."""
    top = (1 << (8 * width)) - 1
    size = len(layout.data)
    cluster = layout.cluster if layout.ok else 512
    choices: list[Callable[[], int]] = [
        lambda: 0, lambda: 1, lambda: top, lambda: top >> 1, lambda: (top >> 1) + 1,
        lambda: size, lambda: size - 8, lambda: size + cluster, lambda: rng.randrange(size + 1),
        lambda: rng.choice(layout.metadata_offsets()) if layout.ok else 0,
        lambda: rng.randrange(size + 1) | 1, lambda: cluster * rng.randrange(64),
        lambda: 1 << rng.randrange(8 * width), lambda: rng.getrandbits(8 * width),
    ]
    return rng.choice(choices)() & top


def _put(data: bytearray, offset: int, width: int, value: int) -> None:
    if offset >= 0 and offset + width <= len(data):
        data[offset:offset + width] = value.to_bytes(width, "big")


# Header fields: (offset, width, name).
HEADER_FIELDS = [
    (4, 4, "version"), (8, 8, "backing_file_offset"), (16, 4, "backing_file_size"),
    (20, 4, "cluster_bits"), (24, 8, "size"), (32, 4, "crypt_method"), (36, 4, "l1_size"),
    (40, 8, "l1_table_offset"), (48, 8, "refcount_table_offset"),
    (56, 4, "refcount_table_clusters"), (60, 4, "nb_snapshots"), (64, 8, "snapshots_offset"),
    (72, 8, "incompatible_features"), (80, 8, "compatible_features"),
    (88, 8, "autoclear_features"), (96, 4, "refcount_order"), (100, 4, "header_length"),
    (104, 1, "compression_type"),
]


def damage_header(rng: random.Random, data: bytearray, layout: Layout) -> str:
    offset, width, name = rng.choice(HEADER_FIELDS)
    if name == "incompatible_features" and rng.random() < 0.5:
        value = 1 << rng.randrange(6)  # dirty, corrupt, data file, compression, extended L2
    elif name == "cluster_bits" and rng.random() < 0.5:
        value = rng.choice([0, 8, 9, 21, 22, 31, 32, 63])
    elif name == "refcount_order" and rng.random() < 0.5:
        value = rng.randrange(8)
    else:
        value = _interesting(rng, layout, width)
    _put(data, offset, width, value)
    return f"header {name}={value:#x}"


def damage_extension(rng: random.Random, data: bytearray, layout: Layout) -> str:
    at = layout.header_length if layout.version >= 3 else 72
    if at + 8 > len(data):
        return "extension (no room)"
    kind = rng.choice([0xE2792ACA, 0x6803F857, 0x44415441, 0x23852875, 0x0537BE77,
                       rng.getrandbits(32)])
    length = rng.choice([0, 1, 7, 8, 16, 48, layout.cluster, 0xFFFFFFFF, rng.getrandbits(16)])
    _put(data, at, 4, kind)
    _put(data, at + 4, 4, length)
    return f"extension {kind:#x} length {length}"


def _entry(rng: random.Random, layout: Layout, old: int) -> int:
    roll = rng.random()
    if roll < 0.3:
        return (old & ~OFFSET_MASK) | (_interesting(rng, layout, 8) & OFFSET_MASK)
    if roll < 0.45:
        return old ^ (1 << rng.randrange(64))  # a flag or reserved bit
    if roll < 0.6:  # a compressed descriptor of any size
        return COMPRESSED | rng.getrandbits(62)
    if roll < 0.75:
        return COPIED | (rng.choice(layout.metadata_offsets()) & OFFSET_MASK)
    return _interesting(rng, layout, 8)


def damage_table(rng: random.Random, data: bytearray, layout: Layout) -> str:
    tables = [("L1", layout.l1_offset, min(layout.l1_size, 512))]
    tables += [("L2", at, layout.cluster // 8) for at in layout.l2_offsets()[:8]]
    tables += [("refcount table", layout.rt_offset, layout.rt_clusters * layout.cluster // 8)]
    name, base, entries = rng.choice(tables)
    if entries <= 0:
        return f"{name} (empty)"
    index = rng.randrange(min(entries, 1 << 16))
    at = base + 8 * index
    if at + 8 > len(data):
        return f"{name} (past the end)"
    old = int.from_bytes(data[at:at + 8], "big")
    new = _entry(rng, layout, old)
    _put(data, at, 8, new)
    return f"{name}[{index}] {old:#x} -> {new:#x}"


def damage_refcounts(rng: random.Random, data: bytearray, layout: Layout) -> str:
    blocks = layout.refcount_blocks()
    if not blocks:
        return "refcounts (none)"
    block = rng.choice(blocks)
    bits = 1 << min(layout.refcount_order, 6)
    entries = layout.cluster * 8 // bits
    index = rng.randrange(min(entries, 4096))
    value = rng.choice([0, 1, 2, (1 << bits) - 1, rng.getrandbits(bits)])
    if bits >= 8:
        _put(data, block + index * bits // 8, bits // 8, value)
    else:
        at = block + index * bits // 8
        shift = index * bits % 8
        mask = ((1 << bits) - 1) << shift
        data[at] = (data[at] & ~mask) | ((value << shift) & mask)
    return f"refcount[{index}]={value}"


def damage_length(rng: random.Random, data: bytearray, layout: Layout) -> str:
    points = [p for p in layout.metadata_offsets() if 0 < p < len(data)]
    cut = (rng.choice(points) + rng.randrange(-8, 9) if points and rng.random() < 0.6
           else rng.randrange(len(data) + 1))
    cut = max(0, min(cut, len(data)))
    del data[cut:]
    return f"cut at {cut}"


def damage_bytes(rng: random.Random, data: bytearray, layout: Layout) -> str:
    span = min(len(data), 4 * layout.cluster if layout.ok else len(data))
    for _ in range(rng.randrange(1, 9)):
        if span:
            data[rng.randrange(span)] = rng.getrandbits(8)
    return "random bytes"


DAMAGE = [damage_header, damage_header, damage_extension, damage_table, damage_table,
          damage_refcounts, damage_length, damage_bytes]


def set_backing(data: bytearray, layout: Layout, name: bytes) -> None:
    """Name NAME as the backing file, in the header's cluster past the extensions."""
    at = layout.cluster - len(name) - 8 if layout.cluster > len(name) + 200 else 0
    if not at or at + len(name) > len(data):
        return
    data[at:at + len(name)] = name
    _put(data, 8, 8, at)
    _put(data, 16, 4, len(name))


def damage_chain(rng: random.Random, case: Case) -> str:
    images = [n for n in case.files if n.endswith(".qcow2")]
    victim = rng.choice(images)
    data = bytearray(case.files[victim])
    layout = Layout(data)
    if not layout.ok:
        return "chain (no header)"
    choice = rng.randrange(6)
    if choice == 0:
        name, what = victim.encode(), "itself"
    elif choice == 1 and len(images) > 1:
        name, what = rng.choice([i for i in images if i != victim]).encode(), "a loop"
    elif choice == 2:
        name, what = b"missing.qcow2", "a missing file"
    elif choice == 3:
        name, what = b".", "a directory"
    elif choice == 4:
        name, what = b"x" * rng.choice([1, 255, 1023, 5000]), "a long name"
    else:
        name, what = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40))), "bytes"
    set_backing(data, layout, name)
    case.files[victim] = bytes(data)
    return f"{victim}: backing file {what}"


# How often each seed is taken, relative to the others: a 2 MiB-cluster image is a 12 MiB
# file, slow to copy for every input.
WEIGHTS = {"huge": 0.05}


def mutate(rng: random.Random, seeds: dict[str, dict[str, bytes]]) -> Case:
    names = sorted(seeds)
    seed = rng.choices(names, [WEIGHTS.get(name, 1.0) for name in names])[0]
    top = SEEDS[seed][1]
    case = Case(dict(seeds[seed]), top, read_only=rng.random() < 0.75, damage=[seed])
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if rng.random() < 0.12:
            case.damage.append(damage_chain(rng, case))
            continue
        images = [n for n in case.files if n.endswith(".qcow2")]
        victim = top if rng.random() < 0.7 else rng.choice(images)
        data = bytearray(case.files[victim])
        layout = Layout(data)
        damage = rng.choice(DAMAGE) if layout.ok else damage_bytes
        case.damage.append(f"{victim}: {damage(rng, data, layout)}")
        case.files[victim] = bytes(data)
    return case


# -- running an input ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one input did: opened or the error's words (or a failure: why it is one)."""

    opened: bool
    error: str | None
    failure: str | None
    seconds: float


def read_all(node: Node, rng: random.Random) -> str | None:
    """Walk the node as a copy would (block status from the start, each run read, up to a
    budget), and read a few random ranges. The I/O error of a damaged image, or None."""
    size = node.size
    try:
        offset = 0
        for _ in range(64):
            if offset >= size:
                break
            extent = node.block_status(offset, min(size - offset, 1 << 30))
            if extent.length <= 0:
                return f"block status of an empty run at {offset}"
            node.read_sync(offset, min(extent.length, 1 << 16))
            offset += extent.length
        for _ in range(4):
            if size:
                at = rng.randrange(size) & ~511
                node.read_sync(at, min(size - at, rng.choice([512, 4096, 1 << 16])))
    except OSError as e:
        if f"(node '{NODE}')" not in str(e) and "(node '#block" not in str(e):
            return f"an I/O error that names no node: {e}"
    return None


class Workspace:
    """The directory inputs are opened in. A file is written only where it differs from what
    the directory holds (most inputs damage one image of a chain); whether the driver wrote a
    file is told by reading it back (file times are too coarse to tell)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink() if old.is_file() else shutil.rmtree(old)
        self.held: dict[str, bytes] = {}

    def place(self, files: dict[str, bytes]) -> None:
        for name in list(self.held):
            if name not in files:
                path = self.directory / name
                path.unlink() if path.is_file() else shutil.rmtree(path)
                del self.held[name]
        for name, data in files.items():
            if self.held.get(name) != data:
                (self.directory / name).write_bytes(data)
                self.held[name] = data

    def written(self) -> list[str]:
        """The files that no longer hold what was placed (forgotten, to be written afresh
        next time)."""
        changed = [name for name, data in self.held.items()
                   if (self.directory / name).read_bytes() != data]
        for name in changed:
            del self.held[name]
        return changed


async def run_case(case: Case, space: Workspace, rng: random.Random) -> Outcome:
    space.place(case.files)
    graph = BlockGraph()
    options: dict[str, Any] = {
        "driver": "qcow2", "node-name": NODE, "read-only": case.read_only,
        "file": {"driver": "file", "filename": str(space.directory / case.top)}}
    start = time.monotonic()
    opened = False
    error = failure = None
    try:
        node = await open_node(graph, options)
    except BlockError as e:
        error = str(e)
    except Exception:
        failure = "open raised: " + traceback.format_exc()
    else:
        opened = True
        try:
            failure = await trio.to_thread.run_sync(read_all, node, rng)
        except Exception:
            failure = "read raised: " + traceback.format_exc()
        finally:
            try:
                await close_with_owned(node)
            except Exception:
                failure = failure or "close raised: " + traceback.format_exc()
    seconds = time.monotonic() - start
    if failure is None and seconds > HANG_LIMIT:
        failure = f"took {seconds:.2f} s (over {HANG_LIMIT} s)"
    written = space.written()
    if failure is None and written and (case.read_only or not opened):
        failure = f"{', '.join(written)} written ({'read-only' if opened else 'not opened'})"
    return Outcome(opened, error, failure, seconds)


def error_kind(message: str) -> str:
    """An error's words without the names and numbers that vary."""
    out = []
    for word in message.replace("'", " ").split():
        out.append("#" if any(c.isdigit() for c in word) or "/" in word else word)
    return " ".join(out)[:120]


async def fuzz(count: int, seconds: float | None, seed: int, workdir: Path,
               seeds: dict[str, dict[str, bytes]]) -> dict[str, Any]:
    rng = random.Random(seed)
    space = Workspace(workdir / "case")
    failures_dir = workdir / "failures"
    report: dict[str, Any] = {"inputs": 0, "failures": 0, "opened": 0, "refused": 0,
                              "slowest": 0.0, "errors": {}}
    errors: dict[str, int] = report["errors"]
    deadline = None if seconds is None else time.monotonic() + seconds
    started = time.monotonic()
    for index in range(count):
        if deadline is not None and time.monotonic() > deadline:
            break
        case = mutate(rng, seeds)
        outcome = await run_case(case, space, rng)
        if outcome.failure is not None and outcome.seconds > HANG_LIMIT:
            # Over the limit once may be the machine (a loaded CI runner): the same input
            # again, and only a second time counts.
            again = await run_case(case, space, random.Random(index))
            if again.seconds <= HANG_LIMIT:
                outcome = again
        report["inputs"] += 1
        report["slowest"] = max(report["slowest"], outcome.seconds)
        if outcome.opened:
            report["opened"] += 1
        if outcome.error is not None:
            report["refused"] += 1
            kind = error_kind(outcome.error)
            errors[kind] = errors.get(kind, 0) + 1
            if f"'{NODE}'" not in outcome.error and "Could not open '" not in outcome.error:
                outcome.failure = f"an error that names neither node nor file: {outcome.error}"
        if outcome.failure is not None:
            report["failures"] += 1
            save = failures_dir / f"{seed}-{index}"
            save.mkdir(parents=True, exist_ok=True)
            for name, data in case.files.items():
                (save / name).write_bytes(data)
            (save / "why.txt").write_text(errors="backslashreplace", data=
                f"top: {case.top} read-only: {case.read_only}\ndamage: {case.damage}\n"
                f"{outcome.failure}\n")
    report["seconds"] = round(time.monotonic() - started, 1)
    report["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
    return report


def run(count: int, seconds: float | None, seed: int, workdir: Path) -> dict[str, Any]:
    """COUNT inputs (or until SECONDS have passed) from SEED; the report (also written as
    WORKDIR/report.json)."""
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = make_seeds(workdir / "seeds")
    report = trio.run(fuzz, count, seconds, seed, workdir, seeds)
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def environment_ok() -> bool:
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


__all__ = ["HANG_LIMIT", "environment_ok", "run"]
