"""The command line: qemu-storage-daemon's options for monitors, plus friendlier ones.

    qmpjobd --chardev socket,id=m0,path=/run/q.sock,server=on,wait=off --monitor chardev=m0
    qmpjobd --chardev stdio,id=m0 --monitor chardev=m0,pretty=on
    qmpjobd --socket /run/q.sock --pidfile /run/q.pid --daemonize
    qmpjobd                       (listens on $XDG_RUNTIME_DIR/qmpjobd.sock or
                                   /tmp/qmpjobd-$UID/qmp.sock, and prints the path)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import PACKAGE, QMP_API_VERSION, __version__, logs, paths, systemd
from .access import AccessPolicy, MonitorAccess, role_named
from .limits import Limits
from .listen import EarlyGreeter, SocketInUse, bind_unix_socket, unlink_socket
from .qapi.errors import KeyvalError
from .qapi.keyval import split

if TYPE_CHECKING:
    from .context import Daemon
    from .dispatch import Dispatcher
    from .qapi.parser import TopLevel
    from .qapi.tables import Tables

# Only what parsing the command line and binding the sockets needs is imported up front; trio,
# the schema compiler and the handlers load while early clients already have their greeting.

# The product's schema, inside the package (qmpjobd/schema is the repository's schema/, which
# the wheel carries along), so that --schema works from any install.
DEFAULT_SCHEMA = (Path(__file__).resolve().parent / "schema" / "qapi-schema.json").resolve()
# The build conditions the schema's 'if' conditions are evaluated under: those of the
# qemu-storage-daemon qmpjobd stands in for (Debian bookworm's 7.2), so that conditional members
# and values (BlockdevOptionsFile's drop-cache, BlockdevAioOptions' io_uring, ...) are there
# exactly when they are in QSD. The test suite checks this set against the live QSD
# (tests/daemons.py QSD_DEFINES).
SCHEMA_DEFINES = frozenset(
    {
        "CONFIG_DBUS_DISPLAY", "CONFIG_FUSE", "CONFIG_LIBPMEM", "CONFIG_LINUX",
        "CONFIG_LINUX_IO_URING", "CONFIG_POSIX", "CONFIG_REPLICATION", "CONFIG_SECRET_KEYRING",
        "CONFIG_SPICE", "CONFIG_SPICE_PROTOCOL", "CONFIG_VDUSE_BLK_EXPORT", "CONFIG_VHOST_CRYPTO",
        "CONFIG_VHOST_USER_BLK_SERVER", "CONFIG_ZSTD", "HAVE_HOST_BLOCK_DEVICE",
        "HAVE_IPPROTO_MPTCP",
    }
)
log = logging.getLogger("qmpjobd")


class UsageError(Exception):
    pass


class MonitorSpec(NamedTuple):
    """A QMP monitor: a Unix socket path, or None for stdin/stdout; ORIGIN is the option that
    asked for it, for error messages."""

    path: str | None
    pretty: bool = False
    origin: str = "the default socket"
    # Its role, and the peers its socket admits; the socket file's mode (0600 if None).
    access: MonitorAccess = MonitorAccess()
    mode: int | None = None
    # A socket the service manager passed (its index among them), used as it is: not bound
    # here, not removed at exit.
    passed: int | None = None


@dataclass
class Config:
    monitors: list[MonitorSpec] = field(default_factory=list)
    default_socket: bool = False
    pidfile: str | None = None
    daemonize: bool = False
    log_level: str = "info"
    log_file: str | None = None
    log_format: str = "text"
    # The users' QAPI files, compiled as if qapi-schema.json included them, and the modules
    # with their handlers and job kinds.
    schema_files: list[str] = field(default_factory=list)
    handler_modules: list[str] = field(default_factory=list)
    # The limits given on the command line (limits.py's field names), the rest default.
    limits: dict[str, int] = field(default_factory=dict)
    # --blockdev options, in either of QEMU's forms: key=value,... or JSON.
    blockdevs: list[str] = field(default_factory=list)
    # Where task records are kept (None: in memory), and their bounds (TaskLimits' fields).
    state_dir: str | None = None
    task_limits: dict[str, Any] = field(default_factory=dict)
    # --access-policy: roles by peer uid and gid, below each monitor's.
    access_policy: AccessPolicy = field(default_factory=AccessPolicy)


# -- QEMU's key=value option syntax -----------------------------------------------------------


def parse_keyval(text: str, implied: str) -> dict[str, str]:
    """'socket,id=m0,path=a,,b' -> {implied: 'socket', 'id': 'm0', 'path': 'a,b'}: QEMU's
    syntax (qapi/keyval.py's split), each key at most once."""
    try:
        pairs = split(text, implied)
    except KeyvalError as exc:
        raise UsageError(str(exc)) from None
    result: dict[str, str] = {}
    for key, value in pairs:
        if key in result:
            raise UsageError(f"Parameter '{key}' given more than once")
        result[key] = value
    return result


def _flag(options: dict[str, str], key: str, default: bool) -> bool:
    value = options.pop(key, None)
    if value is None:
        return default
    if value in ("on", "yes", "true", ""):
        return True
    if value in ("off", "no", "false"):
        return False
    raise UsageError(f"Parameter '{key}' expects 'on' or 'off'")


def _reject_rest(options: dict[str, str]) -> None:
    if options:
        raise UsageError(f"Invalid parameter '{sorted(options)[0]}'")


# -- the command line --------------------------------------------------------------------------


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmpjobd",
        description="A QMP job daemon: qemu-storage-daemon's job API, served over Unix sockets.",
    )
    add = parser.add_argument
    add("--chardev", action="append", default=[], metavar="socket,id=ID,path=PATH,server=on,"
        "wait=off[,mode=0600][,allow-uid=N[:N...]][,allow-gid=N[:N...]] | stdio,id=ID",
        help="a character device to put a monitor on; a socket's file gets MODE (default "
        "0600), and with allow-uid or allow-gid it admits only peers of those users or groups")
    add("--monitor", action="append", default=[],
        metavar="[chardev=]ID[,pretty=on][,role=read-only|operator|admin]",
        help="a QMP monitor on the character device ID; ROLE limits what its clients may run "
        "(default admin: everything)")
    add("--access-policy", metavar="FILE", help="a JSON object mapping \"uid:N\" or \"gid:N\" "
        "to a role: a peer it names gets at most that role on any monitor")
    add("--socket", action="append", default=[], metavar="PATH",
        help="a QMP monitor on a Unix socket at PATH (shorthand for a chardev and a monitor)")
    add("--blockdev", action="append", default=[], metavar="OPTIONS",
        help="a block node, as blockdev-add would create it")
    add("--pidfile", metavar="PATH", help="write the daemon's pid here once every socket "
        "listens (removed at exit)")
    add("--daemonize", action="store_true",
        help="detach once every socket listens (the parent exits 0 then)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add("--log", metavar="FILE", help="log here instead of to stderr")
    add("--log-format", default="text", choices=["text", "json"],
        help="text lines, or one JSON object a line (time, level, event, client, job)")
    for name, unit, what in _LIMIT_OPTIONS:
        add(f"--{name.replace('_', '-')}", type=_count, metavar=unit, dest=name,
            help=f"{what} (default {getattr(Limits(), name)})")
    add("--state-dir", metavar="DIR", help="keep task records and their change log in "
        "DIR/tasks.sqlite3, across restarts (default: in memory)")
    for name, type_, unit, what in _TASK_OPTIONS:
        add(f"--{name.replace('_', '-')}", type=type_, metavar=unit, dest=name, help=what)
    add("--version", action="version", version=f"qmpjobd {__version__} (QMP of QEMU "
        f"{'.'.join(map(str, QMP_API_VERSION))})")
    add("--schema", action="append", default=[], metavar="FILE", help="a QAPI schema file of "
        "your own commands, events and types, compiled as if qapi-schema.json included it (it "
        "may use the built-in types); repeatable")
    add("--handlers", action="append", default=[], metavar="MODULE", help="a Python module "
        "with the handlers (and job kinds) of those commands; repeatable. Installed packages "
        "name theirs in the entry-point group 'qmpjobd.handlers' (docs/extending.md)")
    return parser


_LIMIT_OPTIONS = [
    ("output_limit", "BYTES", "disconnect a client whose unsent output exceeds this"),
    ("input_budget", "BYTES", "input held for all clients together"),
    ("output_budget", "BYTES", "unsent output of all clients together"),
    ("max_clients", "N", "clients served at once"),
    ("max_jobs", "N", "jobs in existence at once"),
    ("max_nodes", "N", "block nodes at once"),
]


def _seconds(text: str) -> float:
    """A duration in seconds: a number above 0 (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expects a number of seconds above 0, not {text!r}")
    return value


def _count(text: str) -> int:
    """A limit's value: a whole number of at least 1 (argparse names the option)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, not {text!r}")
    return value


# TaskLimits' fields, with their option's type and help (defaults in tasks/registry.py).
_TASK_OPTIONS = [
    ("task_changes_kept", _count, "N", "task changes kept for clients that resume the feed "
     "(default 100000)"),
    ("task_retention", _seconds, "SECONDS", "how long finished tasks are kept (default 86400)"),
    ("max_tasks", _count, "N", "finished tasks kept at most, the oldest expire first "
     "(default 100000)"),
    ("max_pending_tasks", _count, "N", "clients' tasks pending at once (default 100000)"),
]
_TASK_LIMIT_FIELDS = {"task_changes_kept": "changes_kept", "task_retention": "retention",
                      "max_tasks": "max_tasks", "max_pending_tasks": "max_pending"}


def parse_command_line(argv: list[str], passed: list[tuple[str, str]] | None = None) -> Config:
    """The configuration ARGV asks for; PASSED: the sockets the service manager passed (each
    one's name and where it listens), which `fd-name=` chardevs take, and which are the
    monitors when no other is given."""
    passed = passed or []
    args = _argument_parser().parse_args(argv)
    config = Config(
        pidfile=args.pidfile, daemonize=args.daemonize, log_level=args.log_level,
        log_file=args.log, log_format=args.log_format, schema_files=args.schema,
        handler_modules=args.handlers,
        limits={name: getattr(args, name) for name, _, _ in _LIMIT_OPTIONS
                if getattr(args, name) is not None},
        state_dir=args.state_dir,
        task_limits={_TASK_LIMIT_FIELDS[name]: getattr(args, name) for name, *_ in _TASK_OPTIONS
                     if getattr(args, name) is not None},
    )
    if args.access_policy is not None:
        try:
            config.access_policy = AccessPolicy.load(args.access_policy)
        except ValueError as exc:
            raise UsageError(f"--access-policy {exc}") from None
    chardevs: dict[str, str | None] = {}
    chardev_texts: dict[str, str] = {}
    chardev_peers: dict[str, Chardev] = {}
    for text in args.chardev:
        try:
            chardev = _chardev(text, chardevs, passed)
        except UsageError as exc:
            raise UsageError(f"--chardev {text}: {exc}") from None
        if chardev.passed is not None and any(
                other.passed == chardev.passed for other in chardev_peers.values()):
            raise UsageError(f"--chardev {text}: the passed socket is another chardev's")
        chardevs[chardev.id] = chardev.path
        chardev_texts[chardev.id] = text
        chardev_peers[chardev.id] = chardev
    used: set[str] = set()
    for text in args.monitor:
        try:
            chardev_id, pretty, role = _monitor(text, chardevs, used)
        except UsageError as exc:
            raise UsageError(f"--monitor {text}: {exc}") from None
        used.add(chardev_id)
        origin = f"--chardev {chardev_texts[chardev_id]}"
        chardev = chardev_peers[chardev_id]
        access = MonitorAccess(role, chardev.allow_uids, chardev.allow_gids)
        config.monitors.append(MonitorSpec(chardevs[chardev_id], pretty, origin, access,
                                           chardev.mode, chardev.passed))
    for path in args.socket:
        config.monitors.append(MonitorSpec(path, origin=f"--socket {path}"))
    config.blockdevs = args.blockdev
    if not config.monitors and passed and not args.chardev:
        # Socket activation: every passed socket is a monitor with the default role.
        config.monitors += [
            MonitorSpec(path, origin=f"the passed socket '{name}'", passed=index)
            for index, (name, path) in enumerate(passed)]
    if not config.monitors:
        config.monitors.append(MonitorSpec(default_socket_path()))
        config.default_socket = True
    stdio = any(m.path is None for m in config.monitors)
    if stdio and config.daemonize:
        raise UsageError("--daemonize cannot be used with a stdio monitor")
    return config


class Chardev(NamedTuple):
    """A --chardev: its id, its socket's path (None for stdio), the file's mode, the peers it
    admits (None: any)."""

    id: str
    path: str | None
    mode: int | None = None
    allow_uids: frozenset[int] | None = None
    allow_gids: frozenset[int] | None = None
    passed: int | None = None  # fd-name=: the index of the passed socket it takes


def _chardev(text: str, chardevs: dict[str, str | None], passed: list[tuple[str, str]]
             ) -> Chardev:
    """A --chardev option."""
    options = parse_keyval(text, "backend")
    backend = options.pop("backend", None)
    chardev_id = options.pop("id", None)
    if not chardev_id:
        raise UsageError("Parameter 'id' is missing")
    if chardev_id in chardevs:
        raise UsageError(f"Duplicate chardev ID '{chardev_id}'")
    path: str | None = None
    mode = None
    uids = gids = None
    index = None
    if backend == "socket":
        path = options.pop("path", None)
        fd_name = options.pop("fd-name", None)
        if fd_name is not None:
            if path is not None:
                raise UsageError("'path' and 'fd-name' exclude each other")
            names = [name for name, _ in passed]
            if fd_name not in names:
                raise UsageError(f"no socket named '{fd_name}' was passed (LISTEN_FDNAMES: "
                                 f"{', '.join(names) or 'none'})")
            if names.count(fd_name) > 1:
                raise UsageError(f"{names.count(fd_name)} passed sockets are named '{fd_name}'")
            index = names.index(fd_name)
            path = passed[index][1]
        if not path:
            raise UsageError("only Unix sockets ('path=' or 'fd-name=') are supported")
        # A passed socket listens already: server=on,wait=off go without saying.
        if not _flag(options, "server", index is not None):
            raise UsageError("a monitor socket needs 'server=on'")
        if _flag(options, "wait", index is None):
            raise UsageError("'wait=on' is not supported; use 'wait=off'")
        if "mode" in options:
            text_mode = options.pop("mode")
            try:
                mode = int(text_mode, 8)
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o777:
                raise UsageError(f"Parameter 'mode' expects an octal file mode, not "
                                 f"'{text_mode}'")
        uids = _ids(options, "allow-uid")
        gids = _ids(options, "allow-gid")
    elif backend == "stdio":
        _flag(options, "signal", True)
    else:
        raise UsageError(f"unsupported chardev backend '{backend}'")
    if index is not None and mode is not None:
        raise UsageError("'mode' is the service manager's for a passed socket (SocketMode=)")
    _reject_rest(options)
    return Chardev(chardev_id, path, mode, uids, gids, index)


def _ids(options: dict[str, str], key: str) -> frozenset[int] | None:
    """allow-uid=1000:1001 -> {1000, 1001} (None if the key is not there)."""
    text = options.pop(key, None)
    if text is None:
        return None
    parts = text.split(":")
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise UsageError(f"Parameter '{key}' expects numeric ids separated by ':', not "
                         f"'{text}'")
    return frozenset(int(part) for part in parts)


def _monitor(text: str, chardevs: dict[str, str | None], used: set[str]
             ) -> tuple[str, bool, int]:
    """A --monitor option: its chardev's id, whether it is pretty, its role."""
    options = parse_keyval(text, "chardev")
    chardev_id = options.pop("chardev", None)
    if chardev_id is None or chardev_id not in chardevs:
        raise UsageError(f"chardev '{chardev_id}' not found")
    if chardev_id in used:
        raise UsageError(f"chardev '{chardev_id}' is already in use")
    if options.pop("mode", "control") != "control":
        raise UsageError("only mode=control (QMP) is supported")
    options.pop("id", None)
    pretty = _flag(options, "pretty", False)
    try:
        role = role_named(options.pop("role", "admin"))
    except ValueError as exc:
        raise UsageError(f"Parameter 'role': {exc}") from None
    _reject_rest(options)
    return chardev_id, pretty, role


def default_socket_path(tmp: str = "/tmp") -> str:
    """paths.default_socket_path, its private directory made if it is not there (and refused if
    it is not private)."""
    path = paths.default_socket_path(tmp)
    private = paths.private_directory(tmp)
    if private is None:
        return path
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        try:
            paths.check_private(private)
        except paths.NotPrivate as exc:
            raise UsageError(str(exc)) from None
    return path


# -- running -----------------------------------------------------------------------------------


def _setup_logging(config: Config) -> None:
    handler: logging.Handler
    if config.log_file:
        handler = logging.FileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.JsonFormatter() if config.log_format == "json"
                         else logs.text_formatter())
    root = logging.getLogger("qmpjobd")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def _build(config: Config) -> tuple[Daemon, Dispatcher]:
    from . import extensions, schema_cache
    from .commands import MODULES
    from .context import handlers_in
    from .dispatch import Dispatcher, StartupError
    from .qapi import QapiError, load_schema
    from .qapi.tables import build_tables

    modules = list(MODULES)
    users = extensions.user_modules(config.handler_modules)
    modules += users
    # Files the modules name (SCHEMA: a path, or a list of them, next to the module).
    schema_files = list(config.schema_files)
    for module in users:
        for path in extensions.module_schema(module):
            if path not in schema_files:
                schema_files.append(path)
    actions = extensions.transaction_actions(users)

    def amend(exprs: list[TopLevel]) -> None:
        # The users' actions join the built-in union and its kinds (as QEMU's schema would
        # have them written in).
        for top in exprs:
            if top.expr.get("enum") == "TransactionActionKind":
                values = top.expr["data"]
                assert isinstance(values, list)
                values.extend(case for case, _ in actions)
            elif top.expr.get("union") == "TransactionAction":
                branches = top.expr["data"]
                assert isinstance(branches, dict)
                branches.update(actions)

    try:
        schema = schema_cache.load(str(DEFAULT_SCHEMA), schema_files, amend if actions else None,
                                   actions, schema_cache.default_directory())
    except QapiError as exc:
        if actions:  # an action class at fault is named, rather than the union's line
            try:
                plain = load_schema(str(DEFAULT_SCHEMA), schema_files)
            except QapiError:
                pass  # the users' files themselves: exc says where
            else:
                extensions.blame_actions(plain, users)
        if not schema_files:
            raise
        if exc.info is None:  # a file that cannot be read: the option names it
            raise StartupError(f"--schema {' '.join(schema_files)}: {exc}") from None
        raise StartupError(str(exc)) from None  # (it names the file and line)
    except OSError as exc:
        raise StartupError(f"--schema: {exc}") from None
    kinds = extensions.job_kinds(users)
    if kinds:
        extensions.check_job_kinds(schema, users)
        schema.add_enum_values("JobType", kinds)
    tables = build_tables(schema, SCHEMA_DEFINES)
    check = bool(os.environ.get("QMPJOBD_CHECK_REPLIES"))
    product = os.path.dirname(str(DEFAULT_SCHEMA))
    users_commands = frozenset(
        name for name in tables.commands
        if (found := schema.lookup(name)) is not None and found.info is not None
        and os.path.dirname(os.path.realpath(found.info.fname)) != product)
    dispatcher = Dispatcher(tables, handlers_in(modules), check_replies=check,
                            user_commands=users_commands)
    daemon = _daemon(config, tables)
    daemon.command_roles = dispatcher.roles
    daemon.transaction_actions = extensions.action_builders(users)
    limits = Limits(**config.limits)
    daemon.jobs.max_jobs = limits.max_jobs
    daemon.graph.max_nodes = limits.max_nodes
    for text in config.blockdevs:
        _add_blockdev(daemon, text)
    return daemon, dispatcher


