"""Users' commands and job kinds: the example x-checksum (examples/checksum) loaded with
--handlers, from its entry point, and from an installed wheel; its job under the whole job
model (events, pause, cancel, speed, task record with its result); a schema and handlers
that disagree refused at start-up, naming file and line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import QMPJOBD, DaemonProcess, QmpConnection, daemon_env, ok

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "checksum"
WAIT = 30.0


def example_env(**extra: str) -> dict[str, str]:
    return daemon_env(PYTHONPATH=f"{REPO}{os.pathsep}{EXAMPLE}", **extra)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away venv with examples/checksum installed by pip, as a user installs it: a
    real dist-info with its entry point in qmpjobd.handlers. qmpjobd and its dependencies come
    from this checkout and this environment (a .pth file). The venv's python."""
    if os.environ.get("QMPJOBD_OFFLINE") == "1":
        pytest.skip("pip needs the network (the example builds with setuptools >= 77)")
    where = tmp_path_factory.mktemp("installed")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "checkout.pth").write_text(f"{REPO}\n{sysconfig.get_path('purelib')}\n")
    source = where / "source"  # (a build writes into its source tree: not this checkout)
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(source)], check=True, timeout=300, capture_output=True)
    found = subprocess.run([python, "-c", "import qmpjobd_checksum as m; print(m.__file__)"],
                           check=True, capture_output=True, text=True).stdout
    assert found.startswith(site), found  # the installed copy, not the example's source
    return python


@pytest.fixture(params=["--handlers", "installed"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DaemonProcess]:
    """The example loaded by --handlers from its source, or found by the entry point of its
    installed distribution (no option)."""
    log = ("--log", str(tmp_path / "qmpjobd.log"))
    if request.param == "--handlers":
        started = DaemonProcess.start(tmp_path, *log, "--handlers", "qmpjobd_checksum",
                                      program=QMPJOBD, env=example_env())
    else:
        python = request.getfixturevalue("installed")
        started = DaemonProcess.start(tmp_path, *log, program=[str(python), "-m", "qmpjobd"],
                                      env=daemon_env())
    with started as process:
        yield process


@pytest.fixture
def conn(daemon: DaemonProcess) -> Iterator[QmpConnection]:
    with daemon.connect() as connection:
        yield connection


def statuses(conn: QmpConnection, job: str, until: str) -> list[str]:
    """JOB's statuses from the events, up to UNTIL (those kept first, then new ones)."""
    seen = []
    while True:
        while conn.events:
            event = conn.events.pop(0)
            if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["id"] == job:
                seen.append(event["data"]["status"])
                if seen[-1] == until:
                    return seen
        conn.events.append(conn.receive(WAIT))


def task_of(conn: QmpConnection, job: str) -> dict[str, Any]:
    (task,) = ok(conn, "query-tasks", {"job-id": job})
    return dict(task)


def test_the_checksum_of_a_raw_file_and_of_a_qcow2_chain(conn: QmpConnection,
                                                        tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    (tmp_path / "data.raw").write_bytes(data)
    ok(conn, "blockdev-add", {"driver": "file", "node-name": "f", "read-only": True,
                              "filename": str(tmp_path / "data.raw")})
    ok(conn, "x-checksum", {"job-id": "c", "device": "f"})
    assert statuses(conn, "c", "null") == ["created", "running", "waiting", "pending",
                                           "concluded", "null"]
    task = task_of(conn, "c")
    assert (task["status"], task["type"], task["result-type"]) == (
        "success", "x-checksum", "x-checksum")
    assert task["result"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    # A qcow2 over a raw base, partly written: what a guest reads, as qemu-img converts it.
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(os.urandom(3 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 64k", "-c",
                    "write -z 2M 512k", str(top)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(tmp_path / "flat")],
                   check=True)
    ok(conn, "blockdev-add", {"driver": "qcow2", "node-name": "q", "read-only": True,
                              "file": {"driver": "file", "filename": str(top)}})
    ok(conn, "x-checksum", {"job-id": "q", "device": "q", "auto-dismiss": False})
    statuses(conn, "q", "concluded")
    flat = (tmp_path / "flat").read_bytes()
    assert task_of(conn, "q")["result"]["sha256"] == hashlib.sha256(flat).hexdigest()
    (job,) = ok(conn, "query-jobs")
    assert (job["type"], job["status"], job["current-progress"]) == (
        "x-checksum", "concluded", 4 << 20)
    ok(conn, "job-dismiss", {"id": "q"})


def test_the_job_model_holds_for_a_users_job(conn: QmpConnection, tmp_path: Path) -> None:
    (tmp_path / "big.raw").write_bytes(os.urandom(16 << 20))
    ok(conn, "blockdev-add", {"driver": "file", "node-name": "f", "read-only": True,
                              "filename": str(tmp_path / "big.raw")})
    ok(conn, "x-checksum", {"job-id": "c", "device": "f", "speed": 1 << 20,
                            "auto-dismiss": False})
    statuses(conn, "c", "running")
    assert conn.execute("blockdev-del", {"node-name": "f"})["error"]["desc"] == (
        "Block device f is in use")
    ok(conn, "job-pause", {"id": "c"})
    statuses(conn, "c", "paused")
    (job,) = ok(conn, "query-jobs")
    assert (job["type"], job["status"], job["total-progress"]) == (
        "x-checksum", "paused", 16 << 20)
    assert 0 < job["current-progress"] < 16 << 20
    assert task_of(conn, "c")["job-status"] == "paused"
    ok(conn, "job-resume", {"id": "c"})
    statuses(conn, "c", "running")
    ok(conn, "job-cancel", {"id": "c"})
    assert statuses(conn, "c", "concluded") == ["aborting", "concluded"]
    (job,) = ok(conn, "query-jobs")
    assert job["error"] == "Operation canceled"
    assert task_of(conn, "c")["status"] == "cancelled"
    ok(conn, "job-dismiss", {"id": "c"})
    ok(conn, "blockdev-del", {"node-name": "f"})  # free again once the job is gone


def test_the_users_kinds_and_commands_in_the_schema(conn: QmpConnection) -> None:
    schema = {entity["name"]: entity for entity in ok(conn, "query-qmp-schema")}
    command = schema["x-checksum"]
    assert command["meta-type"] == "command" and command.get("features") == ["role-operator"]
    job_types = [e for e in schema.values() if e["meta-type"] == "enum"
                 and "backup" in e["values"] and "stream" in e["values"]]
    assert len(job_types) == 1 and job_types[0]["values"][-1] == "x-checksum"
    # What qmp-shell completes from.
    assert "x-checksum" in {command["name"] for command in ok(conn, "query-commands")}
    refused = conn.execute("x-checksum", {"job-id": "c", "device": "nothing"})
    assert refused["error"]["desc"] == "Failed to find node with node-name='nothing'"
    bad = conn.execute("x-checksum", {"job-id": "c"})
    assert bad["error"]["desc"] == "Parameter 'device' is missing"


def test_an_operator_may_run_a_command_whose_schema_says_so(tmp_path: Path) -> None:
    operator = tmp_path / "op.sock"
    (tmp_path / "d.raw").write_bytes(bytes(1 << 20))
    with DaemonProcess.start(tmp_path, "--handlers", "qmpjobd_checksum", "--blockdev",
                             f"driver=file,node-name=f,read-only=on,filename={tmp_path}/d.raw",
                             "--chardev", f"socket,id=m1,path={operator},server=on,wait=off",
                             "--monitor", "chardev=m1,role=operator", program=QMPJOBD,
                             env=example_env()):
        conn = QmpConnection(operator)
        ok(conn, "qmp_capabilities")
        assert "x-checksum" in {c["name"] for c in ok(conn, "query-commands")}
        ok(conn, "x-checksum", {"job-id": "c", "device": "f"})
        statuses(conn, "c", "null")
        conn.close()


def test_an_installed_package_is_found_by_its_entry_point(tmp_path: Path) -> None:
    """A distribution on the path naming qmpjobd_checksum in the group qmpjobd.handlers (as
    `pip install examples/checksum` makes one): no --handlers needed. (The `installed` venv
    does the same with pip; this needs no network.)"""
    site = tmp_path / "site"
    info = site / "qmpjobd_checksum-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qmpjobd-checksum\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[qmpjobd.handlers]\nchecksum = qmpjobd_checksum\n")
    shutil.copytree(EXAMPLE / "qmpjobd_checksum", site / "qmpjobd_checksum")
    env = daemon_env(PYTHONPATH=f"{REPO}{os.pathsep}{site}")
    with DaemonProcess.start(tmp_path, program=QMPJOBD, env=env) as daemon, \
            daemon.connect() as conn:
        assert "x-checksum" in {c["name"] for c in ok(conn, "query-commands")}


def start_error(tmp_path: Path, *options: str) -> str:
    done = subprocess.run([*QMPJOBD, "--socket", str(tmp_path / "q.sock"), *options],
                          capture_output=True, text=True, timeout=WAIT,
                          env=daemon_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}"))
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


DOC = "##\n# @{0}:\n#\n# A command of mine.\n##\n"


def test_schema_and_handlers_that_disagree_name_file_and_line(tmp_path: Path) -> None:
    schema = tmp_path / "mine.json"
    # (qapi-schema.json requires doc comments: its pragma holds for the files it includes.)
    schema.write_text(DOC.format("x-mine") + "{ 'command': 'x-mine', 'data': { 'count': 'int' } }\n"
                      + DOC.format("x-orphan") + "{ 'command': 'x-orphan' }\n")
    (tmp_path / "mine.py").write_text(
        "from qmpjobd.api import Context, handler\n\n\n"
        "@handler('x-mine')\nasync def x_mine(ctx: Context) -> None:\n    pass\n\n\n"
        "@handler('x-stray')\nasync def x_stray(ctx: Context) -> None:\n    pass\n")
    error = start_error(tmp_path, "--schema", str(schema), "--handlers", "mine")
    assert error.count("\n") == 1
    assert f"{schema}:12: command x-orphan has no handler" in error
    assert f"{tmp_path / 'mine.py'}:4: handler for x-mine cannot take argument 'count'" in error
    assert f"{tmp_path / 'mine.py'}:9: handler for x-stray, which is not in the schema" in error
    schema.write_text(DOC.format("x-mine")
                      + "{ 'command': 'x-mine', 'data': { 'count': 'Nothing' } }\n")
    error = start_error(tmp_path, "--schema", str(schema))
    assert error == (f"qmpjobd: {schema}: In command 'x-mine':\n{schema}:6: parameter 'count' uses "
                     "unknown type 'Nothing'\n")


KIND = """from typing import Any

from qmpjobd.api import Context, Job


class Mine(Job):
    job_type = {job_type!r}
    transaction_action = {action!r}

    @classmethod
    def from_action(cls, ctx: Context, arguments: dict[str, Any]) -> Job:
        raise NotImplementedError

    async def run(self) -> None:
        pass
"""


@pytest.mark.parametrize(("job_type", "action", "complaint"), [
    ("backup", None, "job_type 'backup' of Mine is a built-in job type"),
    ("My_Kind", None, "job_type 'My_Kind' of Mine is not a job type's name"),
    ("x-mine", ("x-mine", "NoSuchWrapper"), "transaction_action of Mine names "
     "'NoSuchWrapper', which is not a struct of the schema"),
    ("x-mine", ("abort", "Abort"), "transaction_action 'abort' of Mine is a built-in action"),
])
def test_a_users_job_kind_that_cannot_be_is_named_at_its_class(
        tmp_path: Path, job_type: str, action: tuple[str, str] | None, complaint: str) -> None:
    (tmp_path / "mine.py").write_text(KIND.format(job_type=job_type, action=action))
    error = start_error(tmp_path, "--handlers", "mine")
    assert error.startswith(f"qmpjobd: {tmp_path / 'mine.py'}:6: {complaint}"), error
    assert error.count("\n") == 1


def test_a_built_in_job_type_from_a_users_base_class_is_refused(tmp_path: Path) -> None:
    """Only qmpjobd's own job classes lend their job_type: a user's base class is checked as
    the class itself would be."""
    (tmp_path / "helperlib.py").write_text("from qmpjobd.api import Job\n\n\n"
                                           "class Base(Job):\n    job_type = 'backup'\n")
    (tmp_path / "mine.py").write_text("from helperlib import Base\n\n\n"
                                      "class Mine(Base):\n    async def run(self) -> None:\n"
                                      "        pass\n")
    error = start_error(tmp_path, "--handlers", "mine")
    assert f"{tmp_path / 'mine.py'}:4: job_type 'backup' of Mine is a built-in job type" in error


def test_a_built_in_kind_refined_is_still_that_kind(tmp_path: Path) -> None:
    """A user's subclass of a built-in job that keeps its job_type: no new kind, no error."""
    (tmp_path / "traced.py").write_text("from qmpjobd.block.jobs.mirror import MirrorJob\n\n\n"
                                        "class TracedMirror(MirrorJob):\n    pass\n")
    with DaemonProcess.start(tmp_path, "--handlers", "traced", program=QMPJOBD,
                             env=daemon_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
                             ) as daemon, daemon.connect() as conn:
        (job_type,) = [e for e in ok(conn, "query-qmp-schema") if e["meta-type"] == "enum"
                       and "backup" in e["values"] and "stream" in e["values"]]
        assert job_type["values"].count("mirror") == 1


@pytest.mark.skipif(os.environ.get("QMPJOBD_OFFLINE") == "1", reason="pip needs the network")
def test_the_schema_ships_inside_the_installed_package(tmp_path: Path) -> None:
    """A wheel of the project, unpacked elsewhere: it carries schema/, so the daemon and
    --schema work from any install, not only this checkout."""
    source = tmp_path / "source"  # (a build writes into its source tree: not this checkout)
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("qmpjobd", "schema"):
        shutil.copytree(REPO / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("qmpjobd-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, timeout=300,
                   capture_output=True)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{EXAMPLE}")
    with DaemonProcess.start(tmp_path, "--handlers", "qmpjobd_checksum", program=QMPJOBD,
                             env=env) as daemon, daemon.connect() as conn:
        assert "x-checksum" in {c["name"] for c in ok(conn, "query-commands")}
    where = subprocess.run([sys.executable, "-c", "import qmpjobd.cli as c; "
                            "print(c.__file__, c.DEFAULT_SCHEMA.is_file())"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    module, found = where.stdout.split()
    assert module.startswith(str(tmp_path / "site")) and found == "True"


def test_a_users_command_without_a_role_feature_is_the_admins(tmp_path: Path) -> None:
    """Named like a query, but the user's: only a feature in its schema entry would lower it."""
    schema = tmp_path / "mine.json"
    schema.write_text(DOC.format("query-mine") + "{ 'command': 'query-mine' }\n")
    (tmp_path / "mine.py").write_text(
        "from qmpjobd.api import Context, handler\n\n\n"
        "@handler('query-mine')\nasync def query_mine(ctx: Context) -> None:\n    pass\n")
    operator = tmp_path / "op.sock"
    env = daemon_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    with DaemonProcess.start(tmp_path, "--schema", str(schema), "--handlers", "mine",
                             "--chardev", f"socket,id=m1,path={operator},server=on,wait=off",
                             "--monitor", "chardev=m1,role=operator", program=QMPJOBD,
                             env=env) as daemon, daemon.connect() as admin:
        ok(admin, "query-mine")
        conn = QmpConnection(operator)
        ok(conn, "qmp_capabilities")
        assert "needs the role 'admin'" in conn.execute("query-mine")["error"]["desc"]
        assert "query-mine" not in {c["name"] for c in ok(conn, "query-commands")}
        assert "query-jobs" in {c["name"] for c in ok(conn, "query-commands")}
        conn.close()


def test_a_users_job_kind_as_a_transaction_action(conn: QmpConnection, tmp_path: Path) -> None:
    datas = {}
    for name in ("a", "b"):
        datas[name] = os.urandom(2 << 20)
        (tmp_path / name).write_bytes(datas[name])
        ok(conn, "blockdev-add", {"driver": "file", "node-name": name, "read-only": True,
                                  "filename": str(tmp_path / name)})
    schema = {entity["name"]: entity for entity in ok(conn, "query-qmp-schema")}
    kinds = next(e for e in schema.values()
                 if e["meta-type"] == "enum" and "drive-backup" in e["values"])
    assert kinds["values"][-1] == "x-checksum"

    def action(name: str, job: str) -> dict[str, Any]:
        return {"type": "x-checksum", "data": {"job-id": job, "device": name}}

    # One action fails: no job is left, and the nodes are free again.
    ok(conn, "x-checksum", {"job-id": "taken", "device": "a", "speed": 1,
                            "auto-dismiss": False})
    for actions in ([action("a", "c1"), {"type": "abort", "data": {}}],
                    [action("a", "c1"), action("b", "taken")]):
        refused = conn.execute("transaction", {"actions": actions})
        assert refused["error"]["desc"] in ("Transaction aborted using Abort action",
                                            "Job ID 'taken' already in use")
    ok(conn, "job-cancel", {"id": "taken"})
    statuses(conn, "taken", "concluded")
    ok(conn, "job-dismiss", {"id": "taken"})
    assert ok(conn, "query-jobs") == []
    ok(conn, "blockdev-del", {"node-name": "b"})  # nothing holds it
    ok(conn, "blockdev-add", {"driver": "file", "node-name": "b", "read-only": True,
                              "filename": str(tmp_path / "b")})
    # Both, concluding together.
    ok(conn, "transaction", {"actions": [action("a", "c1"), action("b", "c2")],
                             "properties": {"completion-mode": "grouped"}})
    ended: set[str] = set()
    while not {"c1", "c2"} <= ended:
        event = conn.events.pop(0) if conn.events else conn.receive(WAIT)
        if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["status"] == "null":
            ended.add(event["data"]["id"])
    for job, name in (("c1", "a"), ("c2", "b")):
        newest = ok(conn, "query-tasks", {"job-id": job})[0]  # (c1 was made and undone too)
        assert newest["result"]["sha256"] == hashlib.sha256(datas[name]).hexdigest()
    (txn,) = ok(conn, "query-tasks", {"type": "transaction"})
    assert len(txn["subtasks"]) == 2


BAD_SCHEMA = """##
# @XBad:
#
# @job-id: the job's identifier
##
{ 'struct': 'XBad', 'data': { 'job-id': 'str' } }

##
# @XBadWrapper:
#
# @data: the arguments
##
{ 'struct': 'XBadWrapper', 'data': { 'data': 'XBad' } }

##
# @x-bad:
#
# An action whose job cannot be made.
##
{ 'command': 'x-bad', 'data': 'XBad', 'boxed': true }
"""
BAD_MODULE = """from typing import Any

from qmpjobd.api import Context, Job, QmpError, handler


class Bad(Job):
    job_type = "x-bad"
    transaction_action = ("x-bad", "XBadWrapper")

    @classmethod
    def from_action(cls, ctx: Context, arguments: dict[str, Any]) -> Job:
        if arguments["job-id"] == "bug":
            raise KeyError("a bug")
        raise QmpError("GenericError", "no, thanks")


@handler("x-bad")
async def x_bad(ctx: Context, arguments: dict[str, Any]) -> None:
    Bad.from_action(ctx, arguments)
"""


def test_an_action_that_cannot_be_made_leaves_nothing(tmp_path: Path) -> None:
    """A user's from_action that raises a QmpError, or has a bug: the transaction fails with
    that error (or an internal error), and the jobs made before it are gone, their nodes
    free."""
    (tmp_path / "bad.json").write_text(BAD_SCHEMA)
    (tmp_path / "xbad.py").write_text(BAD_MODULE)
    (tmp_path / "d.raw").write_bytes(bytes(1 << 20))
    env = daemon_env(PYTHONPATH=os.pathsep.join((str(REPO), str(EXAMPLE), str(tmp_path))))
    with DaemonProcess.start(tmp_path, "--schema", str(tmp_path / "bad.json"), "--handlers",
                             "xbad", "--handlers", "qmpjobd_checksum", program=QMPJOBD,
                             env=env) as daemon, daemon.connect() as conn:
        ok(conn, "blockdev-add", {"driver": "file", "node-name": "f", "read-only": True,
                                  "filename": str(tmp_path / "d.raw")})
        for bad, error in (("nope", "no, thanks"), ("bug", "internal error in transaction")):
            reply = conn.execute("transaction", {"actions": [
                {"type": "x-checksum", "data": {"job-id": "c", "device": "f"}},
                {"type": "x-bad", "data": {"job-id": bad}}]})
            assert reply["error"]["desc"].startswith(error), reply
            assert ok(conn, "query-jobs") == []
        ok(conn, "blockdev-del", {"node-name": "f"})
