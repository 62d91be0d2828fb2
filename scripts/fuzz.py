#!/usr/bin/env python3
"""Fuzz qmpjobd's QMP protocol core, in-process and against a live daemon.

    scripts/fuzz.py protocol [-n N] [--time SECONDS] [--seed S] [--engine atheris|random]
    scripts/fuzz.py live     [-n N] [--time SECONDS] [--seed S]
    scripts/fuzz.py record   [--no-qsd]
    scripts/fuzz.py replay   PATH...
    scripts/fuzz.py qcow2    [-n N] [--time SECONDS] [--seed S] [-j JOBS]

protocol  Drives the sans-IO framing (qmpjobd.qmp.framing) and session (qmpjobd.qmp.session)
          in-process.  Each input is fed whole and split at points derived from the input;
          also bytewise (short inputs), through the faithful path only (fast=False), and with
          small limits (so that the limit branches are reachable).  Every run must give the
          same values and errors; nothing may raise; every reply, error and event the session
          writes for it must be one well-formed QMP message in valid ASCII JSON that parses
          back (orjson, strictly) to what was encoded.  The engine is atheris (coverage-guided
          libFuzzer) when it is installed, else a seeded random/mutation fuzzer; both measure
          branch coverage of qmpjobd/qmp/*.py with coverage.py over the whole run.
live      Starts qmpjobd (under coverage.py) on a socket in a temporary directory and sends
          each input on a fresh connection (raw bytes mutated from the corpus, or commands
          shaped by the daemon's own query-qmp-schema with wrong types, huge values, unknown
          keys, lone surrogates), half-closes it and reads every reply until the daemon closes.
          Every line must be valid JSON and a well-formed QMP greeting/reply/error/event; every
          input item gets exactly one reply (ids echoed, in order, when no exec-oob is used);
          no internal error may reach the daemon's log; and after each input a probe
          connection must still get its `query-jobs` answered.  Per-input timeout: --timeout.
replay    Checks the given inputs (files or directories) as protocol mode does, under coverage.py:
          to reproduce a saved failure, or to measure the coverage a corpus reaches.
qcow2     Damaged qcow2 images and backing chains through the driver's open-and-read path,
          in-process (scripts/fuzz_qcow2.py says how they are damaged and what must hold: no
          exception, no input over 1 s, errors naming the node or the file, no write to a file
          that failed to open or was opened read-only).  Failing inputs are saved, with
          why.txt, under WORKDIR/p*/failures.
record    Runs conversations against qemu-storage-daemon and stores the bytes the client sent
          as seeds in tests/fuzz-corpus/qsd-*.bin; writes the hand-written edge cases as
          tests/fuzz-corpus/edge-*.bin.

Reports inputs tried, failures (each failing input saved under WORKDIR/failures with a .txt
saying why) and branch coverage of qmpjobd/qmp/, also as WORKDIR/report.json.  Exit status 0
when nothing failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CORPUS = REPO / "tests" / "fuzz-corpus"
QMP_DIR = REPO / "qmpjobd" / "qmp"
QMP_MODULES = ["framing", "lexer", "tokens", "fastpath", "session", "encode", "errors", "greeting"]
ERROR_CLASSES = frozenset(
    {"GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"}
)
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "qmpjobd-fuzz"

sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))  # json.loads of 1025-deep replies


# =============================================================================================
# Checking what comes out


class Problem(Exception):
    """An invariant does not hold."""


def same(a: object, b: object) -> bool:
    """Equal, type for type (1 is not 1.0, -0.0 is not 0.0, key order counts); iterative, so
    that values nested 1024 deep compare."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if type(x) is dict:
            assert isinstance(y, dict)
            if list(x) != list(y):
                return False
            stack.extend(zip(x.values(), y.values(), strict=True))
        elif type(x) is list:
            assert isinstance(y, list)
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif type(x) is float:
            assert isinstance(y, float)
            if x.hex() != y.hex():
                return False
        elif x != y:
            return False
    return True


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _check_text(value: object) -> None:
    """No lone surrogates anywhere (the stdlib parser lets them through; JSON text that holds
    them does not encode Unicode text)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            item.encode("utf-8")
        elif type(item) is dict:
            for key in item:
                key.encode("utf-8")
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)


def parse_json(text: bytes) -> object:
    """Parse one JSON text strictly, and exactly (integers of any size stay integers).

    orjson is the strict judge (RFC 8259: no NaN/Infinity, no lone surrogates, no trailing
    garbage) except beyond its depth limit of 1024 and for integers beyond a double's range,
    where the stdlib parser (with NaN and Infinity refused and strings checked) stands in.
    The value returned comes from the stdlib parser, which keeps big integers exact where
    orjson would make them floats."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as error:
        # Beyond orjson but valid JSON: nesting deeper than 1024, and integers too big for
        # a double (qmpjobd echoes integers exactly, e.g. an id of 10**400).
        if "depth limit" not in str(error) and "infinity" not in str(error):
            raise Problem(f"invalid JSON ({error}): {text[:200]!r}") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
        _check_text(value)
    except (ValueError, RecursionError) as error:
        raise Problem(f"invalid JSON ({error}): {text[:200]!r}") from None
    return value


def check_shape(message: object, *, greeting: bool = False) -> None:
    """A well-formed QMP message: greeting (only where allowed), reply, error or event."""
    if type(message) is not dict:
        raise Problem(f"message is not an object: {message!r:.200}")
    keys = set(message)
    if "QMP" in message:
        qmp = message["QMP"]
        if not greeting or keys != {"QMP"} or type(qmp) is not dict:
            raise Problem(f"unexpected greeting: {message!r:.200}")
        version = qmp.get("version")
        if not (
            type(version) is dict
            and type(version.get("package")) is str
            and type(version.get("qemu")) is dict
            and all(type(version["qemu"].get(k)) is int for k in ("major", "minor", "micro"))
            and type(qmp.get("capabilities")) is list
        ):
            raise Problem(f"malformed greeting: {message!r:.200}")
        return
    if "event" in message:
        stamp = message.get("timestamp")
        if not (
            keys <= {"event", "data", "timestamp"}
            and type(message["event"]) is str
            and type(stamp) is dict
            and set(stamp) == {"seconds", "microseconds"}
            and all(type(v) is int for v in stamp.values())
            and type(message.get("data", {})) is dict
        ):
            raise Problem(f"malformed event: {message!r:.200}")
        return
    if "return" in message:
        if not keys <= {"return", "id"}:
            raise Problem(f"malformed reply: {message!r:.200}")
        return
    if "error" in message:
        error = message["error"]
        if not (
            keys <= {"error", "id"}
            and type(error) is dict
            and set(error) == {"class", "desc"}
            and error["class"] in ERROR_CLASSES
            and type(error["desc"]) is str
            and error["desc"]
        ):
            raise Problem(f"malformed error: {message!r:.200}")
        if "Traceback" in error["desc"]:
            raise Problem(f"a traceback reached the client: {message!r:.200}")
        return
    raise Problem(f"neither reply, error nor event: {message!r:.200}")


def check_encoded(data: bytes, *, pretty: bool = False, greeting: bool = False) -> object:
    """One message as the session wrote it: ASCII, one line (unless pretty) ending in CRLF,
    valid JSON, well-formed.  Returns the parsed message."""
    if not data.endswith(b"\r\n"):
        raise Problem(f"message does not end with CRLF: {data[-80:]!r}")
    if not data.isascii():
        raise Problem(f"message is not ASCII: {data[:200]!r}")
    if not pretty and (b"\n" in data[:-2] or b"\r" in data[:-2]):
        raise Problem(f"message is not one line: {data[:200]!r}")
    message = parse_json(data)
    check_shape(message, greeting=greeting)
    return message


# =============================================================================================
# Protocol mode: the sans-IO core in-process

