"""Who may run what: the role a connection has, and the least role each command needs.

A monitor has a role (`--monitor chardev=ID,role=...`, admin by default: QEMU's behaviour). A
socket may admit only some peers (`allow-uid`, `allow-gid`: SO_PEERCRED at accept), and an
access policy (`--access-policy FILE`) may lower a peer's role below its monitor's by its uid or
one of its groups; it never raises one. A command needs the role its schema entry names with a
feature (`role-read-only`, `role-operator`, `role-admin`), else the one the table below gives.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import NamedTuple

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
READ_ONLY, OPERATOR, ADMIN = 0, 1, 2
ROLE_NAMES = ("read-only", "operator", "admin")
_FEATURES = {"role-read-only": READ_ONLY, "role-operator": OPERATOR, "role-admin": ADMIN}
# What the operator's verbs are: every job-* and block-job-* verb (block-job-set-speed too).
_JOB_VERBS = frozenset({"pause", "resume", "cancel", "complete", "finalize", "dismiss"})
_READ_ONLY_COMMANDS = frozenset({"qmp_capabilities", "task-watch", "task-unwatch"})
_OPERATOR_TASK_COMMANDS = frozenset({"task-create", "task-cancel", "task-destroy"})


def role_named(name: str) -> int:
    try:
        return ROLE_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown role '{name}' (read-only, operator or admin)") from None


def minimum_role(command: str, features: Iterable[str] = (), builtin: bool = True) -> int:
    """The least role that may run COMMAND: its feature's, else for a built-in command the
    table's, for a user's command admin."""
    for feature in features:
        if feature in _FEATURES:
            return _FEATURES[feature]
    if not builtin:
        return ADMIN
    if command in _READ_ONLY_COMMANDS or command.startswith("query-"):
        return READ_ONLY
    if command.startswith("job-") and command[4:] in _JOB_VERBS:
        return OPERATOR
    if command.startswith("block-job-") and command[10:] in _JOB_VERBS | {"set-speed"}:
        return OPERATOR
    if command in _OPERATOR_TASK_COMMANDS or command.startswith("task-set-") or (
            command.startswith("task-") and command.endswith("-other-config")):
        return OPERATOR
    return ADMIN


class MonitorAccess(NamedTuple):
    """A monitor's role, and the peers its socket admits (None: every peer the socket file's
    mode lets connect)."""

    role: int = ADMIN
    allow_uids: frozenset[int] | None = None
    allow_gids: frozenset[int] | None = None

    @property
    def filters(self) -> bool:
        return self.allow_uids is not None or self.allow_gids is not None

    def admits(self, uid: int, gids: frozenset[int]) -> bool:
        if not self.filters:
            return True
        return uid in (self.allow_uids or ()) or bool(gids & (self.allow_gids or frozenset()))


class AccessPolicy(NamedTuple):
    """--access-policy: roles by uid and by gid, each a ceiling for the peers it names."""

    uids: Mapping[int, int] = MappingProxyType({})
    gids: Mapping[int, int] = MappingProxyType({})

    @classmethod
    def load(cls, path: str) -> AccessPolicy:
        """The policy in the JSON file at PATH: {"uid:1000": "operator", "gid:27": "admin"}.
        ValueError (one line, naming the file) for anything else."""
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except OSError as e:
            raise ValueError(f"{path}: {e.strerror}") from None
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: must be a JSON object of \"uid:N\" or \"gid:N\" to a role")
        uids: dict[int, int] = {}
        gids: dict[int, int] = {}
        for key, value in data.items():
            kind, _, number = key.partition(":")
            if kind not in ("uid", "gid") or not (number.isascii() and number.isdigit()):
                raise ValueError(f"{path}: '{key}' is not \"uid:N\" or \"gid:N\"")
            if not isinstance(value, str):
                raise ValueError(f"{path}: the role of '{key}' must be a string")
            try:
                role = role_named(value)
            except ValueError as e:
                raise ValueError(f"{path}: '{key}': {e}") from None
            (uids if kind == "uid" else gids)[int(number)] = role
        return cls(uids, gids)

    def ceiling(self, uid: int, gids: frozenset[int]) -> int:
        """The highest role this policy leaves a peer (ADMIN if it names none of its ids)."""
        found = [self.uids[uid]] if uid in self.uids else []
        found += [self.gids[gid] for gid in gids if gid in self.gids]
        return min(found, default=ADMIN)

    @property
    def names_groups(self) -> bool:
        return bool(self.gids)

    @property
    def lowest(self) -> int:
        """The lowest role the policy gives anyone (ADMIN if it names nobody): what a peer
        whose ids cannot be known gets."""
        return min([*self.uids.values(), *self.gids.values()], default=ADMIN)

    def __bool__(self) -> bool:
        return bool(self.uids or self.gids)


def needs_groups(access: MonitorAccess, policy: AccessPolicy) -> bool:
    return access.allow_gids is not None or policy.names_groups


def peer_of(fd: int) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the peer of the Unix socket FD (SO_PEERCRED); None if the kernel
    will not say (not a socket)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid
