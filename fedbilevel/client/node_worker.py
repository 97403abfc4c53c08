"""The ClientApp entry point, and an opt-in persistent worker per SuperNode (``node-worker=true``).

A SuperNode runs every message in a fresh ``flwr-clientapp`` process, which would import the
whole stack (torch, transformers, peft, the data back-ends: 7–8 s) and load the base model
again for each message. The entry point here imports only Flower and the standard library;
its handlers either

* (default, and always in simulation) import the real ClientApp
  (:func:`fedbilevel.client.app.make_client_app`) on the first message and run the message
  in this process: the behaviour and import cost of before; or
* (node config ``node-worker=true``) forward the Message and Context to this node's worker
  and return its reply, copying the updated ``context.state`` back into Flower's context.

The worker is a long-lived process per (node id, run id, app folder), started by the first
message (detached, in its own session). It imports the real ClientApp once, on its first
message, and runs the messages one at a time in the same process, so the stack, the tokenizer,
the client's data and the base model (cached per process by ``client/app.py``) stay loaded
between messages. It exits when it has been idle ``node-worker-idle-seconds`` (default 600),
:data:`RUN_END_GRACE_SECONDS` after it answered the final round's evaluate message, and when
the process that launched the ClientApp processes (the SuperNode's executor) is gone.

Transport: a Unix socket (mode 0600) in a private directory (mode 0700, owned by the user:
``$XDG_RUNTIME_DIR/fedbilevel``, else ``<tmp>/fedbilevel-<uid>``); the worker also checks its
peer's uid. Message and Context travel as Flower's own protobufs (``flwr.common.serde``),
never pickled. The ClientApp process passes its stdout and stderr with each message
(SCM_RIGHTS): the worker writes the message's output, live, to the same console as an
in-process ClientApp would. Its own lines (start, exit) go to ``node<id>.log`` there. A SuperNode
gets a new node id each time it starts, so a worker's start removes the files there untouched for
:data:`STALE_SECONDS` (:func:`prune_stale`).

A worker that cannot start, or that dies or breaks the connection during a message, makes
the ClientApp run that message in its own process (nothing is lost: Flower's context is only
updated from a complete reply), logged once; the rest of that run on that node then runs
in-process, as without ``node-worker``. An exception the ClientApp raises in the worker is
raised here with the same type name and text (Flower's error reply reads as before).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from logging import DEBUG, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.supercore import log

from fedbilevel import protocol  # light: NumPy and Flower

# Node-config keys (flower-supernode --node-config 'partition-id=0 num-partitions=8 node-worker=true').
WORKER_KEY = "node-worker"
IDLE_KEY = "node-worker-idle-seconds"
DEFAULT_IDLE_SECONDS = 600.0
RUN_END_GRACE_SECONDS = 30.0  # after the final round's evaluate reply (a resend may still come)
START_TIMEOUT_SECONDS = 60.0  # spawn -> listening (the worker imports the stack on its first message)
# A SuperNode gets a new node id at each start, so each start leaves a lock and a log behind; a worker's
# start removes those (and dead workers' sockets, run markers) untouched for this long.
STALE_SECONDS = 7 * 24 * 3600.0

MODULE = "fedbilevel.client.node_worker"  # what the worker runs (python -m)
APP_DIR = Path(__file__).resolve().parents[2]  # the folder holding fedbilevel/: the app (a FAB's, or a checkout)

# Wire format: a fixed header (the request's carries the ClientApp's stdout and stderr), then the payloads.
MAGIC = b"FBW1"
VERSION = 1
REQUEST = struct.Struct("!4sHQQ")  # magic, version, message bytes, context bytes
REPLY = struct.Struct("!4sBQQ")  # magic, status, first payload bytes, second payload bytes
OK, APP_ERROR, UNAVAILABLE = 0, 1, 2  # reply message + state | the app raised (JSON) | cannot serve (JSON)


class WorkerFailed(Exception):
    """The worker could not start, or broke off during a message: run it in this process instead."""


class NodeWorkerError(Exception):
    """Base of the exceptions re-raised from the worker: each is named as the ClientApp's own was."""


def worker_enabled(node_config: dict[str, Any]) -> bool:
    """Whether this SuperNode's node config turns the worker on (``node-worker``; default off)."""
    value = node_config.get(WORKER_KEY, False)
    if isinstance(value, str):
        value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}.get(
            value.strip().lower(), value
        )
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(
        f"node-config key '{WORKER_KEY}': value {value!r} is not allowed; expected true or false, "
        "e.g. flower-supernode --node-config 'partition-id=0 num-partitions=8 node-worker=true'"
    )