def _daemon(config: Config, tables: Tables) -> Daemon:
    """The daemon's state, its task store opened (a StartupError naming the state directory or
    the file if that cannot be)."""
    from .context import Daemon
    from .dispatch import StartupError
    from .tasks.errors import StoreError
    from .tasks.registry import TaskLimits

    state_dir = config.state_dir
    if state_dir is not None:
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"--state-dir {state_dir}: cannot create: {exc.strerror}") from None
        if not os.path.isdir(state_dir):
            raise StartupError(f"--state-dir {state_dir}: not a directory")
    try:
        return Daemon(tables, state_dir=state_dir, task_limits=TaskLimits(**config.task_limits))
    except StoreError as exc:
        raise StartupError(f"--state-dir {state_dir}: {exc}") from None


def _add_blockdev(daemon: Daemon, text: str) -> None:
    """A --blockdev option: the node blockdev-add would create, or StartupError."""
    import orjson
    import trio

    from .block.nodes import open_node
    from .dispatch import StartupError
    from .jobs.errors import JobError
    from .qapi.errors import ArgumentError
    from .qapi.keyval import parse
    from .qapi.keyval_convert import convert

    entry = daemon.tables.commands["blockdev-add"]
    options_type = daemon.tables.schema.lookup_type("BlockdevOptions")
    assert options_type is not None
    try:
        if text.lstrip().startswith("{"):
            options = orjson.loads(text)
        else:
            options = convert(parse(text), options_type, daemon.tables.defines)
        checked = entry.check_arguments(options)
        # Start-up comes before the event loop: a short trio run opens the node.
        daemon.graph.add(trio.run(open_node, daemon.graph, checked))
    except orjson.JSONDecodeError as exc:
        raise StartupError(f"--blockdev {text}: {exc}") from None
    except (KeyvalError, ArgumentError, JobError) as exc:
        desc = exc.desc if isinstance(exc, ArgumentError | JobError) else str(exc)
        raise StartupError(f"--blockdev {text}: {desc}") from None