# Small limits, so that inputs of a few kilobytes reach the limit branches too.
SMALL_LIMITS = [
    {"max_token_size": 16, "max_token_count": 8, "max_nesting": 2},
    {"max_token_size": 64, "max_token_count": 32, "max_nesting": 4},
    {"max_token_size": 1024, "max_token_count": 256, "max_nesting": 1},
    {"max_token_size": 4096, "max_token_count": 4096, "max_nesting": 16},
]
OOB_COMMANDS = frozenset({"x-oob-command", "query-jobs"})


class AnyCommand(Mapping[str, bool]):
    """The session's command table for fuzzing: every name is a command (so that arbitrary
    input reaches the stand-in dispatcher), and those in OOB_COMMANDS may run out of band."""

    def __getitem__(self, name: str) -> bool:
        return name in OOB_COMMANDS

    def __iter__(self) -> Iterator[str]:
        return iter(OOB_COMMANDS)

    def __len__(self) -> int:
        return len(OOB_COMMANDS)


class Hang(Exception):
    """The per-input CPU time limit passed."""


class ProtocolChecker:
    """Runs one input through framing and session every way, and says what went wrong."""

    def __init__(self) -> None:
        from qmpjobd.qmp import framing, session
        from qmpjobd.qmp.errors import QmpError

        self.framing = framing
        self.session = session
        self.QmpError = QmpError

    def pieces(self, data: bytes, rng: random.Random) -> list[bytes | bytearray | memoryview]:
        """DATA cut at input-derived points; feed() also takes bytearrays and memoryviews."""
        if not data:
            return [data]
        count = rng.randrange(1, min(len(data), 16) + 1)
        cuts = sorted({rng.randrange(0, len(data) + 1) for _ in range(count)})
        bounds = [0, *cuts, len(data)]
        kind = rng.choice([bytes, bytes, bytes, bytearray, memoryview])
        return [kind(data[a:b]) for a, b in itertools.pairwise(bounds)]

    def feed(self, pieces: list[bytes | bytearray | memoryview], **options: Any) -> list[object]:
        splitter = self.framing.JsonSplitter(**options)
        out: list[object] = []
        for piece in pieces:
            out += splitter.feed(piece)  # type: ignore[arg-type]  # (any buffer)
        if splitter.eof():
            raise Problem("eof() returned values")
        if splitter.buffered:
            raise Problem("eof() left bytes buffered")
        return out

    def compare(self, what: str, expected: list[object], got: list[object]) -> None:
        if not same(expected, got):
            raise Problem(
                f"{what} differs from the whole input fed at once:\n"
                f"  whole: {_short(expected)}\n  {what}: {_short(got)}"
            )

    def check(self, data: bytes) -> None:
        """Raises Problem (or lets any other exception escape) if something is wrong."""
        rng = random.Random(zlib.crc32(data) ^ len(data) << 32)
        whole = self.feed([data])
        for item in whole:
            if type(item) is self.framing.FramingError and (
                type(item.desc) is not str or not item.desc
            ):
                raise Problem(f"malformed framing error {item!r}")
        self.compare("split", whole, self.feed(self.pieces(data, rng)))
        self.compare("faithful path", whole, self.feed([data], fast=False))
        if len(data) <= 64 and rng.random() < 0.25:
            self.compare("bytewise", whole, self.feed([data[i : i + 1] for i in range(len(data))]))
        if len(data) <= 128 or rng.random() < 0.25:
            limits = rng.choice(SMALL_LIMITS)
            small = self.feed([data], **limits)
            self.compare(f"split with {limits}", small, self.feed(self.pieces(data, rng), **limits))
            if rng.random() < 0.5:
                faithful = self.feed([data], fast=False, **limits)
                self.compare(f"faithful with {limits}", small, faithful)
        self.converse(whole, pretty=rng.random() < 0.2, offer_oob=rng.random() < 0.9)

    def converse(self, items: list[object], *, pretty: bool, offer_oob: bool) -> None:
        """Run the items through a session with a stand-in dispatcher that echoes what it got,
        so that every parsed value is also encoded (as a reply, an error text and an event)."""
        session_mod = self.session
        s = session_mod.Session(
            version=(7, 2, 0), package="fuzz \u00e9", offer_oob=offer_oob, pretty=pretty,
            commands=AnyCommand(),
        )
        check_encoded(s.greeting(), pretty=pretty, greeting=True)
        QmpError = self.QmpError
        for item in items:
            s.queues(item)
            request = s.receive(item)
            expected_id = item.get("id", session_mod.NO_ID) if type(item) is dict else None
            if isinstance(request, bytes):
                message = check_encoded(request, pretty=pretty)
                assert isinstance(message, dict)
                if "error" not in message:
                    raise Problem(f"a rejected input got no error: {message!r:.200}")
                self._check_id(message, item, expected_id)
                continue
            command, arguments = request.command, request.arguments
            if type(command) is not str or type(arguments) is not dict:
                raise Problem(f"malformed request {request!r:.200}")
            expected: object = None
            try:
                if command == "qmp_capabilities":
                    enable = arguments.get("enable", [])
                    if set(arguments) - {"enable"} or type(enable) is not list or not all(
                        type(c) is str for c in enable
                    ):
                        raise QmpError("GenericError", "Invalid parameter type")
                    s.negotiate(enable)
                    expected = {}
                elif zlib.crc32(command.encode("utf-8", "surrogatepass")) & 1:
                    raise QmpError("GenericError", command)  # arbitrary text in an error
                else:
                    expected = {"command": command, "arguments": arguments}
                    event = s.encode({"event": command, "data": arguments,
                                      "timestamp": {"seconds": 1, "microseconds": 2}})
                    parsed = check_encoded(event, pretty=pretty)
                    assert isinstance(parsed, dict)
                    if not same(parsed.get("data"), arguments):
                        raise Problem(f"event data does not round-trip: {_short([arguments])}")
                out = s.reply(request, expected)
            except QmpError as error:
                out = s.error_reply(request.id, error)
                expected = None
            message = check_encoded(out, pretty=pretty)
            assert isinstance(message, dict)
            self._check_id(message, item, expected_id)
            if expected is not None and not same(message.get("return"), expected):
                raise Problem(
                    f"reply does not round-trip:\n  sent {_short([expected])}\n"
                    f"  got  {_short([message.get('return')])}"
                )

    def _check_id(self, message: dict[str, Any], item: object, expected_id: object) -> None:
        if type(item) is not dict or expected_id is self.session.NO_ID:
            if "id" in message:
                raise Problem(f"reply has an id the input did not have: {message!r:.200}")
        elif "id" not in message or not same(message["id"], expected_id):
            raise Problem(f"reply id is not the input's: {message!r:.200}")


def _short(values: list[object]) -> str:
    try:
        text = repr(values)
    except (RecursionError, ValueError):
        text = f"<{len(values)} values, too deep or too big to show>"
    return text if len(text) < 600 else text[:600] + "..."


# =============================================================================================
# Bookkeeping shared by the modes


