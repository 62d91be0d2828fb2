"""Handlers for the test-only commands of tests/schema/test-schema.json.

The daemon loads them with `--schema tests/schema/test-schema.json --handlers
tests.extra_handlers`; they are never part of the product.
"""

from __future__ import annotations

import trio

from qmpjobd.context import Context, handler

_released: dict[str, trio.Event] = {}


def _event(key: str) -> trio.Event:
    return _released.setdefault(key, trio.Event())


@handler("x-test-hold")
async def x_test_hold(ctx: Context, *, key: str) -> dict[str, str]:
    await _event(key).wait()
    del _released[key]
    return {"key": key}


@handler("x-test-release")
async def x_test_release(ctx: Context, *, key: str) -> None:
    _event(key).set()


@handler("x-test-emit")
async def x_test_emit(ctx: Context, *, count: int, size: int = 0) -> None:
    for n in range(count):
        ctx.events.emit("X_TEST_EVENT", {"n": n, "padding": "x" * size})