def _greeting(pretty: bool) -> bytes:
    from .qmp.encode import encode, encode_pretty
    from .qmp.greeting import greeting

    message = greeting(QMP_API_VERSION, PACKAGE, ["oob"])
    return encode_pretty(message) if pretty else encode(message)


def main(argv: list[str] | None = None) -> int:
    try:
        passed = systemd.inherited_sockets()
    except systemd.ActivationError as exc:
        print(f"qmpjobd: {exc}", file=sys.stderr)
        return 1
    try:
        config = parse_command_line(sys.argv[1:] if argv is None else argv,
                                     [(name, systemd.socket_path(sock)) for name, sock in passed])
    except UsageError as exc:
        print(f"qmpjobd: {exc}", file=sys.stderr)
        return 2
    try:
        _setup_logging(config)
    except OSError as exc:
        print(f"qmpjobd: --log {config.log_file}: cannot open: {exc.strerror}", file=sys.stderr)
        return 1
    _raise_descriptor_limit()
    ready_pipe = _daemonize() if config.daemonize else None
    bound: list[tuple[socket.socket, MonitorSpec]] = []
    wrote_pidfile = False
    try:
        used = {monitor.passed for monitor in config.monitors}
        for index, (name, sock) in enumerate(passed):
            if index not in used:
                log.warning("the passed socket '%s' (%s) is not a monitor: closed", name,
                            systemd.socket_path(sock))
                sock.close()
        for monitor in config.monitors:
            if monitor.path is None:
                continue
            if monitor.passed is not None:
                bound.append((passed[monitor.passed][1], monitor))
                continue
            try:
                bound.append((bind_unix_socket(monitor.path, monitor.mode), monitor))
            except SocketInUse as exc:
                return _fail(ready_pipe, f"{monitor.origin}: {exc}")
            except OSError as exc:
                return _fail(
                    ready_pipe,
                    f"{monitor.origin}: cannot listen on {monitor.path}: {exc.strerror}",
                )
        if config.pidfile:
            try:
                Path(config.pidfile).write_text(f"{os.getpid()}\n")
            except OSError as exc:
                return _fail(
                    ready_pipe, f"--pidfile {config.pidfile}: cannot write: {exc.strerror}"
                )
            wrote_pidfile = True
        return _serve(config, bound, ready_pipe)
    finally:
        _unbind(bound)
        if wrote_pidfile:
            assert config.pidfile is not None
            Path(config.pidfile).unlink(missing_ok=True)