@dataclass
class Stats:
    mode: str
    engine: str
    seed: int
    workdir: Path
    started: float = field(default_factory=time.monotonic)
    inputs: int = 0
    skipped: int = 0
    failures: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)
    last_progress: float = field(default_factory=time.monotonic)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def failures_dir(self) -> Path:
        return self.workdir / "failures"

    def fail(self, kind: str, data: bytes, why: str) -> None:
        self.failures += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        digest = hashlib.sha1(data).hexdigest()[:16]
        name = f"{self.mode}-{kind}-{digest}"
        if len(self.saved) < 1000 and name not in self.saved:
            try:
                self.failures_dir.mkdir(parents=True, exist_ok=True)
                (self.failures_dir / f"{name}.bin").write_bytes(data)
                (self.failures_dir / f"{name}.txt").write_text(why + "\n")
            except OSError as error:  # (a full disk must not end the run)
                print(f"cannot save {name}: {error}", file=sys.stderr, flush=True)
            self.saved.append(name)
        if self.failures <= 20:
            print(f"FAILURE {kind} ({name}): {why[:2000]}", file=sys.stderr, flush=True)

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= 30:
            self.last_progress = now
            elapsed = now - self.started
            print(
                f"[{self.mode}] {self.inputs} inputs, {self.failures} failures, "
                f"{self.skipped} skipped, {elapsed:.0f} s, "
                f"{self.inputs / max(elapsed, 1e-9):.0f}/s",
                file=sys.stderr, flush=True,
            )

    def report(self, coverage: dict[str, Any] | None) -> int:
        elapsed = time.monotonic() - self.started
        result: dict[str, Any] = {
            "mode": self.mode,
            "engine": self.engine,
            "seed": self.seed,
            "inputs": self.inputs,
            "skipped": self.skipped,
            "failures": self.failures,
            "failure_kinds": self.kinds,
            "failures_dir": str(self.failures_dir) if self.failures else None,
            "seconds": round(elapsed, 1),
            "coverage": coverage,
            **self.extra,
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [
            f"mode: {self.mode} (engine: {self.engine}, seed {self.seed})",
            f"inputs tried: {self.inputs}"
            + (f" (+{self.skipped} skipped)" if self.skipped else ""),
            f"failures: {self.failures}" + (f" {self.kinds} saved in {self.failures_dir}"
                                            if self.failures else ""),
            f"time: {elapsed:.1f} s ({self.inputs / max(elapsed, 1e-9):.0f} inputs/s)",
        ]
        for key, value in self.extra.items():
            lines.append(f"{key}: {value}")
        if coverage is not None:
            lines.append(
                f"branch coverage of qmpjobd/qmp/: {coverage['branch_percent']:.2f}% "
                f"({coverage['covered_branches']}/{coverage['num_branches']} branches); "
                f"statements+branches {coverage['combined_percent']:.2f}%"
            )
            for name, info in coverage["files"].items():
                lines.append(
                    f"  {name}: {info['covered_branches']}/{info['num_branches']} branches, "
                    f"missing {info['missing_branches'] or '-'}"
                )
        lines.append(f"report: {self.workdir / 'report.json'}")
        print("\n".join(lines), flush=True)
        return 1 if self.failures else 0


def start_coverage(data_file: Path | None = None) -> Any:
    import coverage

    cov = coverage.Coverage(
        branch=True, source=[str(QMP_DIR)], data_file=str(data_file) if data_file else None,
    )
    cov.start()
    return cov


def coverage_summary(cov: Any, workdir: Path) -> dict[str, Any]:
    """Branch coverage of qmpjobd/qmp/*.py from a stopped (or loaded) coverage.Coverage."""
    out = workdir / "coverage.json"
    include = [str(QMP_DIR / f"{name}.py") for name in QMP_MODULES]
    cov.json_report(outfile=str(out), include=include, show_contexts=False)
    data = json.loads(out.read_text())
    files: dict[str, Any] = {}
    branches = covered = 0
    for path, info in sorted(data["files"].items()):
        summary = info["summary"]
        branches += summary["num_branches"]
        covered += summary["covered_branches"]
        files[Path(path).name] = {
            "num_branches": summary["num_branches"],
            "covered_branches": summary["covered_branches"],
            "missing_branches": [f"{a}->{b}" for a, b in info.get("missing_branches", [])],
            "missing_lines": info.get("missing_lines", []),
        }
    totals = data["totals"]
    return {
        "branch_percent": 100.0 * covered / branches if branches else 100.0,
        "num_branches": branches,
        "covered_branches": covered,
        "combined_percent": totals["percent_covered"],
        "files": files,
    }


def seed_files(*dirs: Path) -> list[bytes]:
    seeds: list[bytes] = []
    for directory in dirs:
        if directory.is_dir():
            seeds += [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]
    return seeds or [b'{"execute": "qmp_capabilities"}\n']


# =============================================================================================
# Mutation (the random engine and live mode)

TOKENS = [
    b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"\\ud800", b"\\udc00",
    b"\\ud83d\\ude00", b"\\u0000", b"\\uFFFF", b"\\ufdd0", b"\xc0\x80", b"\xed\xa0\x80",
    b"\xef\xbf\xbf", b"\xf4\x90\x80\x80", b"\xff", b"\xfe", b"\x1b", b"\x00", b"\x7f", b"\t",
    b"\r\n", b"true", b"false", b"null", b"tru", b"nul", b"1e400", b"-1e400", b"0e5", b"-0",
    b"0.5e-400", b"18446744073709551616", b"9" * 30, b"1.", b"01", b"-", b"1e+", b'"id"',
    b'"execute"', b'"exec-oob"', b'"arguments"', b'"qmp_capabilities"', b'"enable"', b'["oob"]',
    b'"query-jobs"', b'"query-version"', b'"job-pause"', b'"blockdev-add"', b'"node-name"',
    b'"driver"', b'"null-co"', b'"size"', b'"job-id"', b'"device"', b'"target"', b'"speed"',
    b'"blockdev-backup"', b'"sync"', b'"full"', b'"src"', b'"dst"',
]


def mutate(data: bytes, rng: random.Random, seeds: list[bytes], max_len: int) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(11)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = bytes([rng.randrange(256)])
        elif op in (3, 4):
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 5 and buf:
            end = min(len(buf), pos + rng.randrange(1, 64))
            del buf[pos:end]
        elif op == 6 and buf:
            start = rng.randrange(len(buf))
            chunk = buf[start : start + rng.randrange(1, 64)]
            buf[pos:pos] = chunk * rng.randrange(1, 4)
        elif op == 7:
            other = rng.choice(seeds)
            start = rng.randrange(len(other) + 1)
            buf[pos:pos] = other[start : start + rng.randrange(1, 256)]
        elif op == 8:
            del buf[pos:]
        elif op == 9:
            depth = rng.choice([2, 8, 255, 256, 1023, 1024, 1025])
            opener = rng.choice([b"[", b"{\"a\":", b"[{\"k\":"])
            buf[pos:pos] = opener * depth
        else:
            buf[pos:pos] = str(rng.choice([2**63, -(2**63) - 1, 2**64, 10**300])).encode()
    return bytes(buf[:max_len])


# =============================================================================================
# protocol mode


def run_protocol(args: argparse.Namespace) -> int:
    engine = args.engine
    if engine == "auto":
        try:
            import atheris

            del atheris  # only: is it installed?
        except ImportError:
            print("atheris is not installed: using the random/mutation fuzzer", file=sys.stderr)
            engine = "random"
        else:
            engine = "atheris"
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    stats = Stats("protocol", engine, args.seed, workdir)
    limit = args.inputs
    deadline = time.monotonic() + args.time if args.time else float("inf")
    # The random engine measures coverage over the run itself.  Under atheris, coverage.py's
    # tracer would cost three times the run: libFuzzer keeps every input that reached a new
    # edge of the instrumented modules in WORKDIR/corpus, so replaying that corpus (and the
    # seeds and failures) under coverage.py at the end reaches exactly the branches the run
    # reached, in a fresh process with uninstrumented code.
    cov = start_coverage() if engine == "random" and not args.no_coverage else None
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["qmpjobd.qmp"]):
            for name in QMP_MODULES:
                __import__(f"qmpjobd.qmp.{name}")
    checker = ProtocolChecker()
    timeout = args.timeout

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang

    signal.signal(signal.SIGVTALRM, on_alarm)

    def one(data: bytes) -> None:
        stats.inputs += 1
        signal.setitimer(signal.ITIMER_VIRTUAL, timeout)
        try:
            checker.check(data)
        except Problem as problem:
            stats.fail("invariant", data, str(problem))
        except Hang:
            stats.fail("hang", data, f"more than {timeout} s of CPU time")
        except Exception:
            stats.fail("exception", data, traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)

    def finish() -> int:
        if cov is not None:
            cov.stop()
            return stats.report(coverage_summary(cov, workdir))
        paths = [p for p in (workdir / "corpus", CORPUS, *args.paths) if p.exists()]
        if stats.failures_dir.is_dir():
            paths.append(stats.failures_dir)
        replay = workdir / "replay"
        subprocess.run(
            [sys.executable, __file__, "replay", "--workdir", str(replay), *map(str, paths)],
            check=False, stdout=subprocess.DEVNULL,
        )
        try:
            coverage = json.loads((replay / "report.json").read_text())["coverage"]
        except (OSError, ValueError, KeyError):
            coverage = None
            stats.fail("replay", b"", f"replaying the corpus failed: see {replay}")
        stats.extra["coverage measured by"] = f"replaying the corpus under coverage.py ({replay})"
        return stats.report(coverage)

    if engine == "atheris":
        import atheris

        corpus = workdir / "corpus"
        corpus.mkdir(exist_ok=True)
        dictionary = workdir / "qmp.dict"
        dictionary.write_text(
            "".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in TOKENS)
        )

        def test_one_input(data: bytes) -> None:
            one(data)
            stats.progress()
            if stats.inputs >= limit or time.monotonic() >= deadline:
                status = finish()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)

        libfuzzer = [
            sys.argv[0], f"-seed={args.seed or 1}", f"-max_len={args.max_len}",
            f"-timeout={max(60, int(timeout) * 4)}", f"-artifact_prefix={stats.failures_dir}/",
            f"-dict={dictionary}", "-print_final_stats=0", "-reload=0",
            str(corpus), str(CORPUS),
        ]
        stats.failures_dir.mkdir(parents=True, exist_ok=True)
        atheris.Setup(libfuzzer, test_one_input)
        atheris.Fuzz()
        return finish()  # not reached: libFuzzer runs until test_one_input exits

    # The fallback: seeded random mutation of the corpus, plus pure random bytes.
    rng = random.Random(args.seed)
    # Seeds: the corpus, and PATHS (say, a coverage-guided run's corpus/ to mutate further).
    seeds = [seed[: args.max_len] for seed in seed_files(CORPUS, *args.paths)]
    for seed in seeds:
        if stats.inputs >= limit:
            break
        one(seed)
    # SIGTERM or SIGINT ends the run after the current input, with its report.
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop.append(number))
    while stats.inputs < limit and time.monotonic() < deadline and not stop:
        if rng.random() < 0.05:
            data = rng.randbytes(rng.randrange(0, 64))
        else:
            data = mutate(rng.choice(seeds), rng, seeds, args.max_len)
        one(data)
        stats.progress()
    return finish()


