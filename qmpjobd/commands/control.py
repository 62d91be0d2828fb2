"""Handlers for schema/control.json and schema/introspect.json: negotiation, version, the
command list, the schema, quit."""

from __future__ import annotations

from typing import Any

from .. import PACKAGE, QMP_API_VERSION
from ..context import Context, handler


@handler("qmp_capabilities")
async def qmp_capabilities(ctx: Context, *, enable: list[str] | None = None) -> None:
    ctx.session.negotiate(enable or [])


@handler("query-version")
async def query_version(ctx: Context) -> dict[str, Any]:
    major, minor, micro = QMP_API_VERSION
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": PACKAGE}


@handler("query-commands")
async def query_commands(ctx: Context) -> list[dict[str, str]]:
    # QEMU lists the most recently registered command first: the schema's order, reversed.
    # What this connection's role does not let it run is left out (query-qmp-schema describes
    # everything: it does not grant).
    roles = ctx.daemon.command_roles
    return [{"name": name} for name in reversed(list(ctx.daemon.tables.commands))
            if roles.get(name, 0) <= ctx.role]


@handler("query-qmp-schema")
async def query_qmp_schema(ctx: Context) -> list[dict[str, object]]:
    return ctx.daemon.tables.schema_info


@handler("quit")
async def quit(ctx: Context) -> None:
    # The reply goes out first; the server then closes every connection and exits.
    ctx.daemon.quit_requested()