def idle_seconds(node_config: dict[str, Any]) -> float:
    """How long the worker waits for a message before it exits (``node-worker-idle-seconds``)."""
    value = node_config.get(IDLE_KEY, DEFAULT_IDLE_SECONDS)
    with contextlib.suppress(TypeError, ValueError):
        if not isinstance(value, bool) and float(value) > 0:
            return float(value)
    raise ValueError(f"node-config key '{IDLE_KEY}': value {value!r} is not allowed; expected seconds > 0, e.g. 600")


def private_dir() -> Path:
    """The user's private folder for the workers' sockets, locks and log (created mode 0700; checked)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        root = Path(runtime) / "fedbilevel"
    else:
        root = Path(tempfile.gettempdir()) / f"fedbilevel-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WorkerFailed(f"{root} is not a private folder (a directory of uid {os.getuid()}, mode 0700)")
    return root


@dataclass(frozen=True)
class WorkerPaths:
    """Where one worker listens (``socket``), how its starts are serialized (``lock``), the marker that
    turns it off for the run after a failure (``off``), and its own log (``log``, one per node)."""

    socket: Path
    lock: Path
    off: Path
    log: Path

    @classmethod
    def of(cls, node_id: int, run_id: int, root: Path | None = None) -> WorkerPaths:
        root = private_dir() if root is None else root
        tag = hashlib.sha256(str(APP_DIR).encode()).hexdigest()[:8]  # another app (FAB) gets another worker
        name = f"node{node_id}-run{run_id}-{tag}"
        sock = root / f"{name}.sock"
        if len(str(sock)) > 100:  # sun_path holds 104-108 bytes
            sock = root / f"{hashlib.sha256(name.encode()).hexdigest()[:20]}.sock"
        return cls(sock, root / f"node{node_id}.lock", root / f"{name}.off", root / f"node{node_id}.log")


# --- the ClientApp side ---


@functools.cache
def real_app() -> ClientApp:
    """The fedbilevel ClientApp, built on first use (this imports the stack)."""
    from fedbilevel.client.app import make_client_app

    return make_client_app()


def make_entry_app() -> ClientApp:
    """The ClientApp of ``client_app.py``: train, evaluate and query, each in a worker or in this process."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle(message, context)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle(message, context)

    return app


def handle(message: Message, context: Context) -> Message:
    """The reply to ``message``: from this node's worker if its node config turns one on, else in-process."""
    if not worker_enabled(context.node_config):
        return real_app()(message, context)
    idle = idle_seconds(context.node_config)
    paths: WorkerPaths | None = None
    try:
        paths = WorkerPaths.of(context.node_id, context.run_id)
        if paths.off.exists():
            log(DEBUG, "node worker: off for run %d after a failure (%s)", context.run_id, paths.off)
            return real_app()(message, context)
        with connect(paths, idle) as sock:
            return forward(sock, message, context, paths)
    except WorkerFailed as failure:
        log(
            WARNING,
            "node worker: %s; this message and the rest of run %d on this node run in the ClientApp process",
            failure,
            context.run_id,
        )
        if paths is not None:
            with contextlib.suppress(OSError):
                paths.off.write_text(f"{failure}\n")
        return real_app()(message, context)


@contextlib.contextmanager
def connect(paths: WorkerPaths, idle: float) -> Iterator[socket.socket]:
    """A connection to the worker at ``paths.socket``, starting it first if none listens there."""
    sock = _try_connect(paths.socket)
    if sock is None:
        with open(paths.lock, "a") as lock:  # one start per node at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            sock = _try_connect(paths.socket)
            if sock is None:
                os.utime(paths.lock)  # in use: not stale
                prune_stale(paths.socket.parent, keep=paths)
                sock = _start(paths, idle)
    try:
        yield sock
    finally:
        sock.close()


