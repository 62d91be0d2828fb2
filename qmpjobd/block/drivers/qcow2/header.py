"""The qcow2 header and its extensions, read and checked (QEMU's docs/interop/qcow2.txt).

`parse_header` takes the first cluster of an image (or as much of the file as there is) and
returns a `Header`, or raises Qcow2Error saying what is wrong, in QEMU's words where QEMU has
some. Nothing here writes: a damaged image is left as it is. What the driver does not support
(encryption, an external data file, extended L2 entries, zstd, unknown incompatible features)
is reported as such, apart from what is merely damaged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from ...errors import BlockError

MAGIC: Final = b"QFI\xfb"
V2_LENGTH: Final = 72
V3_LENGTH: Final = 104
MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21  # QEMU's limit: 2 MiB clusters
MAX_BACKING_NAME: Final = 1023
# QEMU's limit on the active L1 table: 32 MiB.
MAX_L1_BYTES: Final = 32 << 20
# And on the refcount table: 8 MiB.
MAX_REFCOUNT_TABLE_BYTES: Final = 8 << 20

# Incompatible feature bits.
DIRTY: Final = 1 << 0
CORRUPT: Final = 1 << 1
EXTERNAL_DATA_FILE: Final = 1 << 2
COMPRESSION_TYPE: Final = 1 << 3
EXTENDED_L2: Final = 1 << 4
KNOWN_INCOMPATIBLE: Final = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2
# Compatible feature bits.
LAZY_REFCOUNTS: Final = 1 << 0
# Autoclear feature bits.
BITMAPS: Final = 1 << 0
RAW_EXTERNAL_DATA: Final = 1 << 1

# Header extension types.
EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_TABLE: Final = 0x6803F857
EXT_BITMAPS: Final = 0x23852875
EXT_ENCRYPTION: Final = 0x0537BE77
EXT_DATA_FILE: Final = 0x44415441

# The feature name table QEMU writes into version 3 headers of clusters over 4 KiB: (type,
# bit, name) of every feature it knows.
FEATURE_TABLE: Final = b"".join(
    struct.pack(">BB46s", kind, bit, name) for kind, bit, name in (
        (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
        (0, 3, b"compression type"), (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"),
        (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
    )
)

_V2: Final = struct.Struct(">4sIQIIQIIQQIIQ")
_V3: Final = struct.Struct(">QQQII")


class Qcow2Error(BlockError):
    """An image that cannot be opened (damaged, or using what the driver does not support)."""


@dataclass(slots=True)
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    # (type, bit) -> name, from the feature name table.
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    # Extensions kept as they are when the header is rewritten: (type, data), in order.
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l2_entries(self) -> int:
        """Entries in an L2 table (one cluster of 8-byte entries)."""
        return self.cluster_size // 8

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & LAZY_REFCOUNTS)


def parse_header(data: bytes, file_size: int) -> Header:
    """The header of an image whose first bytes are DATA (at least its first cluster, or the
    whole file if shorter) and whose file is FILE_SIZE bytes long."""
    if len(data) < V2_LENGTH or data[:4] != MAGIC:
        raise Qcow2Error("Image is not in qcow2 format")
    fields = _V2.unpack_from(data)
    version = fields[1]
    if version not in (2, 3):
        raise Qcow2Error(f"Unsupported qcow2 version {version}")
    header = Header(version, *fields[2:])
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"Unsupported cluster size: 2^{header.cluster_bits}")
    cluster = header.cluster_size
    if version == 3:
        if len(data) < V3_LENGTH:
            raise Qcow2Error("qcow2 header exceeds cluster size")
        (header.incompatible_features, header.compatible_features,
         header.autoclear_features, header.refcount_order,
         header.header_length) = _V3.unpack_from(data, V2_LENGTH)
        if header.header_length < V3_LENGTH:
            raise Qcow2Error("qcow2 header too short")
        if header.header_length > cluster or header.header_length > len(data):
            raise Qcow2Error("qcow2 header exceeds cluster size")
        if header.header_length % 8:
            raise Qcow2Error("qcow2 header length is not a multiple of 8")
        if header.header_length > V3_LENGTH:
            header.compression_type = data[V3_LENGTH]
    else:
        header.header_length = V2_LENGTH
    if header.refcount_order > 6:
        raise Qcow2Error("Reference count entry width too large; may not exceed 64 bits")
    _read_extensions(header, data)
    _check_features(header)
    _check_tables(header, file_size)
    if header.backing_file_offset:
        end = header.backing_file_offset + header.backing_file_size
        if header.backing_file_size > MAX_BACKING_NAME or end > cluster or end > len(data):
            raise Qcow2Error("Backing file name too long")
        # QEMU keeps the name as a C string: it ends at a NUL byte, and an empty one names
        # no backing file.
        raw = data[header.backing_file_offset:end].split(b"\0", 1)[0]
        header.backing_file = raw.decode("utf-8", "surrogateescape") if raw else None
    return header


def _read_extensions(header: Header, data: bytes) -> None:
    offset = header.header_length
    limit = min(header.cluster_size, len(data))
    if header.backing_file_offset:
        limit = min(limit, header.backing_file_offset)
    seen: set[int] = set()
    while offset + 8 <= limit:
        kind, length = struct.unpack_from(">II", data, offset)
        offset += 8
        if kind == EXT_END:
            return
        if offset + length > limit:
            raise Qcow2Error(f"Invalid header extension 0x{kind:08x}: it exceeds the header")
        payload = data[offset:offset + length]
        offset += (length + 7) & ~7
        if kind in seen and kind != 0:
            raise Qcow2Error(f"Header extension 0x{kind:08x} appears twice")
        seen.add(kind)
        if kind == EXT_BACKING_FORMAT:
            header.backing_format = payload.decode("utf-8", "surrogateescape")
        elif kind == EXT_FEATURE_TABLE:
            for at in range(0, len(payload) - 47, 48):
                name = payload[at + 2:at + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                header.feature_names[(payload[at], payload[at + 1])] = name
        header.extensions.append((kind, payload))
    if offset < limit:
        raise Qcow2Error("Invalid header extension area: it exceeds the header")


def _check_features(header: Header) -> None:
    unknown = header.incompatible_features & ~KNOWN_INCOMPATIBLE
    if unknown:
        names = [header.feature_names.get((0, bit), f"Unknown incompatible feature: {bit:x}")
                 for bit in range(64) if unknown >> bit & 1]
        raise Qcow2Error("Unsupported qcow2 feature(s): " + ", ".join(names))
    if header.crypt_method:
        raise Qcow2Error("qcow2 encryption is not supported by qmpjobd")
    if header.incompatible_features & EXTERNAL_DATA_FILE:
        raise Qcow2Error("qcow2 external data files are not supported by qmpjobd")
    if header.incompatible_features & EXTENDED_L2:
        raise Qcow2Error("qcow2 extended L2 entries are not supported by qmpjobd")
    if header.incompatible_features & COMPRESSION_TYPE or header.compression_type:
        if header.compression_type == 1:
            raise Qcow2Error("qcow2 zstd compression is not supported by qmpjobd")
        raise Qcow2Error(f"Unknown compression type: {header.compression_type}")


def _check_tables(header: Header, file_size: int) -> None:
    cluster = header.cluster_size
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2Error("Active L1 table too large")
    covered = header.l1_size * header.l2_entries * cluster
    if covered < header.size:
        raise Qcow2Error("L1 table is too small")
    for what, offset in (("L1 table", header.l1_table_offset),
                         ("Reference count table", header.refcount_table_offset),
                         ("Snapshot table", header.snapshots_offset)):
        if offset % cluster:
            raise Qcow2Error(f"{what} offset invalid")
    if header.l1_size and header.l1_table_offset + header.l1_size * 8 > file_size:
        raise Qcow2Error("Active L1 table lies past the end of the image file")
    table_bytes = header.refcount_table_clusters * cluster
    if table_bytes > MAX_REFCOUNT_TABLE_BYTES:
        raise Qcow2Error("Reference count table too large")
    if header.refcount_table_offset + table_bytes > file_size:
        raise Qcow2Error("Reference count table lies past the end of the image file")
