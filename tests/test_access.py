"""Access roles: what a read-only, operator or admin monitor lets its clients run, query-commands
listing just that, operators touching only their own tasks, sockets admitting peers by uid and
gid (SO_PEERCRED), an access policy lowering a peer's role, socket file modes, and one-line
errors for bad options. Peers of another uid are real processes run as nobody (root only)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import QMPJOBD, QmpConnection, daemon_env, negotiated, ok, start_qmpjobd

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
as_nobody = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                               reason="needs root, to run a peer as another uid")

READ_ONLY_COMMANDS = {"qmp_capabilities", "task-watch", "task-unwatch"}

# A peer of another uid: connects, negotiates, runs the commands given (JSON), prints each
# reply; "closed" if the daemon closes the connection before its greeting.
PEER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
if not f.readline():
    print("closed"); sys.exit()
for line in ['{"execute": "qmp_capabilities"}', *sys.argv[2:]]:
    f.write(line.encode() + b"\\n"); f.flush()
    while "event" in (reply := json.loads(f.readline())):
        pass
    print(json.dumps(reply))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (a socket for peers of other uids goes there)."""
    path = Path(tempfile.mkdtemp(prefix="qmpjobd-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def monitor_args(path: Path, role: str | None = None, **chardev: str) -> list[str]:
    extra = "".join(f",{key.replace('_', '-')}={value}" for key, value in chardev.items())
    monitor = "chardev=m1" + (f",role={role}" if role else "")
    return ["--chardev", f"socket,id=m1,path={path},server=on,wait=off{extra}",
            "--monitor", monitor]


def refused(conn: QmpConnection, command: str, arguments: dict[str, Any] | None = None) -> str:
    reply = conn.execute(command, arguments)
    assert reply["error"]["class"] == "GenericError", reply
    return str(reply["error"]["desc"])


def as_peer(uid: int, path: Path, *commands: dict[str, Any]) -> list[Any]:
    done = subprocess.run([SYSTEM_PYTHON, "-c", PEER, str(path),
                           *(json.dumps(c) for c in commands)],
                          user=uid, group=uid, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [line if line == "closed" else json.loads(line) for line in done.stdout.splitlines()]


def slow_backup(conn: QmpConnection) -> None:
    for node in ("src", "dst"):
        ok(conn, "blockdev-add", {"driver": "null-co", "node-name": node, "size": 64 << 20,
                                  "read-zeroes": True})
    ok(conn, "blockdev-backup", {"job-id": "j", "device": "src", "target": "dst",
                                 "sync": "full", "speed": 1 << 20})


@contextmanager
def backup_and_role(tmp_path: Path, role: str) -> Iterator[tuple[QmpConnection, QmpConnection]]:
    """A daemon running backup j, with a monitor of ROLE beside the admin's: a connection to
    each (the admin's, then the role's)."""
    path = tmp_path / f"{role}.sock"
    with start_qmpjobd(tmp_path, *monitor_args(path, role)) as daemon, \
            daemon.connect() as admin:
        slow_backup(admin)
        other = negotiated(path)
        try:
            yield admin, other
        finally:
            other.close()


def test_a_read_only_monitor_may_only_look(tmp_path: Path) -> None:
    with backup_and_role(tmp_path, "read-only") as (admin, viewer):
        assert [job["id"] for job in ok(viewer, "query-jobs")] == ["j"]
        ok(viewer, "task-watch")
        assert refused(viewer, "job-pause", {"id": "j"}) == (
            "Command 'job-pause' needs the role 'operator'; this connection's role is "
            "'read-only'")
        assert "needs the role 'admin'" in refused(viewer, "quit")
        assert "needs the role 'admin'" in refused(viewer, "blockdev-del", {"node-name": "x"})
        assert "needs the role 'operator'" in refused(viewer, "task-create",
                                                      {"name-label": "x"})
        listed = {c["name"] for c in ok(viewer, "query-commands")}
        assert listed == READ_ONLY_COMMANDS | {
            name for name in listed if name.startswith("query-")}
        assert {"query-jobs", "query-tasks", "query-qmp-schema"} <= listed
        # The schema describes everything; it grants nothing.
        described = {e["name"] for e in ok(viewer, "query-qmp-schema")}
        assert {"quit", "blockdev-add", "job-pause"} <= described
        # The admin's monitor is as it was.
        assert "quit" in {c["name"] for c in ok(admin, "query-commands")}
        ok(admin, "job-cancel", {"id": "j"})


def least_role(command: str) -> str:
    """The issue's table, written out here rather than taken from the daemon's code."""
    if command in READ_ONLY_COMMANDS or command.startswith("query-"):
        return "read-only"
    verbs = ("pause", "resume", "cancel", "complete", "finalize", "dismiss")
    if (command in {f"job-{verb}" for verb in verbs} | {f"block-job-{verb}" for verb in verbs}
            or command in {"block-job-set-speed", "task-create", "task-cancel", "task-destroy"}
            or command.startswith("task-set-") or command.endswith("-other-config")):
        return "operator"
    return "admin"


def test_every_command_of_the_schema_as_each_role(tmp_path: Path) -> None:
    """Each command the schema has, tried with no arguments on a monitor of each role: refused
    for its role exactly when the table puts it above (an allowed one gets past the role, to
    its arguments' check or its work). quit, last, on the admin's."""
    ranks = ["read-only", "operator", "admin"]
    paths = {role: tmp_path / f"{role}.sock" for role in ranks}
    options = []
    for n, (role, path) in enumerate(paths.items()):
        options += ["--chardev", f"socket,id=r{n},path={path},server=on,wait=off",
                    "--monitor", f"chardev=r{n},role={role}"]
    with start_qmpjobd(tmp_path, *options) as daemon, daemon.connect() as admin:
        commands = sorted(e["name"] for e in ok(admin, "query-qmp-schema")
                          if e["meta-type"] == "command")
        assert len(commands) > 40 and "quit" in commands
        for role, path in paths.items():
            conn = negotiated(path)
            for command in commands:
                if command == "quit" and role == "admin":
                    continue
                reply = conn.execute(command, {})
                needs = least_role(command)
                denial = (f"Command '{command}' needs the role '{needs}'; this connection's "
                          f"role is '{role}'")
                if ranks.index(needs) > ranks.index(role):
                    assert reply.get("error", {}).get("desc") == denial, (role, reply)
                else:
                    assert "needs the role" not in json.dumps(reply), (role, reply)
            if role == "admin":
                assert conn.execute("quit") == {"return": {}}
            conn.close()


def test_an_operator_steers_jobs_and_its_tasks(tmp_path: Path) -> None:
    with backup_and_role(tmp_path, "operator") as (_, operator):
        ok(operator, "job-pause", {"id": "j"})
        ok(operator, "job-resume", {"id": "j"})
        ok(operator, "block-job-set-speed", {"device": "j", "speed": 2 << 20})
        assert "needs the role 'admin'" in refused(operator, "blockdev-add", {
            "driver": "null-co", "node-name": "n"})
        assert "needs the role 'admin'" in refused(operator, "transaction", {"actions": []})
        uuid = ok(operator, "task-create", {"name-label": "mine"})["uuid"]
        ok(operator, "task-set-progress", {"uuid": uuid, "progress": 0.5})
        ok(operator, "task-add-to-other-config", {"uuid": uuid, "key": "k", "value": "v"})
        (job_task,) = ok(operator, "query-tasks", {"job-id": "j"})
        assert "may not destroy it" in refused(operator, "task-destroy",
                                               {"uuid": job_task["uuid"]})
        ok(operator, "task-cancel", {"uuid": job_task["uuid"]})  # as job-cancel
        ok(operator, "task-cancel", {"uuid": uuid})
        listed = {c["name"] for c in ok(operator, "query-commands")}
        assert {"job-pause", "block-job-set-speed", "task-create", "task-destroy",
                "task-set-other-config", "query-jobs"} <= listed
        assert not {"quit", "blockdev-add", "blockdev-backup", "transaction"} & listed


@contextmanager
def shared_operator(tmp_path: Path, shared_dir: Path) -> Iterator[tuple[Path, QmpConnection]]:
    """A daemon with an operator monitor every user may connect to: its path, and a
    connection to the admin's monitor."""
    path = shared_dir / "op.sock"
    with start_qmpjobd(tmp_path, *monitor_args(path, "operator", mode="0666")) as daemon, \
            daemon.connect() as admin:
        yield path, admin


@as_nobody
def test_an_operator_may_not_touch_another_users_tasks(tmp_path: Path,
                                                       shared_dir: Path) -> None:
    with shared_operator(tmp_path, shared_dir) as (path, admin):
        _, created = as_peer(NOBODY, path, {"execute": "task-create",
                                            "arguments": {"name-label": "nobody's"}})
        uuid = created["return"]["uuid"]
        operator = negotiated(path)  # root, on the operator monitor
        for command, arguments in (("task-set-progress", {"progress": 0.5}),
                                   ("task-set-name-label", {"name-label": "x"}),
                                   ("task-cancel", {}), ("task-destroy", {})):
            desc = refused(operator, command, {"uuid": uuid, **arguments})
            assert f"created by uid {NOBODY}" in desc and "its own uid" in desc, desc
        # Its owner may; so may an admin.
        _, cancelled = as_peer(NOBODY, path, {"execute": "task-cancel",
                                              "arguments": {"uuid": uuid}})
        assert cancelled == {"return": {}}
        ok(admin, "task-set-status", {"uuid": uuid, "status": "cancelled"})
        ok(admin, "task-destroy", {"uuid": uuid})
        operator.close()


@as_nobody
def test_a_socket_admits_only_the_peers_it_names(tmp_path: Path, shared_dir: Path) -> None:
    path = shared_dir / "only-root.sock"
    by_group = shared_dir / "by-group.sock"
    extra = [*monitor_args(path, mode="0666", allow_uid="0:1"),
             "--chardev", f"socket,id=m2,path={by_group},server=on,wait=off,mode=0666,"
             f"allow-gid={NOBODY}", "--monitor", "chardev=m2"]
    with start_qmpjobd(tmp_path, *extra):
        assert as_peer(NOBODY, path, {"execute": "query-version"}) == ["closed"]
        log = (tmp_path / "qmpjobd.log").read_text()
        assert f"refused a client: uid {NOBODY}" in log
        root = negotiated(path)  # uid 0 is named
        ok(root, "query-version")
        root.close()
        (_, version) = as_peer(NOBODY, by_group, {"execute": "query-version"})
        assert "return" in version


@as_nobody
def test_an_access_policy_lowers_a_peers_role(tmp_path: Path, shared_dir: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({f"uid:{NOBODY}": "read-only", "gid:0": "admin"}))
    path = shared_dir / "admin.sock"
    with start_qmpjobd(tmp_path, "--access-policy", str(policy),
                       *monitor_args(path, mode="0666")):
        _, denied, listed = as_peer(NOBODY, path, {"execute": "quit"},
                                    {"execute": "query-commands"})
        assert denied["error"]["desc"] == (
            "Command 'quit' needs the role 'admin'; this connection's role is 'read-only'")
        assert "quit" not in {c["name"] for c in listed["return"]}
        root = negotiated(path)  # named by neither rule: the monitor's own role
        assert "quit" in {c["name"] for c in ok(root, "query-commands")}
        root.close()
    policy.write_text(json.dumps({f"gid:{NOBODY}": "operator"}))
    with start_qmpjobd(tmp_path, "--access-policy", str(policy),
                       *monitor_args(path, mode="0666")):
        _, made, denied = as_peer(NOBODY, path, {"execute": "task-create",
                                                 "arguments": {"name-label": "t"}},
                                  {"execute": "quit"})
        assert "return" in made
        assert "this connection's role is 'operator'" in denied["error"]["desc"]


def test_socket_files_are_private_unless_a_mode_says(tmp_path: Path) -> None:
    shared = tmp_path / "shared.sock"
    with start_qmpjobd(tmp_path, *monitor_args(shared, mode="0660")) as daemon:
        assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(shared.stat().st_mode) == 0o660


@pytest.mark.parametrize(("options", "message"), [
    (["--chardev", "socket,id=m1,path=P,server=on,wait=off", "--monitor",
      "chardev=m1,role=root"], "unknown role 'root' (read-only, operator or admin)"),
    (["--chardev", "socket,id=m1,path=P,server=on,wait=off,allow-uid=me", "--monitor",
      "chardev=m1"], "Parameter 'allow-uid' expects numeric ids separated by ':', not 'me'"),
    (["--chardev", "socket,id=m1,path=P,server=on,wait=off,mode=999", "--monitor",
      "chardev=m1"], "Parameter 'mode' expects an octal file mode, not '999'"),
    (["--access-policy", "MISSING"], "MISSING: No such file or directory"),
    (["--access-policy", "BAD"], "BAD: not JSON"),
    (["--access-policy", "KEY"], "KEY: 'user:1' is not \"uid:N\" or \"gid:N\""),
    (["--access-policy", "ROLE"], "ROLE: 'uid:1': unknown role 'boss'"),
])
def test_bad_access_options_are_one_line_errors(tmp_path: Path, options: list[str],
                                                message: str) -> None:
    files = {"BAD": "{", "KEY": '{"user:1": "admin"}', "ROLE": '{"uid:1": "boss"}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    where = {**{name: str(tmp_path / name) for name in (*files, "MISSING")}}
    argv = [where.get(o, o).replace("path=P", f"path={tmp_path / 'm1.sock'}")
            for o in options]
    done = subprocess.run([*QMPJOBD, "--socket", str(tmp_path / "q.sock"), *argv],
                          capture_output=True, text=True, timeout=30, env=daemon_env(),
                          cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "q.sock").exists()


# A root peer in group 4242 when it connects, in none once connected.
LEAVING_PEER = """
import json, os, socket, sys
os.setgroups([4242])
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.setgroups([])
f = s.makefile("rwb")
f.readline()
for line in ['{"execute": "qmp_capabilities"}', '{"execute": "quit"}']:
    f.write(line.encode() + b"\\n"); f.flush()
    print(f.readline().decode().strip())
"""


@as_nobody
def test_a_peers_groups_are_those_it_connected_with(tmp_path: Path) -> None:
    """The policy reads the groups the peer had when it connected (SO_PEERGROUPS): leaving a
    group afterwards, or exiting, does not escape its limit."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"gid:4242": "read-only"}))
    path = tmp_path / "q2.sock"
    with start_qmpjobd(tmp_path, "--access-policy", str(policy), *monitor_args(path)):
        done = subprocess.run([SYSTEM_PYTHON, "-c", LEAVING_PEER, str(path)],
                              capture_output=True, text=True, timeout=30)
        _, quit_reply = done.stdout.splitlines()
        assert json.loads(quit_reply)["error"]["desc"] == (
            "Command 'quit' needs the role 'admin'; this connection's role is 'read-only'")


@as_nobody
def test_an_operator_adds_subtasks_only_to_its_own_tasks(tmp_path: Path,
                                                         shared_dir: Path) -> None:
    with shared_operator(tmp_path, shared_dir) as (path, admin):
        parent = ok(admin, "task-create", {"name-label": "root's"})["uuid"]
        _, refused_reply = as_peer(NOBODY, path, {"execute": "task-create", "arguments": {
            "name-label": "mine", "subtask-of": parent}})
        desc = refused_reply["error"]["desc"]
        assert "add a subtask to" in desc and "created by uid 0" in desc, desc
        assert ok(admin, "query-task", {"uuid": parent})["subtasks"] == []
