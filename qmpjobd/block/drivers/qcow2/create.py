"""Making a new qcow2 image (blockdev-create, drive-* targets) as QEMU makes one, so that the
two give the same file: a header with an empty refcount table and one refcount block, the
first three clusters counted, the full header, an L1 table of the size the image needs (and,
with preallocation=metadata, every L2 table and data cluster), then the backing file's name.

The options are checked in QEMU's order with QEMU's words; what the driver does not do
(encryption, external data files, extended L2 entries, zstd, preallocation falloc and full)
is refused before anything is written. Blocking: a worker thread's job.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Final

from ..file_create import create_file
from .header import MAGIC, Qcow2Error
from .hostfile import HostFile, open_write_log
from .image import Qcow2Image

DEFAULT_CLUSTER_SIZE: Final = 65536
_V3_ONLY: Final = "compatibility level 1.1 and above (use version=v3 or greater)"


@dataclass(frozen=True, slots=True)
class NewImage:
    """What a new image is to be (checked options)."""

    size: int
    version: int = 3
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    preallocation: str = "off"
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    backing_file: str | None = None
    backing_format: str | None = None


def check_options(options: dict[str, Any]) -> NewImage:
    """blockdev-create's BlockdevCreateOptionsQcow2 (without `file`), as QEMU checks them."""
    size = options["size"]
    if size % 512:
        raise Qcow2Error("Image size must be a multiple of 512 bytes")
    version = 2 if options.get("version") == "v2" else 3
    cluster_size = options.get("cluster-size", DEFAULT_CLUSTER_SIZE)
    extended_l2 = options.get("extended-l2", False)
    if extended_l2 and version < 3:
        raise Qcow2Error(f"Extended L2 entries are only supported with {_V3_ONLY}")
    bits = cluster_size.bit_length() - 1
    if not 9 <= bits <= 21 or 1 << bits != cluster_size:
        raise Qcow2Error("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 512 * 32:
        raise Qcow2Error("Extended L2 entries are only supported with cluster sizes of at "
                         "least 16384 bytes")
    preallocation = options.get("preallocation", "off")
    backing_file = options.get("backing-file")
    if backing_file is not None and preallocation != "off" and not extended_l2:
        raise Qcow2Error("Backing file and preallocation can only be used at the same time if "
                         "extended_l2 is on")
    if "backing-fmt" in options and backing_file is None:
        raise Qcow2Error("Backing format cannot be used without backing file")
    lazy = options.get("lazy-refcounts", False)
    if version < 3 and lazy:
        raise Qcow2Error(f"Lazy refcounts only supported with {_V3_ONLY}")
    refcount_bits = options.get("refcount-bits", 16)
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise Qcow2Error("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise Qcow2Error("Different refcount widths than 16 bits require compatibility level "
                         "1.1 or above (use version=v3 or greater)")
    data_file_raw = options.get("data-file-raw", False)
    if data_file_raw and "data-file" not in options:
        raise Qcow2Error("data-file-raw requires data-file")
    if data_file_raw and backing_file is not None:
        raise Qcow2Error("Backing file and data-file-raw cannot be used at the same time")
    if "data-file" in options and version < 3:
        raise Qcow2Error(f"External data files are only supported with {_V3_ONLY}")
    compression = options.get("compression-type", "zlib")
    if compression != "zlib" and version < 3:
        raise Qcow2Error(f"Non-zlib compression type is only supported with {_V3_ONLY}")
    # QEMU would go on; these it does and qmpjobd does not (docs/compat.md).
    for name, given in (("data-file", "data-file" in options), ("extended-l2", extended_l2),
                        ("encrypt", "encrypt" in options),
                        ("compression-type", compression != "zlib")):
        if given:
            raise Qcow2Error(f"qcow2 option '{name}' is not supported by qmpjobd")
    if preallocation not in ("off", "metadata"):
        raise Qcow2Error(f"qcow2 preallocation '{preallocation}' is not supported by qmpjobd "
                         "(off and metadata are)")
    return NewImage(size, version, cluster_size, preallocation, lazy, refcount_bits,
                    backing_file, options.get("backing-fmt"))


def _first_header(new: NewImage) -> bytes:
    """The header QEMU starts from: no size, no L1 table, a one-cluster refcount table in the
    second cluster (its one block in the third)."""
    cs = new.cluster_size
    out = struct.pack(">4sIQIIQIIQQIIQ", MAGIC, new.version, 0, 0, cs.bit_length() - 1, 0, 0,
                      0, 0, cs, 1, 0, 0)
    out += struct.pack(">QQQII", 0, 1 if new.lazy_refcounts else 0, 0,
                       new.refcount_bits.bit_length() - 1, 112)
    return out + bytes(cs - len(out))


def format_image(file: HostFile, new: NewImage) -> None:
    """Write the image NEW describes into FILE (over whatever it held; nothing past what the
    image uses is cut off, as QEMU)."""
    cs = new.cluster_size
    file.pwrite(0, _first_header(new))
    table = bytearray(2 * cs)
    table[:8] = (2 * cs).to_bytes(8, "big")
    file.pwrite(cs, table)
    image = Qcow2Image(file, writable=True)
    if image.refcounts.alloc(3 * cs) != 0:
        raise Qcow2Error("The first clusters of the new image are in use")
    image.rewrite_header()
    l1_entries = -(-new.size // (cs * (cs // 8)))
    image.grow_l1(l1_entries)
    if new.preallocation == "metadata":
        image.preallocate(new.size)
    image.set_size(new.size)
    if new.backing_file is not None:
        image.set_backing(new.backing_file, new.backing_format)
    image.close()


def make_image(filename: str, size: int, backing: tuple[str, str] | None) -> None:
    """A drive-* target as QEMU's bdrv_img_create makes it: the file created (or emptied),
    then an image of SIZE bytes with the default options, naming BACKING (file name, format)."""
    options: dict[str, Any] = {"size": size}
    if backing is not None:
        options["backing-file"], options["backing-fmt"] = backing
    new = check_options(options)
    create_file(filename, 0, "off", False)
    fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
    try:
        log = open_write_log(filename)
        try:
            format_image(HostFile(fd, log), new)
        finally:
            if log is not None:
                log.close()
    finally:
        os.close(fd)
