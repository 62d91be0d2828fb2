"""Every bound the daemon enforces on what clients may make it hold, in one place.

Per message (qmp/framing.py, QEMU's own): 64 MiB in one token and in all tokens of a message,
2M tokens, nesting 1024. Per client: QEMU's 8 queued in-band requests once oob is on, and
`output_limit` bytes of unsent output (a client that does not read is disconnected). Across
the daemon: the budgets below, so that many clients together cannot make it hold what each
may alone (300 clients x a 64 MiB message each), and counts of clients, jobs and nodes.

Each has a command-line option of the same name (cli.py); docs/compat.md lists them.
"""

from __future__ import annotations

from typing import NamedTuple

MiB = 1 << 20


class Limits(NamedTuple):
    # Unsent output one client may have queued before it is disconnected.
    output_limit: int = 8 * MiB
    # Input held for all clients together: partial messages, and requests parsed but still
    # waiting in in-band queues. Past it, the client holding the most is told and closed.
    input_budget: int = 256 * MiB
    # Unsent output of all clients together. Past it, the client with the most unsent output
    # (the slowest reader) is disconnected.
    output_budget: int = 128 * MiB
    # Connected clients. One more is sent a single QMP error saying so, then closed.
    max_clients: int = 1024
    # Jobs in existence (dismissed jobs do not count) and block nodes.
    max_jobs: int = 65536
    max_nodes: int = 65536
