"""The readiness hub: many sockets, one epoll set, whoever waits first leads."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from qmpjobd.fdio import FdChannel, ReadinessHub


def pair(hub: ReadinessHub) -> tuple[FdChannel, socket.socket]:
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    return FdChannel(fd, fd, (fd,), hub), theirs


async def read_one(channel: FdChannel) -> bytes:
    """Read as the server does: read until a short read, then wait."""
    while True:
        data = channel.read_now(4096)
        if data is not None:
            return data
        await channel.wait_readable()


async def test_every_waiter_is_woken_by_its_own_input() -> None:
    hub = ReadinessHub()
    channels = [pair(hub) for _ in range(20)]
    got: dict[int, bytes] = {}

    async def reader(i: int, channel: FdChannel) -> None:
        got[i] = await read_one(channel)

    async with trio.open_nursery() as nursery:
        for i, (channel, _) in enumerate(channels):
            nursery.start_soon(reader, i, channel)
        await trio.testing.wait_all_tasks_blocked()
        for i, (_, peer) in reversed(list(enumerate(channels))):
            peer.sendall(b"%d" % i)
    assert got == {i: b"%d" % i for i in range(20)}
    for channel, peer in channels:
        channel.close()
        peer.close()
    hub.close()


async def test_a_cancelled_leader_hands_over() -> None:
    hub = ReadinessHub()
    (first, first_peer), (second, second_peer) = pair(hub), pair(hub)
    for channel in (first, second):
        assert channel.read_now(4096) is None
    # Both were registered with input assumed: the first wait of each returns at once.
    await first.wait_readable()
    await second.wait_readable()
    leading = trio.CancelScope()
    result: list[bytes] = []

    async def lead() -> None:
        with leading:
            await first.wait_readable()

    async def follow() -> None:
        result.append(await read_one(second))

    with trio.fail_after(5):  # a follower nobody promotes would wait for ever
        await _leader_then_follower(lead, follow, leading, second_peer)
    assert result == [b"hello"]
    for channel, peer in ((first, first_peer), (second, second_peer)):
        channel.close()
        peer.close()
    hub.close()


async def _leader_then_follower(
    lead: Callable[[], Awaitable[None]], follow: Callable[[], Awaitable[None]],
    leading: trio.CancelScope, second_peer: socket.socket,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        leading.cancel()  # the leader goes; the follower must take over
        await trio.testing.wait_all_tasks_blocked()
        second_peer.sendall(b"hello")


async def test_end_of_input_after_a_short_read_is_seen() -> None:
    """Data and the peer's close may raise one edge; the close must not be lost."""
    hub = ReadinessHub()
    channel, peer = pair(hub)
    peer.sendall(b"last words")
    peer.shutdown(socket.SHUT_WR)
    await trio.testing.wait_all_tasks_blocked()
    assert await read_one(channel) == b"last words"
    with trio.fail_after(5):
        await channel.wait_readable()  # a short read was made: the server waits now
    assert channel.read_now(4096) == b""
    channel.close()
    peer.close()
    hub.close()