def prune_stale(root: Path, *, keep: WorkerPaths, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove the files of nodes and runs gone from ``root``: untouched for ``max_age`` seconds.

    Locks, logs and run markers (``node*.lock``, ``node*.log``, ``*.off``) and sockets no worker
    listens on; never ``keep``'s own files or a live worker's socket.

    Returns
    -------
    list of Path
        What was removed.
    """
    cutoff = time.time() - max_age
    removed = []
    for path in root.iterdir():
        if path in (keep.socket, keep.lock, keep.off, keep.log) or not path.name.endswith(
            (".lock", ".log", ".off", ".sock")
        ):
            continue
        with contextlib.suppress(FileNotFoundError):  # another node pruned it meanwhile
            if path.lstat().st_mtime > cutoff:
                continue
            if path.suffix == ".sock":
                try:
                    live = _try_connect(path)
                except WorkerFailed:
                    continue
                if live is not None:
                    live.close()
                    continue
            path.unlink()
            removed.append(path)
    return removed


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):  # none yet, or a stale socket of one that exited
        sock.close()
        return None
    except OSError as error:
        sock.close()
        raise WorkerFailed(f"cannot connect to {path}: {error}") from error
    return sock


_started: list[subprocess.Popen] = []  # the workers this process started (tests end them)


def _start(paths: WorkerPaths, idle: float) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()  # a stale one (its worker is gone: the connection was refused)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(APP_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # a message's output reaches the console as it is written
    watched = os.getppid()  # the SuperNode's executor, which launches every ClientApp process
    command = [sys.executable, "-m", MODULE, "--socket", str(paths.socket), "--idle-seconds", str(idle)]
    if watched > 1:
        command += ["--watch-pid", str(watched)]
    output = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=os.getcwd(),  # relative paths (data-path) resolve as in the ClientApp process
            env=env,
            start_new_session=True,  # not stopped with this process's group; it exits on its own
        )
    finally:
        os.close(output)
    _started.append(process)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        sock = _try_connect(paths.socket)
        if sock is not None:
            log(INFO, "node worker: started pid %d on %s (idle timeout %.0f s)", process.pid, paths.socket, idle)
            return sock
        if process.poll() is not None:
            raise WorkerFailed(f"the worker exited at start (code {process.returncode}); see {paths.log}")
        time.sleep(0.05)
    process.kill()
    raise WorkerFailed(f"the worker did not listen within {START_TIMEOUT_SECONDS:.0f} s; see {paths.log}")


def _output_fds() -> list[int]:
    """This process's stdout and stderr, for the worker to write the message's output to."""
    fds = []
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
    return fds if len(fds) == 2 else []


def exchange(sock: socket.socket, message: Message, context: Context) -> tuple[int, bytes, bytes]:
    """Send one message and its context; the worker's status and two payloads. Raises WorkerFailed."""
    payloads = [message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString()]
    header = REQUEST.pack(MAGIC, VERSION, *map(len, payloads))
    try:
        sent = socket.send_fds(sock, [header], _output_fds())
        sock.sendall(header[sent:])
        for payload in payloads:
            sock.sendall(payload)
        magic, status, *sizes = REPLY.unpack(_receive(sock, REPLY.size))
        if magic != MAGIC:
            raise WorkerFailed("the worker replied in an unknown format")
        first, second = (_receive(sock, size) for size in sizes)
    except OSError as error:
        raise WorkerFailed(f"the connection to the worker broke during the message ({error})") from error
    return status, first, second


def forward(sock: socket.socket, message: Message, context: Context, paths: WorkerPaths) -> Message:
    """The worker's reply to ``message``; ``context.state`` becomes the worker's (in place)."""
    status, first, second = exchange(sock, message, context)
    try:
        if status == OK:
            reply = message_from_proto(ProtoMessage.FromString(first))
            state = recorddict_from_proto(ProtoRecordDict.FromString(second))
        else:
            details = json.loads(second)
            state = recorddict_from_proto(ProtoRecordDict.FromString(first)) if status == APP_ERROR else None
    except Exception as error:
        raise WorkerFailed(f"unreadable reply from the worker ({type(error).__name__}: {error})") from error
    if state is not None:  # what the app left in the state, as if it had run here (also when it raised)
        for key in list(context.state):
            del context.state[key]
        for key, record in state.items():
            context.state[key] = record
    if status == OK:  # the reply is made here, to the message as Flower gave it (its id and routing)
        if reply.has_error():
            return Message(reply.error, reply_to=message)
        return Message(reply.content, reply_to=message)
    if status == APP_ERROR:  # the app's own exception, as Flower would have reported it in-process
        kind = type(details["name"], (NodeWorkerError,), {"__module__": details["module"]})
        kind.__qualname__ = details["name"]
        raise kind(details["text"])
    raise WorkerFailed(f"the worker cannot serve: {details['text']} (see {paths.log})")


def _receive(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise WorkerFailed("the worker closed the connection during the message (it exited or crashed)")
        got += n
    return bytes(buffer)


# --- the worker ---


@contextlib.contextmanager
def _output_to(fds: list[int]) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2) go to ``fds`` meanwhile."""
    if len(fds) != 2:
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _say(text: str, *args: Any) -> None:
    """A line of the worker's own (its log file)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} node worker pid {os.getpid()}: {text % args}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _send(conn: socket.socket, status: int, first: bytes, second: bytes) -> None:
    conn.sendall(REPLY.pack(MAGIC, status, len(first), len(second)))
    conn.sendall(first)
    conn.sendall(second)


def _error_report(error: BaseException) -> bytes:
    kind = type(error)
    return json.dumps({"module": kind.__module__, "name": kind.__qualname__, "text": str(error)}).encode()


def _is_final_evaluate(message: Message, reply: Message, context: Context) -> bool:
    """The reply to the final round's evaluate message (not a request for its adapter): the run is ending."""
    with contextlib.suppress(Exception):
        if not message.metadata.message_type.startswith("evaluate") or reply.has_error():
            return False
        server_round = int(message.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])
        if reply.content.metric_records[protocol.METRICS].get(protocol.MISSING_ADAPTER):
            return False
        return server_round >= int(context.run_config["num-server-rounds"])
    return False