# =============================================================================================
# live mode


class Daemon:
    """qmpjobd under coverage.py on a socket in a temporary directory."""

    def __init__(self, root: Path, coverage_data: Path, *, measure: bool) -> None:
        self.root = root
        self.run = root / "run"
        self.cwd = root / "cwd"  # the daemon's working directory: relative file names land here
        self.run.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            with open(self.cwd / f"img{i}", "wb") as f:
                f.truncate(1 << 20)
        self.socket_path = self.run / "q.sock"
        self.log_path = self.run / "daemon.log"
        self.coverage_data = coverage_data
        self.measure = measure
        self.pid = 0
        self.log_offset = 0
        self.starts = 0

    def start(self) -> None:
        pidfile = self.run / "q.pid"
        python = [sys.executable]
        if self.measure:
            rc = self.run / "coveragerc"
            rc.write_text(
                f"[run]\nbranch = True\nsource = {QMP_DIR}\nparallel = True\n"
                f"data_file = {self.coverage_data}\n"
            )
            python += ["-m", "coverage", "run", f"--rcfile={rc}"]
        argv = [
            *python, "-m", "qmpjobd",
            "--chardev", f"socket,id=m0,path={self.socket_path},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--blockdev", "driver=null-co,node-name=src,size=4194304,read-zeroes=on",
            "--blockdev", "driver=null-co,node-name=dst,size=4194304,read-zeroes=on",
            "--blockdev", "driver=file,node-name=f0,filename=img0",
            "--pidfile", str(pidfile), "--daemonize", "--log", str(self.log_path),
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO), QMPJOBD_CHECK_REPLIES="1")
        subprocess.run(argv, check=True, timeout=60, env=env, cwd=self.cwd)
        self.pid = int(pidfile.read_text())
        self.starts += 1

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def new_log(self) -> str:
        """What the daemon logged since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read()
        except FileNotFoundError:
            return ""
        self.log_offset += len(text)
        return text.decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then wait (on a pidfd: it is not our child) until it has exited."""
        if not self.pid:
            return
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            ready, _, _ = select.select([pidfd], [], [], 60)
            if not ready:
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(pidfd)


class Timeout(Exception):
    pass


