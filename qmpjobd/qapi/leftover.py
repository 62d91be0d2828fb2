"""Which unexpected member QEMU names when a command has several.

QEMU names the first leftover key of a GLib hash table (GLib 2.74, g_str_hash) filled from the
arguments' QDict, from which each member is removed as it is visited. The QDict's own walk
(qobject.qdict_order) is the order in which keys enter the GLib table. GLib's table: a
power-of-two array probed quadratically from (hash * 11) % (a prime below the size); removals
leave tombstones; it grows when used slots (tombstones included) reach 15/16 of the size,
shrinks below 1/4 full, and each resize re-places the entries in place, slot by slot. The
emulation below is checked against QSD with hundreds of random key sets in
tests/test_qapi_visit.py. It only runs on an error path with two or more unexpected members.
"""

from __future__ import annotations

from ..qobject import qdict_order

_U32 = 0xFFFFFFFF
_PRIMES = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
           65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213)
_FREE, _TOMBSTONE = 0, 1


def _glib_str_hash(key: bytes) -> int:
    acc = 5381
    for byte in key:  # GLib hashes the bytes as signed chars
        acc = (acc * 33 + (byte - 256 if byte > 127 else byte)) & _U32
    return acc if acc > _TOMBSTONE else 2  # 0 and 1 mark free slots and tombstones


def first_leftover(keys: list[str], consumed: list[str]) -> str:
    """The leftover key QEMU's visitor reports, given all KEYS in input order and the
    CONSUMED ones in the order they were visited."""
    hashes: list[int] = []
    slots: list[bytes | None] = []
    shift = used = live = 0

    def home(h: int) -> int:
        return ((h * 11) & _U32) % _PRIMES[shift]

    def find(key: bytes, h: int) -> int:
        """The key's slot, or where it would go (the first tombstone on its probe path)."""
        at, step, grave = home(h), 0, -1
        while hashes[at] != _FREE:
            if hashes[at] == h and slots[at] == key:
                return at
            if hashes[at] == _TOMBSTONE and grave < 0:
                grave = at
            step += 1
            at = (at + step) & (len(hashes) - 1)
        return at if grave < 0 else grave

    def resize() -> None:
        nonlocal shift, used
        old = len(hashes)
        shift = max(3, int(live * 1.333).bit_length())
        size = 1 << shift
        hashes.extend([_FREE] * (size - old))
        slots.extend([None] * (size - old))
        placed = [False] * max(old, size)
        for i in range(old):
            h = hashes[i]
            if h <= _TOMBSTONE:
                hashes[i] = _FREE
                continue
            if placed[i]:  # already moved here from an earlier slot
                continue
            hashes[i], key, slots[i] = _FREE, slots[i], None
            while True:  # move the entry home; whatever sat there moves next
                at, step = home(h), 0
                while placed[at]:
                    step += 1
                    at = (at + step) & (size - 1)
                placed[at] = True
                h, hashes[at] = hashes[at], h
                key, slots[at] = slots[at], key
                if h <= _TOMBSTONE:
                    break
        del hashes[size:], slots[size:]
        used = live

    def maybe_resize() -> None:
        size = len(hashes)
        if (size > live * 4 and size > 8) or size <= used + used // 16:
            resize()

    shift = 3
    hashes.extend([_FREE] * 8)
    slots.extend([None] * 8)
    for name in qdict_order(keys):
        key = name.encode("utf-8", "surrogatepass")
        h = _glib_str_hash(key)
        at = find(key, h)
        was_free = hashes[at] == _FREE
        hashes[at], slots[at] = h, key
        live += 1
        if was_free:
            used += 1
            maybe_resize()
    for name in consumed:
        key = name.encode("utf-8", "surrogatepass")
        at = find(key, _glib_str_hash(key))
        hashes[at], slots[at] = _TOMBSTONE, None
        live -= 1
        maybe_resize()
    first = next(slot for h, slot in zip(hashes, slots, strict=True) if h > _TOMBSTONE)
    assert first is not None
    return first.decode("utf-8", "surrogatepass")