def serve_one(conn: socket.socket) -> bool:
    """Answer one request on ``conn``; True if it was the final round's evaluate message."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux: only this user's processes (the folder already says so)
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            _say("refused a connection from uid %d", uid)
            return False
    data, fds, _, _ = socket.recv_fds(conn, REQUEST.size, 2)
    try:
        if not data:
            return False
        header = data + _receive(conn, REQUEST.size - len(data))
        magic, version, *sizes = REQUEST.unpack(header)
        if magic != MAGIC or version != VERSION:
            _send(conn, UNAVAILABLE, b"", json.dumps({"text": f"wire format {magic!r} v{version}"}).encode())
            return False
        message_bytes, context_bytes = (_receive(conn, size) for size in sizes)
        message = message_from_proto(ProtoMessage.FromString(message_bytes))
        context = context_from_proto(ProtoContext.FromString(context_bytes))
        with _output_to(fds):
            try:
                app = real_app()
            except BaseException as error:  # e.g. an ImportError: the ClientApp process reports it
                traceback.print_exc()
                _send(conn, UNAVAILABLE, b"", _error_report(error))
                return False
            try:
                reply = app(message, context)
            except Exception as error:
                traceback.print_exc()
                _send(conn, APP_ERROR, recorddict_to_proto(context.state).SerializeToString(), _error_report(error))
                return False
        state = recorddict_to_proto(context.state).SerializeToString()
        _send(conn, OK, message_to_proto(reply).SerializeToString(), state)
        return _is_final_evaluate(message, reply, context)
    finally:
        for fd in fds:
            os.close(fd)


def serve(path: Path, idle: float, watch_pid: int | None = None) -> str:
    """Listen on ``path`` and answer one message at a time until idle for ``idle`` seconds, briefly
    after the final round's evaluate message, or until ``watch_pid`` is gone; why it stopped."""
    os.umask(0o077)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
    server.listen(8)
    _say("serving %s (idle timeout %.0f s, watching pid %s)", path, idle, watch_pid)
    wait = idle
    deadline = time.monotonic() + wait
    reason = "idle"
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                reason = "idle" if wait == idle else "the run ended"
                break
            if watch_pid is not None and not _alive(watch_pid):
                reason = f"pid {watch_pid} (the SuperNode's executor) is gone"
                break
            server.settimeout(min(1.0, deadline - now))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    final = serve_one(conn)
                except Exception as error:  # e.g. the ClientApp process went away mid-message
                    _say("a message broke off: %s: %s", type(error).__name__, error)
                    final = False
            wait = min(idle, RUN_END_GRACE_SECONDS) if final else idle
            deadline = time.monotonic() + wait
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()  # new ClientApp processes start another worker from here on
        if reason == "idle" or reason == "the run ended":  # connections already queued are answered
            server.setblocking(False)
            while True:
                try:
                    conn, _ = server.accept()
                except (BlockingIOError, OSError):
                    break
                conn.setblocking(True)
                with conn, contextlib.suppress(Exception):
                    serve_one(conn)
        server.close()
    _say("exits: %s", reason)
    return reason


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedbilevel's persistent per-node ClientApp worker")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    parser.add_argument("--watch-pid", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop removes the socket on the way out
    serve(args.socket, args.idle_seconds, args.watch_pid)


if __name__ == "__main__":
    main()