def _raise_descriptor_limit() -> None:
    """Every client, image and worker takes a descriptor: take all the system allows (the
    soft limit is often 1024, as many as --max-clients by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _unbind(bound: list[tuple[socket.socket, MonitorSpec]]) -> None:
    for _, monitor in bound:
        assert monitor.path is not None
        if monitor.passed is None:  # a passed socket's file is the service manager's
            unlink_socket(monitor.path)


def _serve(
    config: Config, bound: list[tuple[socket.socket, MonitorSpec]], ready_pipe: int | None
) -> int:
    listeners = bound
    policy = config.access_policy
    greeter = EarlyGreeter([(sock, _greeting(m.pretty), m.access) for sock, m in listeners],
                           policy)
    greeter.start()
    try:
        daemon, dispatcher = _build(config)
    except Exception as exc:  # QapiError, StartupError: the schema and handlers don't fit
        greeter.stop()
        return _fail(ready_pipe, str(exc))
    greeted = greeter.stop()
    # A worker thread parsing a large message holds the GIL until the interpreter makes it
    # switch: every 1 ms rather than 5, so the event loop waits less while it does.
    sys.setswitchinterval(0.001)

    import trio

    from .server import Listening, Server, ServerOptions

    def on_ready() -> None:
        paths = [m.path for _, m in listeners]
        if config.default_socket:
            print(paths[0], flush=True)
        log.info("listening on %s", ", ".join(str(p) for p in paths) or "stdio")
        if ready_pipe is not None:
            _detach(ready_pipe)
        systemd.notify("READY=1")

    options = ServerOptions(
        version=QMP_API_VERSION,
        package=PACKAGE,
        listening=[Listening(sock, str(m.path), m.pretty, m.access, owned=m.passed is None)
                   for sock, m in listeners],
        greeted=greeted,
        stdio=[(m.pretty, m.access.role) for m in config.monitors if m.path is None],
        access_policy=policy,
        on_ready=on_ready,
        limits=Limits(**config.limits),
    )
    trio.run(Server(options, daemon, dispatcher).run)
    return 0
def _fail(ready_pipe: int | None, message: str) -> int:
    if ready_pipe is not None:  # the waiting parent reports it
        os.write(ready_pipe, message.encode())
        os.close(ready_pipe)
    else:
        print(f"qmpjobd: {message}", file=sys.stderr)
    return 1


def _daemonize() -> int:
    """Fork; the parent waits until the child is ready (exit 0) or has failed (its message,
    exit 1). The child gets its own session and returns the pipe to report readiness on."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        message = b"".join(chunks).decode(errors="replace")
        if message == "ready":
            os._exit(0)
        os.waitpid(pid, 0)
        print(f"qmpjobd: {message or 'the daemon failed to start'}", file=sys.stderr)
        os._exit(1)
    os.close(read_end)
    os.setsid()
    return write_end


def _detach(ready_pipe: int) -> None:
    """Tell the waiting parent we are ready, and let go of the terminal."""
    os.write(ready_pipe, b"ready")
    os.close(ready_pipe)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
