"""Handlers for schema/block-core.json's nodes: blockdev-add, -del, -create and the node list.

Options arrive as the schema declares them (qapi/visit.py): boxed commands (blockdev-add) as
one dict keyed by the schema's member names. The block layer does the work.
"""

from __future__ import annotations

from typing import Any

from ..block.info import named_block_nodes
from ..block.jobs.create import create_job
from ..block.nodes import add_node, delete_node
from ..context import Context, handler


@handler("blockdev-add")
async def blockdev_add(ctx: Context, options: dict[str, Any]) -> None:
    await add_node(ctx.graph, options)


@handler("blockdev-del")
async def blockdev_del(ctx: Context, *, node_name: str) -> None:
    await delete_node(ctx.graph, node_name)


@handler("blockdev-create")
async def blockdev_create(ctx: Context, *, job_id: str, options: dict[str, Any]) -> None:
    await ctx.jobs.launch(create_job(ctx.graph, ctx.jobs, job_id, options), 0)


@handler("query-named-block-nodes")
async def query_named_block_nodes(
    ctx: Context, *, flat: bool | None = None
) -> list[dict[str, Any]]:
    return await named_block_nodes(ctx.graph.all_nodes(), ctx.jobs.jobs(), flat=bool(flat))
