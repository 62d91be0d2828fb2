"""The node interface every driver implements, on real files: block status, host extents,
backing, and what query-named-block-nodes reports; and the driver registry.

Nodes are opened as blockdev-add opens them (block/nodes.py, through the registry).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.block.drivers.base import Extent, HostExtent, Node, is_zero
from qmpjobd.block.drivers.registry import DRIVERS, driver
from qmpjobd.block.errors import BlockError
from qmpjobd.block.graph import BlockGraph
from qmpjobd.block.nodes import add_node, delete_node

KiB, MiB = 1 << 10, 1 << 20
# Data at [0, 64 KiB) and [1 MiB, 1 MiB + 4 KiB); a hole between and after; the file ends 100
# bytes into its last sector.
FILE_SIZE = 2 * MiB + 100


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.img"
    with open(path, "wb") as f:
        f.write(b"\xaa" * 64 * KiB)
        f.seek(MiB)
        f.write(b"\xbb" * 4 * KiB)
        f.truncate(FILE_SIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.lseek(fd, 64 * KiB, os.SEEK_HOLE) != 64 * KiB:
            pytest.skip("the file system here does not report holes")
    finally:
        os.close(fd)
    return path


async def opened(graph: BlockGraph, options: dict[str, Any]) -> Node:
    await add_node(graph, options)
    return graph.find(options["node-name"])


def file_options(path: Path, name: str = "f") -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": str(path)}


async def test_file_node(image: Path) -> None:
    graph = BlockGraph()
    node = await opened(graph, file_options(image))
    assert node.size == 2 * MiB + 512  # whole sectors
    assert node.backing is None
    assert node.block_status(0, node.size) == Extent(64 * KiB, zero=False, allocated=True)
    assert node.block_status(64 * KiB, node.size - 64 * KiB) == Extent(
        MiB - 64 * KiB, zero=True, allocated=True
    )
    assert node.block_status(MiB, 8 * KiB) == Extent(4 * KiB, zero=False, allocated=True)
    assert node.block_status(MiB + 4 * KiB, 8 * KiB) == Extent(8 * KiB, zero=True, allocated=True)
    # The rest of the last sector, past the end of the file, reads as zeroes.
    assert node.block_status(FILE_SIZE, 412) == Extent(412, zero=True, allocated=True)
    assert node.host_extent(100, 200) == HostExtent(node, 100, 200)  # type: ignore[arg-type]
    assert node.is_protocol
    assert node.exact_filename() == str(image)
    assert node.format_info() == {"dirty-flag": False}
    assert node.allocated_size() == os.stat(image).st_blocks * 512 > 0
    await delete_node(graph, "f")


async def test_raw_window_over_a_file(image: Path) -> None:
    graph = BlockGraph()
    file = await opened(graph, file_options(image))
    window = await opened(graph, {"driver": "raw", "node-name": "w", "file": "f",
                                  "offset": 64 * KiB, "size": MiB})
    assert window.size == MiB and window.backing is None
    # Shifted by the window's offset: a hole, then the second data extent at the window's end.
    assert window.block_status(0, MiB) == Extent(MiB - 64 * KiB, zero=True, allocated=True)
    assert window.block_status(MiB - 64 * KiB, 64 * KiB) == Extent(
        4 * KiB, zero=False, allocated=True
    )
    assert window.host_extent(512, 1024) == HostExtent(file, 64 * KiB + 512, 1024)  # type: ignore[arg-type]
    assert not window.is_protocol
    assert window.exact_filename() == ""  # offset and size change the data: a "json:" name
    assert window.format_info() == file.format_info()
    assert window.allocated_size() == file.allocated_size()
    plain = await opened(graph, {"driver": "raw", "node-name": "p", "file": "f"})
    assert plain.exact_filename() == str(image)  # a raw node over a protocol takes its name
    await graph.close_all()


async def test_raw_over_an_inline_null_node() -> None:
    graph = BlockGraph()
    node = await opened(graph, {"driver": "raw", "node-name": "r", "read-only": True,
                                "file": {"driver": "null-co", "size": MiB, "read-zeroes": True}})
    child = node.child
    assert child is not None and child.name.startswith("#block") and not child.monitor_owned
    assert child.read_only  # inherited from its parent
    assert node.block_status(0, MiB) == Extent(MiB, zero=True, allocated=True)
    assert node.host_extent(0, MiB) is None  # no host file: copies go through read and write
    assert node.format_info() == {} and node.allocated_size() == 0
    assert node.exact_filename() == ""  # null-co's size option changes the data
    await graph.close_all()


async def test_null_node() -> None:
    graph = BlockGraph()
    plain = await opened(graph, {"driver": "null-co", "node-name": "n"})
    zeroes = await opened(graph, {"driver": "null-co", "node-name": "z", "read-zeroes": True})
    # As QEMU's null-co: known zeroes only with read-zeroes.
    assert plain.block_status(0, 4096) == Extent(4096, zero=False, allocated=True)
    assert zeroes.block_status(0, 4096) == Extent(4096, zero=True, allocated=True)
    assert plain.backing is None and plain.host_extent(0, 4096) is None
    assert plain.is_protocol and plain.exact_filename() == "null-co://"
    assert zeroes.exact_filename() == ""
    assert plain.allocated_size() == 0 and plain.format_info() == {}


def test_the_registry() -> None:
    assert sorted(DRIVERS) == ["file", "null-co", "qcow2", "raw"]
    for name, entry in DRIVERS.items():
        assert entry.name == entry.node_type.driver == name
    assert DRIVERS["file"].create is not None and DRIVERS["qcow2"].create is not None
    assert DRIVERS["raw"].create is None and DRIVERS["null-co"].create is None
    with pytest.raises(BlockError, match="Unknown driver 'qed'"):
        driver("qed")


def test_exit_closes_a_raw_node_over_a_file_node(tmp_path: Path) -> None:
    """At exit every node is flushed and closed, parents before the nodes they use (a raw
    node over a file node added before it used to meet a closed file: a traceback)."""
    import subprocess

    from tests.daemons import QMPJOBD, daemon_env

    image = tmp_path / "a.img"
    image.write_bytes(bytes(MiB))
    requests = b"".join(line + b"\n" for line in [
        b'{"execute": "qmp_capabilities"}',
        b'{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", '
        b'"filename": "' + str(image).encode() + b'"}}',
        b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "w", '
        b'"file": "f"}}',
        b'{"execute": "quit"}',
    ])
    result = subprocess.run([*QMPJOBD, "--chardev", "stdio,id=m0", "--monitor", "chardev=m0"],
                            input=requests, capture_output=True, env=daemon_env(), timeout=30)
    assert result.returncode == 0
    assert result.stdout.count(b'{"return":{}}') == 4
    assert b"Traceback" not in result.stderr and b"Error" not in result.stderr


@pytest.mark.parametrize("at", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (3 << 20) - 1])
def test_is_zero_finds_one_byte_anywhere(at: int) -> None:
    """is_zero compares a MiB at a time: a byte set on either side of a piece's edge, or in
    the last byte, is found, and ranges that leave it out are zero."""
    data = bytearray(3 << 20)
    data[at] = 0x80
    frozen = bytes(data)
    assert not is_zero(frozen)
    assert not is_zero(frozen, at, at + 1)
    assert is_zero(frozen, 0, at)
    assert is_zero(frozen, at + 1)
    assert is_zero(frozen, at + 1, 10 << 20)  # an end past the data: up to its end
    assert is_zero(b"") and is_zero(frozen, 5, 5)