class LineReader:
    """CRLF-terminated messages from a socket, with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = False

    def lines(self, deadline: float) -> Iterator[bytes]:
        """Complete lines as they arrive, until the peer closes (the rest is in self.buf)."""
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
                yield line
                continue
            if self.closed:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise Timeout from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.buf += chunk


# What live mode never sends: quit ends the daemon; a path with a slash could name a file
# outside the daemon's scratch directory (relative names stay in it); and images that take real
# disk space (preallocation, or a size beyond MAX_SIZE that a job would then fill) could fill
# the disk (a blockdev-create of a few TiB with preallocation=full once did).
UNSAFE_COMMANDS = frozenset({"quit"})
MAX_SIZE = 64 << 20


def unsafe(items: list[object]) -> str | None:
    stack: list[object] = list(items)
    top = {id(item) for item in items}
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if id(item) in top:
                for key in ("execute", "exec-oob"):
                    if type(item.get(key)) is str and item[key] in UNSAFE_COMMANDS:
                        return f"runs {item[key]}"
            for key, value in item.items():
                if "/" in key:
                    return "a key holds a slash"
                if key == "preallocation" and value != "off":
                    return "preallocates an image"
                if key == "size" and type(value) is int and value > MAX_SIZE:
                    return "a big image"
                stack.append(value)
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is str and ("/" in item or item.startswith("..")):
            return "a string holds a path"
    return None


class SchemaShaper:
    """Commands shaped by the daemon's query-qmp-schema reply, with some members made wrong."""

    WRONG: ClassVar[list[object]] = [  # values of the wrong type, or out of range
        None, True, 0, -1, 1.5, "", "x", [], {}, [1], {"a": 1}, 2**63, -(2**63) - 1, 2**64,
        10**400, "\ud800", "\udfff", "\ufdd0", "\U0010ffff", "A" * 70000, "\x00\x1b",
        ["src"] * 100,
    ]
    STRINGS: ClassVar[list[str]] = [
        "src", "dst", "f0", "j0", "j1", "n0", "n1", "img0", "img1", "full", "top", "none",
        "incremental", "null-co", "file", "raw", "x" * 300, "\u00e9\u4e2d",
    ]
    INTS: ClassVar[list[int]] = [
        0, 1, -1, 512, 65536, 262144, 4194304, 2**31, 2**63 - 1, -(2**63), 2**64 - 1,
    ]

    def __init__(self, schema: list[dict[str, Any]], rng: random.Random) -> None:
        self.types = {entry["name"]: entry for entry in schema}
        self.commands = [
            entry for entry in schema
            if entry["meta-type"] == "command" and entry["name"] not in UNSAFE_COMMANDS
        ]
        self.rng = rng

    def deep(self) -> object:
        value: object = "bottom"
        for _ in range(self.rng.choice([10, 100, 250, 600])):
            value = [value] if self.rng.random() < 0.5 else {"a": value}
        return value

    def value(self, name: str, depth: int = 0) -> object:
        rng = self.rng
        if rng.random() < 0.06 or depth > 6:
            return self.deep() if rng.random() < 0.1 else rng.choice(self.WRONG)
        entry = self.types.get(name, {"meta-type": "builtin", "json-type": "value"})
        meta = entry["meta-type"]
        if meta == "builtin":
            kind = entry["json-type"]
            if kind == "string":
                if rng.random() < 0.1:
                    return "".join(chr(rng.randrange(1, 0x11000)) for _ in range(rng.randrange(8)))
                return rng.choice(self.STRINGS)
            if kind == "int":
                return rng.choice(self.INTS) if rng.random() < 0.8 else rng.randrange(-999, 999)
            if kind == "number":
                return rng.choice([0.5, 1e300, -0.0, 3])
            if kind == "boolean":
                return rng.random() < 0.5
            if kind == "null":
                return None
            return rng.choice([*self.WRONG[:12], self.STRINGS[0]])
        if meta == "enum":
            return rng.choice(entry["values"]) if rng.random() < 0.95 else "sideways"
        if meta == "array":
            return [self.value(entry["element-type"], depth + 1)
                    for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        if meta == "alternate":
            return self.value(rng.choice(entry["members"])["type"], depth + 1)
        if meta == "object":
            return self.members(entry, depth)
        return rng.choice(self.WRONG)

    def members(self, entry: dict[str, Any], depth: int) -> dict[str, object]:
        rng = self.rng
        out: dict[str, object] = {}
        for member in entry.get("members", []):
            optional = "default" in member
            if (optional and rng.random() < 0.5) or (not optional and rng.random() < 0.05):
                continue
            out[member["name"]] = self.value(member["type"], depth + 1)
        tag = entry.get("tag")
        if tag is not None and tag in out:
            for variant in entry.get("variants", []):
                if variant["case"] == out[tag]:
                    variant_entry = self.types.get(variant["type"], {})
                    out.update(self.members(variant_entry, depth + 1))
        if rng.random() < 0.05:
            out[rng.choice(["extra", "node-name", "id", "ID"])] = rng.choice(self.WRONG[:10])
        return out

    def message(self) -> bytes:
        rng = self.rng
        command = rng.choice(self.commands)
        arg_type = self.types.get(command["arg-type"], {"meta-type": "object", "members": []})
        message: dict[str, object] = {}
        message["exec-oob" if rng.random() < 0.05 else "execute"] = command["name"]
        if arg_type.get("members") or rng.random() < 0.3:
            message["arguments"] = (
                self.members(arg_type, 0) if rng.random() < 0.95 else rng.choice(self.WRONG)
            )
        raw_id = None
        if rng.random() < 0.5:
            message["id"] = rng.choice([1, "a", None, [1, {"b": 2}], 2**70, -0.0, "\ud800x"])
            if rng.random() < 0.1:
                raw_id = rng.choice([b"1e400", b"-1e400", b"1" + b"0" * 400, b"0.1e-400"])
                message["id"] = "@RAW@"
        text = json.dumps(message, ensure_ascii=rng.random() < 0.7).encode("utf-8", "surrogatepass")
        if raw_id is not None:
            text = text.replace(b'"@RAW@"', raw_id)
        return text + rng.choice([b"\n", b"\r\n", b"", b" "])


class LiveFuzzer:
    def __init__(self, args: argparse.Namespace, stats: Stats, root: Path) -> None:
        from qmpjobd.qmp.framing import JsonSplitter

        self.JsonSplitter = JsonSplitter
        self.args = args
        self.stats = stats
        self.daemon = Daemon(root, args.workdir / ".coverage.live", measure=not args.no_coverage)
        self.probe: socket.socket | None = None
        self.probe_reader: LineReader | None = None
        self.probe_id = 0
        self.timeout: float = args.timeout

    def connect(self) -> tuple[socket.socket, LineReader]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.daemon.socket_path))
        return sock, LineReader(sock)

    def open_probe(self) -> None:
        self.probe, self.probe_reader = self.connect()
        deadline = time.monotonic() + self.timeout
        greeting = next(self.probe_reader.lines(deadline))
        check_encoded(greeting, greeting=True)
        self.probe.sendall(b'{"execute": "qmp_capabilities"}\n')
        self.probe_call(b"")  # answered by the qmp_capabilities above

    def probe_call(self, command: bytes) -> object:
        """Send a command on the probe connection; its reply's `return` (events skipped)."""
        assert self.probe is not None and self.probe_reader is not None
        self.probe_id += 1
        if command:
            self.probe.sendall(command.replace(b"@ID@", str(self.probe_id).encode()))
        deadline = time.monotonic() + self.timeout
        for line in self.probe_reader.lines(deadline):
            message = check_encoded(line)
            assert isinstance(message, dict)
            if "event" in message:
                continue
            if "error" in message:
                raise Problem(f"probe failed: {message!r:.300}")
            if not command or message.get("id") == self.probe_id:
                return message["return"]
        raise Problem("the daemon closed the probe connection")

    def fetch_schema(self) -> list[dict[str, Any]]:
        schema = self.probe_call(b'{"execute": "query-qmp-schema", "id": @ID@}\n')
        assert isinstance(schema, list)
        return schema

    def restart(self) -> None:
        self.close_probe()
        self.daemon.stop()
        self.daemon.start()
        self.open_probe()

    def close_probe(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def send_one(self, payload: bytes) -> None:
        """One input on a fresh connection; raises Problem, Timeout or OSError."""
        items = self.JsonSplitter().feed(payload)
        sock, reader = self.connect()
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.timeout
            replies: list[dict[str, Any]] = []
            first = True
            for line in reader.lines(deadline):
                message = check_encoded(line, greeting=first)
                assert isinstance(message, dict)
                first = False
                if "return" in message or "error" in message:
                    replies.append(message)
            if reader.buf:
                raise Problem(f"the daemon closed in the middle of a message: {reader.buf[:200]!r}")
            if first:
                raise Problem("no greeting")
        finally:
            sock.close()
        if len(replies) != len(items):
            raise Problem(f"{len(items)} messages sent, {len(replies)} replies received")
        if any(type(item) is dict and "exec-oob" in item for item in items):
            return  # out-of-band replies may overtake: no order to check
        for item, reply in zip(items, replies, strict=True):
            has_id = type(item) is dict and "id" in item
            if has_id != ("id" in reply):
                raise Problem(f"id not echoed as sent: {_short([item])} -> {reply!r:.300}")
            if has_id:
                assert isinstance(item, dict)
                sent = item["id"]
                back = reply["id"]
                if not (same(sent, back) or _same_number(sent, back)):
                    raise Problem(f"id changed: {_short([sent])} -> {back!r:.300}")

    def run(self) -> None:
        args, stats = self.args, self.stats
        rng = random.Random(args.seed)
        self.daemon.start()
        try:
            self.open_probe()
            shaper = SchemaShaper(self.fetch_schema(), rng)
            seeds = seed_files(CORPUS, args.workdir / "corpus")
            deadline = time.monotonic() + args.time if args.time else float("inf")
            prefixes = [b"", b'{"execute": "qmp_capabilities"}\n',
                        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n']
            index = 0
            while stats.inputs < args.inputs and time.monotonic() < deadline:
                choice = rng.random()
                if index < len(seeds):
                    payload = seeds[index]
                    index += 1
                elif choice < 0.45:
                    payload = rng.choice(prefixes[1:]) + b"".join(
                        shaper.message() for _ in range(rng.randrange(1, 4))
                    )
                else:
                    payload = mutate(rng.choice(seeds), rng, seeds, args.max_len)
                    if rng.random() < 0.6:
                        payload = rng.choice(prefixes) + payload
                reason = unsafe(self.JsonSplitter().feed(payload))
                if reason is not None:
                    stats.skipped += 1
                    continue
                stats.inputs += 1
                self.one(payload)
                stats.progress()
            stats.extra["daemon restarts"] = self.daemon.starts - 1
        finally:
            self.close_probe()
            self.daemon.stop()
            log = self.daemon.new_log()
            if _internal_error(log):
                stats.fail("daemon-log", b"", f"the daemon logged at shutdown:\n{log[-3000:]}")

    def one(self, payload: bytes) -> None:
        stats = self.stats
        try:
            self.send_one(payload)
        except Problem as problem:
            stats.fail("malformed", payload, str(problem))
        except Timeout:
            stats.fail("hang", payload, f"no end of replies within {self.timeout} s")
        except OSError as error:
            stats.fail("connection", payload, f"{type(error).__name__}: {error}")
        # The daemon must still be alive, and answer.
        try:
            if not self.daemon.alive():
                raise Problem("the daemon died")
            self.probe_call(b'{"execute": "query-jobs", "id": @ID@}\n')
        except (Problem, Timeout, OSError) as error:
            why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            stats.fail("probe", payload, f"after this input the probe failed: {why}")
            self.restart()
        log = self.daemon.new_log()
        if _internal_error(log):
            stats.fail("daemon-log", payload, f"the daemon logged:\n{log[-3000:]}")


def _same_number(a: object, b: object) -> bool:
    return type(a) in (int, float) and type(b) in (int, float) and a == b


_LOG_ERROR = re.compile(r" (ERROR|CRITICAL) |Traceback")


def _internal_error(log: str) -> bool:
    return bool(_LOG_ERROR.search(log))


def run_replay(args: argparse.Namespace) -> int:
    """Check the given inputs (files, or directories of them) under coverage.py."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    stats = Stats("replay", "replay", 0, args.workdir)
    cov = start_coverage()
    checker = ProtocolChecker()
    for path in args.paths:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".txt":
                continue  # a failure's explanation
            data = file.read_bytes()
            stats.inputs += 1
            try:
                checker.check(data)
            except Problem as problem:
                stats.fail("invariant", data, f"{file}: {problem}")
            except Exception:
                stats.fail("exception", data, f"{file}: {traceback.format_exc()}")
    cov.stop()
    return stats.report(coverage_summary(cov, args.workdir))


def run_live(args: argparse.Namespace) -> int:
    args.workdir.mkdir(parents=True, exist_ok=True)
    stats = Stats("live", "random+schema", args.seed, args.workdir)
    for old in args.workdir.glob(".coverage.live*"):
        old.unlink()
    root = Path(tempfile.mkdtemp(prefix="qmpjobd-live-"))
    try:
        fuzzer = LiveFuzzer(args, stats, root)
        fuzzer.run()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    coverage: dict[str, Any] | None = None
    if not args.no_coverage:
        import coverage as coverage_mod

        cov = coverage_mod.Coverage(branch=True, source=[str(QMP_DIR)],
                                    data_file=str(args.workdir / ".coverage.live"))
        cov.combine(data_paths=[str(args.workdir)], keep=False)
        cov.load()
        coverage = coverage_summary(cov, args.workdir)
    return stats.report(coverage)


# =============================================================================================
# record mode: conversations with qemu-storage-daemon, and the hand-written edge cases


@dataclass
class Step:
    send: bytes
    until_event: tuple[str, str] | None = None  # (event, status) to wait for after the replies


def _steps(*items: bytes | Step) -> list[Step]:
    return [item if isinstance(item, Step) else Step(item) for item in items]


CAPS = b'{"execute": "qmp_capabilities"}\n'
CAPS_OOB = b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n'
CONCLUDED = ("JOB_STATUS_CHANGE", "concluded")
READY = ("JOB_STATUS_CHANGE", "ready")

CONVERSATIONS: dict[str, list[Step]] = {
    "basic": _steps(
        CAPS,
        b'{"execute": "query-version", "id": 1}\n',
        b'{"execute": "query-jobs", "id": "two"}\r\n',
        b'{"execute": "query-block-jobs"}\n',
        b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}\n',
        b'{"execute": "query-commands", "id": [3]}\n',
        b'{"execute": "no-such-command", "id": {"x": null}}\n',
        b'{"execute": "job-pause", "arguments": {}}\n',
        b'{"execute": "job-pause", "arguments": {"id": 5}}\n',
        b'{"execute": "job-pause", "arguments": {"id": "j", "extra": 1}}\n',
    ),
    "negotiation": _steps(
        b'{"execute": "query-jobs", "id": 0}\n',
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}\n',
        b'{"exec-oob": "qmp_capabilities"}\n',
        CAPS,
        CAPS,
        b'{"exec-oob": "query-jobs", "id": 1}\n',
        b'{"execute": "query-jobs", "id": 2, "control": 1}\n',
    ),
    "oob": _steps(
        CAPS_OOB,
        b'{"exec-oob": "query-jobs", "id": "o1"}\n',
        b'{"exec-oob": "query-version", "id": "o2"}\n',
        b'{"execute": "query-jobs", "exec-oob": "query-jobs", "id": 3}\n',
        b'{"exec-oob": 1}\n{"exec-oob": "x-no-such", "id": 4}\n',
        b'{"execute": "query-version", "id": 5}{"exec-oob": "query-jobs", "id": 6}\n',
    ),
    "framing": _steps(
        CAPS,
        b'{"execute": "query-jobs", "id": 1}{"execute": "query-jobs", "id": 2}\n',
        b'{\n  "execute":\r\n\t"query-jobs",\n\n  "id"\n:\n3\n}\n',
        b"{'execute': 'query-jobs', 'id': 'single\\'quoted'}\n",
        b'"just a string"\n42 \ntrue\n[1, 2]\n',
        b"}\n",
        b"]\n",
        b"{]\n",
        b'{"execute": tru}\n',
        b'{"execute" "query-jobs"}\n',
        b'{"execute": "query-jobs",, "id": 4}\n',
        b'{"execute": "query-jobs" @}\n',
        b'{"execute": "query-jobs", "id": "a\x01b"}\n',
        b'{"execute": "query-jobs", "id": 5, "id": 6}\n',
        b'{"execute": "query-jobs", "id": "\\u00e9\\ud83d\\ude00\\u0000"}\n',
        b'{"execute": "query-jobs", "id": "\\ud800"}\n',
        b'{"execute": "query-jobs", "id": "\\udc00\\u12"}\n',
        b'{"execute": "query-jobs", "id": "\xc3\xa9\xc0\x80"}\n',
        b'{"execute": "query-jobs", "id": "\xff"}\n',
        b'{"execute": "query-jobs", "id": 18446744073709551616}\n',
        b'{"execute": "query-jobs", "id": -9223372036854775809}\n',
        b'{"execute": "query-jobs", "id": 1.0e2}\n',
        b'{"execute": "query-jobs", "id": 0e5}\n',
        b'{"execute": "query-jobs", "id": [[[[[[[[[]]]]]]]]]}\n',
        b'{"execute": "query-jobs", "id": {"a": {"b": {"c": [null, true, false]}}}}\n',
        b'{"execute": "query-jobs", \x1b "id": 7}\n',
        b'{"execute": "query-jobs", "id": 8}\n',
        b"\n\n   \t\n",
        b'{"execute": "query-jobs", "id": "\\/\\b\\f\\n\\r\\t\\"\\\\"}\n',
        b'{"execute": "query-jobs", "id": "\\x"}\n',
    ),
    "envelope": _steps(
        CAPS,
        b"{}\n",
        b'{"execute": 1}\n',
        b'{"execute": "query-jobs", "arguments": []}\n',
        b'{"execute": "query-jobs", "arguments": null, "id": 1}\n',
        b'{"arguments": {}, "id": 2}\n',
        b'{"id": 3, "execute": "query-jobs", "zzz": 1}\n',
        b'{"execute": "query-jobs", "arguments": {"x": 1}, "id": 4}\n',
    ),
    "backup": _steps(
        CAPS,
        b'{"execute": "blockdev-backup", "arguments": {"job-id": "j0", "device": "src", '
        b'"target": "dst", "sync": "full", "speed": 65536, "auto-dismiss": false}, "id": 1}\n',
        b'{"execute": "query-jobs", "id": 2}\n',
        b'{"execute": "job-pause", "arguments": {"id": "j0"}, "id": 3}\n',
        b'{"execute": "job-pause", "arguments": {"id": "j0"}, "id": 4}\n',
        b'{"execute": "query-block-jobs", "id": 5}\n',
        b'{"execute": "job-resume", "arguments": {"id": "j0"}, "id": 6}\n',
        b'{"execute": "block-job-set-speed", "arguments": {"device": "j0", "speed": 0}}\n',
        b'{"execute": "job-dismiss", "arguments": {"id": "j0"}}\n',
        b'{"execute": "job-complete", "arguments": {"id": "j0"}}\n',
        Step(b'{"execute": "job-cancel", "arguments": {"id": "j0"}, "id": 7}\n', CONCLUDED),
        b'{"execute": "query-jobs", "id": 8}\n',
        b'{"execute": "job-dismiss", "arguments": {"id": "j0"}, "id": 9}\n',
        b'{"execute": "job-resume", "arguments": {"id": "nope"}}\n',
        b'{"execute": "block-job-cancel", "arguments": {"device": "nope"}}\n',
        b'{"execute": "blockdev-backup", "arguments": {"job-id": "1bad", "device": "src", '
        b'"target": "dst", "sync": "sideways"}}\n',
    ),
    "mirror": _steps(
        CAPS,
        Step(b'{"execute": "blockdev-mirror", "arguments": {"job-id": "m0", "device": "src", '
             b'"target": "dst", "sync": "full"}, "id": 1}\n', READY),
        b'{"execute": "query-jobs", "id": 2}\n',
        Step(b'{"execute": "job-complete", "arguments": {"id": "m0"}, "id": 3}\n', CONCLUDED),
        b'{"execute": "query-block-jobs", "id": 4}\n',
    ),
    "nodes": _steps(
        CAPS,
        b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", '
        b'"size": 1048576}, "id": 1}\n',
        b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0"}}\n',
        b'{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f1", '
        b'"filename": "img1"}, "id": 2}\n',
        b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", '
        b'"file": "f1"}, "id": 3}\n',
        b'{"execute": "blockdev-add", "arguments": {"driver": "bogus", "node-name": "x"}}\n',
        b'{"execute": "query-named-block-nodes", "id": 4}\n',
        b'{"execute": "blockdev-del", "arguments": {"node-name": "f1"}, "id": 5}\n',
        b'{"execute": "blockdev-del", "arguments": {"node-name": "r1"}, "id": 6}\n',
        b'{"execute": "blockdev-del", "arguments": {"node-name": "f1"}, "id": 7}\n',
        b'{"execute": "blockdev-del", "arguments": {"node-name": "n0"}, "id": 8}\n',
        b'{"execute": "blockdev-del", "arguments": {"node-name": "n0"}, "id": 9}\n',
    ),
    "transaction": _steps(
        CAPS,
        b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "t0", '
        b'"size": 4194304}}\n',
        Step(b'{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", '
             b'"data": {"job-id": "t1", "device": "src", "target": "t0", "sync": "full"}}]}, '
             b'"id": 1}\n', CONCLUDED),
        b'{"execute": "transaction", "arguments": {"actions": [{"type": "nope", "data": {}}]}}\n',
        b'{"execute": "transaction", "arguments": {"actions": []}, "id": 2}\n',
    ),
}


def edge_cases() -> dict[str, bytes]:
    deep = 1024
    return {
        "id-1e400": CAPS + b'{"execute": "query-jobs", "id": 1e400}\n{"execute": "query-jobs",'
                           b' "id": -1e400}\n{"execute": "query-jobs", "id": 1e308}\n',
        "tiny-numbers": b'[0.1e-400, -0.0, 0.0, 5e-324, 1.7976931348623157e308, -0]\n',
        "big-ints": b"[" + b"9" * 4300 + b", -" + b"9" * 4300 + b"]\n" + b"[" + b"9" * 4301 + b"]\n"
                    + b'{"execute": "x", "id": 340282366920938463463374607431768211456}\n',
        "numbers-bad": b"[01] [1.] [.5] [1e] [1e+] [-] [- 1] [0x10] [1e5x] [-0e1] [1E+2]\n",
        "surrogates": CAPS + b'{"execute": "x", "id": ["\\ud800", "\\udc00", "\\ud800\\u0041", '
                             b'"\\ud83d\\ude00", "\\uDBFF\\uDFFF", "\\ud800\\ud800"]}\n'
                             b'["\\ud800\\udbff"] ["\\ud8"] ["\\uzzzz"] ["\\u"]\n',
        "utf8": b'["\xc0\x80", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xef\xbf\xbf", '
                b'"\xef\xb7\x90", "\xf4\x8f\xbf\xbd", "\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80",'
                b' "\xfc\x84\x80\x80\x80\x80", "\xe2\x82", "\x80", "\xc3\xa9"]\n'
                b'{"\xef\xbf\xbe": 1}\n{"execute": "\xc3\xa9"}\n',
        "nonchars": b'["\\ufdd0", "\\ufdef", "\\ufffe", "\\uffff", "\\ud83f\\udffe", "\\uFDCF"]\n',
        "control": b'{"execute": "query-jobs"\x00, "id": 1}\x1b{"execute": "qmp_capabilities"}\n'
                   b'"a\tb" "a\nb" [1\x02] \x7f [1] \xfe\xff{"a": 1}\n',
        "deep-ok": b"[" * deep + b"]" * deep + b"\n"
                   + b'{"a":' * (deep - 1) + b"1" + b"}" * (deep - 1),
        "deep-over": b"[" * (deep + 1) + b"]" * (deep + 1) + b"\n" + b"{\"a\":[" * 600 + b"\n",
        "deep-echo": CAPS + b'{"execute": "x", "arguments": {"a": ' + b"[" * 1020 + b"]" * 1020
                     + b"}, \"id\": " + b"[" * 300 + b"]" * 300 + b"}\n",
        "deep-mixed": b"{" * 9 + b"[" * 9 + b"]" * 9 + b"}" * 9 + b'{"a": [{"b": [{"c": []}]}]}\n',
        "keywords": b"[true, false, null] [truE] [nul] [nulll] [t] [abcdefghijklmnop] [True]\n",
        "unbalanced": b"}]{]}[}[[]]}}{{{[[\n",
        "quotes": b"{'execute': 'query-jobs', 'id': \"mix'd\"} ['\\'', '\"', \"\\'\"]\n",
        "escapes": b'["\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\\\", "\\\'", "\\a", "\\0"]\n',
        "dup-keys": b'{"a": 1, "a": 2}\n{"execute": "x", "execute": "y"}\n'
                    b'{"a": {"b": 1, "b": {}}, "c": [1]}\n',
        "keys": b'{1: 2}\n{null: 1}\n{"a" 1}\n{"a": 1 "b": 2}\n{"a": 1,}\n[1,]\n[,1]\n{,}\n',
        "envelopes": CAPS_OOB + b'{"execute": "x", "exec-oob": "y"}\n{"exec-oob": "x", '
                     b'"execute": "y", "id": 1}\n{"exec-oob": ["x"]}\n{"execute": null}\n'
                     b'{"arguments": [], "execute": 1}\n{"id": 1, "zz": 2, "execute": "x"}\n'
                     b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}\n',
        "caps-twice": CAPS + CAPS + CAPS_OOB,
        "null-size": CAPS + b'{"execute": "blockdev-add", "arguments": {"driver": "null-co",'
                            b' "node-name": "n", "size": -1}, "id": 1}\n',
        "long-string": b'{"execute": "' + b"x" * 20000 + b'"}\n' + b'["' + b"\xc3\xa9" * 5000
                       + b'"]\n',
        "many-messages": b"".join(b'{"execute": "query-jobs", "id": %d}' % i for i in range(300)),
        "pieces": b'{"execute"' + b" " * 100 + b': "query-jobs"}' + b"\n" * 50 + b"[1,\n2]",
        "ws-only": b" \t\r\n" * 64,
        "trailing": b'{"execute": "query-jobs"} 1234',
        # The writer's own path (an integer beyond 64 bits), with every kind of scalar.
        "write-scalars": CAPS + b'{"execute": "echo", "arguments": {"a": null, "b": false, '
                         b'"c": true, "d": 18446744073709551616, "e": 1.5, "f": "\\u00e9"}}\n',
        # Over the token count limit before the size limit (with the small limits).
        "count-limit-a": b"[" + b"1," * 300 + b"1]\n",
        "count-limit-b": b"{\"a\": [" + b"0," * 400 + b"0]}",
        "string-cut": b'{"execute": "qu',
        "esc-cut": b'["abc\\',
    }


class QsdRecorder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket_path = root / "qsd.sock"
        self.pidfile = root / "qsd.pid"
        for i in range(2):
            with open(root / f"img{i}", "wb") as f:
                f.truncate(1 << 20)
        subprocess.run(
            [
                "qemu-storage-daemon",
                "--chardev", f"socket,id=m0,path={self.socket_path},server=on,wait=off",
                "--monitor", "chardev=m0",
                "--blockdev", "driver=null-co,node-name=src,size=4194304,read-zeroes=on",
                "--blockdev", "driver=null-co,node-name=dst,size=4194304,read-zeroes=on",
                "--pidfile", str(self.pidfile), "--daemonize",
            ],
            check=True, timeout=30, cwd=root,
        )
        self.pid = int(self.pidfile.read_text())
        from qmpjobd.qmp.framing import JsonSplitter

        self.JsonSplitter = JsonSplitter

    def converse(self, steps: list[Step]) -> tuple[bytes, int]:
        """Run a conversation; the bytes sent and the number of messages QSD sent back."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        reader = LineReader(sock)
        sent = bytearray()
        received = 0
        seen: set[tuple[str, str]] = set()  # (event, status) so far
        try:
            deadline = time.monotonic() + 30
            lines = reader.lines(deadline)
            next(lines)  # the greeting
            for step in steps:
                sock.sendall(step.send)
                sent += step.send
                want = len(self.JsonSplitter().feed(step.send))
                while want > 0 or (step.until_event is not None and step.until_event not in seen):
                    line = next(lines, None)
                    if line is None:
                        raise RuntimeError("qemu-storage-daemon closed the connection")
                    received += 1
                    if b'"event"' in line:
                        message = json.loads(line)
                        status = message.get("data", {}).get("status", "")
                        seen.add((message["event"], status))
                    else:
                        want -= 1
        except Timeout:
            raise RuntimeError(f"qemu-storage-daemon did not answer {step.send!r}") from None
        finally:
            sock.close()
        return bytes(sent), received

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            pidfd = os.pidfd_open(self.pid)
            try:
                os.kill(self.pid, signal.SIGTERM)
                select.select([pidfd], [], [], 30)
            finally:
                os.close(pidfd)


def run_record(args: argparse.Namespace) -> int:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in edge_cases().items():
        (CORPUS / f"edge-{name}.bin").write_bytes(data)
    print(f"wrote {len(edge_cases())} hand-written edge cases")
    if args.no_qsd:
        return 0
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed: no transcripts recorded", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="qmpjobd-record-") as tmp:
        recorder = QsdRecorder(Path(tmp))
        try:
            for name, steps in CONVERSATIONS.items():
                data, received = recorder.converse(steps)
                (CORPUS / f"qsd-{name}.bin").write_bytes(data)
                print(f"qsd-{name}.bin: {len(data)} bytes sent, {received} messages received")
        finally:
            recorder.stop()
    total = sum(p.stat().st_size for p in CORPUS.iterdir())
    print(f"corpus: {len(list(CORPUS.iterdir()))} files, {total} bytes")
    return 0


# =============================================================================================


def run_qcow2(args: argparse.Namespace) -> int:
    """qcow2 mode (scripts/fuzz_qcow2.py): JOBS processes share the inputs, each from its own
    seed, in its own directory; their reports are summed into WORKDIR/report.json."""
    import fuzz_qcow2

    if not fuzz_qcow2.environment_ok():
        print("fuzz.py qcow2: needs qemu-img and qemu-io (scripts/setup installs them)",
              file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    seconds = args.time or None
    jobs = max(1, args.jobs)
    share = [args.inputs // jobs + (i < args.inputs % jobs) for i in range(jobs)]
    procs = [subprocess.Popen([
        sys.executable, "-c",
        "import sys, json; sys.path.insert(0, sys.argv[1]); import fuzz_qcow2; "
        "from pathlib import Path; "
        "fuzz_qcow2.run(int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), "
        "Path(sys.argv[5]))",
        str(Path(__file__).resolve().parent), str(n), json.dumps(seconds), str(args.seed + i),
        str(args.workdir / f"p{i}")]) for i, n in enumerate(share)]
    status = [proc.wait() for proc in procs]
    total: dict[str, Any] = {"inputs": 0, "failures": 0, "opened": 0, "refused": 0,
                             "slowest": 0.0, "seconds": 0.0, "errors": {}}
    for i in range(jobs):
        path = args.workdir / f"p{i}" / "report.json"
        if not path.exists():
            total["failures"] += 1  # the process died: its input is in p{i}/case
            continue
        part = json.loads(path.read_text())
        for key in ("inputs", "failures", "opened", "refused"):
            total[key] += part[key]
        total["slowest"] = max(total["slowest"], part["slowest"])
        total["seconds"] = max(total["seconds"], part["seconds"])
        for kind, count in part["errors"].items():
            total["errors"][kind] = total["errors"].get(kind, 0) + count
    total["errors"] = dict(sorted(total["errors"].items(), key=lambda kv: -kv[1]))
    (args.workdir / "report.json").write_text(json.dumps(total, indent=1))
    print(f"qcow2: {total['inputs']} inputs in {total['seconds']} s, {total['opened']} opened, "
          f"{total['refused']} refused, {total['failures']} failures, slowest "
          f"{total['slowest']:.3f} s (limit {fuzz_qcow2.HANG_LIMIT} s); failures under "
          f"{args.workdir}/p*/failures")
    return 0 if total["failures"] == 0 and not any(status) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mode", choices=["protocol", "live", "record", "replay", "qcow2"])
    parser.add_argument("paths", nargs="*", type=Path,
                        help="replay mode: inputs to check; protocol mode: more seed inputs "
                             "(files or directories)")
    parser.add_argument("-n", "--inputs", type=int, default=100_000, help="inputs to try")
    parser.add_argument("--time", type=float, default=0, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto",
                        help="protocol mode: coverage-guided atheris, or seeded random mutation")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="failures/, corpus/ (atheris' finds), report.json")
    parser.add_argument("--max-len", type=int, default=2048, help="largest input, in bytes")
    parser.add_argument("--timeout", type=float, default=10, help="per-input time limit (s)")
    parser.add_argument("--no-coverage", action="store_true",
                        help="live mode: do not run the daemon under coverage.py; protocol "
                             "mode, random engine: no tracing during the run (8x faster), the "
                             "coverage is measured by replaying the seeds and PATHS at the end")
    parser.add_argument("--no-qsd", action="store_true",
                        help="record mode: only write the hand-written edge cases")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="qcow2 mode: processes, each with its own seed (seed, seed+1, ...)")
    args = parser.parse_intermixed_args(argv)
    runner: dict[str, Callable[[argparse.Namespace], int]] = {
        "protocol": run_protocol, "live": run_live, "record": run_record,
        "replay": run_replay, "qcow2": run_qcow2,
    }
    return runner[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
