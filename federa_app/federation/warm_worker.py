"""A node-local warm worker: the train handler in a process that stays up between messages.

Flower 1.42's Deployment Engine starts a fresh ClientApp process for every message, which then
spends most of its time importing torch, transformers and peft (~4 s of ~8 s on a 2-core node).
`federa worker --socket PATH` is an optional process next to the SuperNode that imports them once
and keeps them (and the pre-trained model, cached per process in `models.pretrained_model`)
loaded. A SuperNode started with `--node-config 'warm-worker="PATH"'` makes its ClientApps
forward each train message to it: the ClientApp process then imports only Flower.

Protocol: one Unix stream connection per message; every frame is an 8-byte big-endian length and
that many bytes. The ClientApp sends a JSON hello (protocol version, the sha256 of its own
`federa_app` sources, i.e. the app bundle's copy, package versions, node config); the worker
answers {"accept": true} or {"accept": false, "reason": ...}. Then the ClientApp sends the
message as Flower sends it between SuperNode and ClientApp (its inflatable objects: a JSON list of
object ids, then each object's deflated bytes) and the context as a Flower protobuf
(`flwr.common.serde`); the worker answers a JSON header, the reply message the same way and the
node state after the handler (`context.state`, where FeDeRA keeps its initial factors) as a
protobuf, which the ClientApp applies to its own context, so that Flower stores it for the next
message as it would after an in-process handler.

Isolation: one worker per node. Its socket is mode 0600 in a directory that only its user can
reach (0700, checked); it answers only peers of its own uid (SO_PEERCRED, Linux) and serves only
the node config it first served; the ClientApp checks the socket's owner and the worker's uid.
The worker keeps no node data in memory between messages: each message is trained on the rows its
own context names, exactly as in the ClientApp process.

Fallback: with no socket, a refused hello (other code, other package versions, another node,
busy), a failed connection or a worker that dies mid-message, the ClientApp logs one warning
line and handles the message itself, as without a worker. An exception raised by the handler in
the worker (bad data, a ConfigError) is raised again in the ClientApp as the same type with the
same message (the worker's traceback attached as a note), never retried.

This module travels in the app bundle: the ClientApp side (`handle_warm`) imports only the
standard library and Flower; the worker side imports the training code when it starts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import queue
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore import log
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from federa_app.errors import ConfigError
from federa_app.federation.wire import NODE_REPORT_KEY

WORKER_KEY = "warm-worker"  # node-config key: the worker's socket path (absolute)
PROTOCOL = 1
HELLO_TIMEOUT = 10.0  # s: connect and hello; a ready worker answers in milliseconds, even busy
REQUEST_TIMEOUT = 120.0  # s: the worker's wait for a request's frames (local socket: fast)
MAX_JSON_FRAME = 16 << 20  # headers and object-id lists
# What must match between the ClientApp's environment and the worker's, besides the app code.
PACKAGES = ("flwr", "torch", "transformers", "peft", "datasets", "flwr-datasets", "numpy")
_LENGTH = struct.Struct(">Q")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# Figures of the last forwarded message in this process (seconds; the worker's as "worker ...").
last_exchange: dict[str, float] = {}


class WorkerUnavailable(Exception):
    """The worker cannot handle this message: the ClientApp handles it itself."""


# --- what both sides compute --------------------------------------------------------------------


def app_digest(package_dir: Path | None = None) -> str:
    """sha256 over the `federa_app` sources this process imported (relative paths and bytes)."""
    root = Path(package_dir or Path(__file__).resolve().parent)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "__pycache__" in relative:
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment() -> dict[str, str]:
    """Python's version and the installed versions of the packages the handler uses."""
    versions = {"python": ".".join(map(str, sys.version_info[:2]))}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = ""
    return versions


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)))
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("the other side closed the connection")
        got += n
    return bytes(buffer)


def _recv(sock: socket.socket, limit: int | None = None) -> bytes:
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if limit is not None and size > limit:
        raise ValueError(f"frame of {size} bytes, expected at most {limit}")
    return _recv_exact(sock, size)


def _send_json(sock: socket.socket, value: dict) -> None:
    _send(sock, json.dumps(value).encode())


def _recv_json(sock: socket.socket) -> dict:
    value = json.loads(_recv(sock, MAX_JSON_FRAME))
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _send_message(sock: socket.socket, message: Message, header: dict | None = None) -> None:
    """`message` as Flower moves it between SuperNode and ClientApp: its inflatable objects (the
    message, its records, arrays and array chunks), each deflated; children before parents.
    Faster than one nested protobuf for large arrays (no copy per nesting level)."""
    objects = get_all_nested_objects(message)
    message_id = message.metadata.message_id  # not part of a deflated message: sent along
    _send_json(sock, {**(header or {}), "message-id": message_id, "objects": list(objects)})
    for obj in objects.values():
        _send(sock, obj.deflate())


def _recv_message(sock: socket.socket, header: dict) -> Message:
    """The message `_send_message` sent, its JSON header already read."""
    object_ids = [str(object_id) for object_id in header["objects"]]
    contents = {object_id: _recv(sock) for object_id in object_ids}
    message = inflate_object_from_contents(object_ids[-1], contents)
    if not isinstance(message, Message):
        raise ValueError(f"expected a message, got a {type(message).__name__}")
    message.metadata.__dict__["_message_id"] = str(header.get("message-id", ""))
    return message


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux); None where unknown."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return uid


# --- the ClientApp side -------------------------------------------------------------------------


def handle_warm(msg: Message, context: Context) -> Message | None:
    """This node's warm worker's reply to `msg`; None when the node has no worker (node config
    `warm-worker`) or it cannot serve (then one warning line): handle the message here."""
    path = context.node_config.get(WORKER_KEY)
    if path in (None, ""):
        return None
    try:
        reply = forward(str(path), msg, context)
    except WorkerUnavailable as exc:
        log(
            WARNING,
            "federa: warm worker %s not used (%s); handling the message in this process",
            path,
            exc,
        )
        return None
    if os.path.basename(sys.argv[0]).startswith("flwr-clientapp"):
        _report_process_seconds(reply)
    return reply


def forward(path: str, msg: Message, context: Context) -> Message:
    """Send `msg` and `context` to the worker at `path`; its reply, with `context.state` updated.

    Raises WorkerUnavailable when the worker did not handle the message (nothing was changed),
    and the handler's own exception when it failed there.
    """
    last_exchange.clear()
    started = time.perf_counter()
    with _connect(path) as sock:
        try:
            _send_json(sock, _hello(context))
            answer = _recv_json(sock)
        except (OSError, ValueError) as exc:
            raise WorkerUnavailable(f"no answer to the hello: {exc}") from None
        if not answer.get("accept"):
            raise WorkerUnavailable(f"refused: {answer.get('reason', 'no reason given')}")
        last_exchange["connect + hello"] = time.perf_counter() - started
        t = time.perf_counter()
        reply = None
        try:
            sock.settimeout(None)  # training takes as long as it takes
            _send_message(sock, msg)
            _send(sock, context_to_proto(context).SerializeToString())
            last_exchange["send message + context"] = time.perf_counter() - t
            header = _recv_json(sock)
            t = time.perf_counter()
            status = header.get("status")
            if status == "ok":
                reply = _recv_message(sock, header)
                if reply.metadata.reply_to_message_id != msg.metadata.message_id:
                    raise ValueError("its reply answers another message")
            elif status != "error":
                raise WorkerUnavailable(header.get("reason") or f"unexpected answer {status!r}")
            state = recorddict_from_proto(ProtoRecordDict.FromString(_recv(sock)))
        except (OSError, ValueError) as exc:
            raise WorkerUnavailable(f"connection lost mid-message: {exc}") from None
        except WorkerUnavailable:
            raise
        except Exception as exc:  # a garbled answer: nothing was applied yet
            raise WorkerUnavailable(f"unreadable answer: {exc}") from None
    context.state.clear()  # the handler's state changes, as if it had run in this process
    context.state.update(state)
    last_exchange["receive reply + apply state"] = time.perf_counter() - t
    last_exchange.update({f"worker {k}": v for k, v in header.get("timings", {}).items()})
    if status == "error":
        raise rebuild_error(header.get("error", {}), path)
    return reply


def _connect(path: str) -> socket.socket:
    """A connection to the worker's socket, after checking it is this user's (else unavailable)."""
    if not os.path.isabs(path):
        raise WorkerUnavailable("the socket path must be absolute")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise WorkerUnavailable("no socket there (worker not running?)") from None
    except OSError as exc:
        raise WorkerUnavailable(f"cannot reach the socket: {exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise WorkerUnavailable("not a socket")
    if info.st_uid != os.getuid():
        raise WorkerUnavailable(f"the socket belongs to uid {info.st_uid}, not {os.getuid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HELLO_TIMEOUT)
        sock.connect(path)
        uid = peer_uid(sock)
        if uid is not None and uid != os.getuid():
            raise WorkerUnavailable(f"the worker runs as uid {uid}, not {os.getuid()}")
    except WorkerUnavailable:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise WorkerUnavailable(f"cannot connect: {exc}") from None
    return sock


def _hello(context: Context) -> dict[str, Any]:
    return {
        "protocol": PROTOCOL,
        "app-sha256": _own_digest(),
        "environment": _own_environment(),
        "node-config": dict(context.node_config),
        "node-id": context.node_id,
        "run-id": context.run_id,
    }


_cached: dict[str, Any] = {}


def _own_digest() -> str:
    if "digest" not in _cached:
        _cached["digest"] = app_digest()
    return _cached["digest"]


def _own_environment() -> dict[str, str]:
    if "environment" not in _cached:
        _cached["environment"] = environment()
    return _cached["environment"]


def rebuild_error(info: dict[str, Any], path: str) -> Exception:
    """The handler's exception as the worker described it: same type, same arguments."""
    module, _, qualname = str(info.get("type", "")).partition(":")
    message = str(info.get("message", ""))
    cls: Any = None
    try:
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except Exception:  # an unknown type: a RuntimeError naming it instead
        cls = None
    error: Exception | None = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        for args in (info.get("args"), [message]):
            if isinstance(args, list):
                try:
                    error = cls(*args)
                    break
                except Exception:  # another signature: try the next form
                    continue
    if error is None:
        error = RuntimeError(f"{qualname or 'error'}: {message}")
    error.add_note(
        f"raised in the warm worker at {path}; its traceback:\n{info.get('traceback', '')}"
    )
    return error


def _report_process_seconds(reply: Message) -> None:
    """The node report's `process-seconds` is this ClientApp process's age (what it costs the
    node per message), as the in-process handler reports it."""
    if not reply.has_content() or NODE_REPORT_KEY not in reply.content.config_records:
        return
    import psutil

    age = max(time.time() - psutil.Process().create_time(), 0.0)
    reply.content.config_records[NODE_REPORT_KEY]["process-seconds"] = age


# --- the worker side ----------------------------------------------------------------------------


def prepare_socket_path(socket_path: str | Path) -> Path:
    """The socket's absolute path; its directory made (0700) or checked: this user's, closed to
    others. ConfigError (one line) when it cannot be used."""
    path = Path(socket_path).expanduser().absolute()
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes on Linux, 104 on macOS
        raise ConfigError(f"--socket {path} is too long for a Unix socket (100 bytes at most)")
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    info = parent.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"--socket directory {parent} must belong to this user and be closed to others "
            f"(it is mode {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}): use a private "
            f"directory (chmod 700), e.g. ~/.federa/workers"
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"--socket {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise ConfigError(f"another worker already listens on {path}")
        path.unlink()  # a stale socket of a worker that was killed
    return path


Handler = Callable[[Message, Context], Message]


@dataclass
class _Job:
    message: Message
    context: Context
    done: threading.Event = field(default_factory=threading.Event)
    reply: Message | None = None
    error: Exception | None = None
    seconds: float = 0.0


class _Stop(BaseException):
    """SIGTERM/SIGINT: unwind the main thread wherever it is (waiting or training)."""


class WarmWorker:
    """Serves one node's train messages on a Unix socket; the handler runs in the main thread.

    Connections are read and answered by their own threads; `serve_forever` (main thread) runs
    the handler on one message at a time. A second message while one is in progress is refused
    ("busy"): its ClientApp handles it itself.
    """

    def __init__(
        self,
        socket_path: Path,
        handler: Handler,
        say: Callable[[str], None] = print,
        handler_timings: dict[str, float] | None = None,
    ) -> None:
        self.path = Path(socket_path)
        self.handler = handler
        self.say = say
        self.handler_timings = handler_timings  # filled by the handler per message (benchmarks)
        self.package_dir = Path(__file__).resolve().parent
        self.digest = app_digest(self.package_dir)
        self.environment = environment()
        self.node_config: dict | None = None  # pinned by the first message served
        self.timings: dict[str, float] = {}  # the current message's, sent back with the reply
        self._slot = threading.Lock()  # held from an accepted hello until the reply is sent
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._server: socket.socket | None = None
        self._inode: int | None = None

    def bind(self) -> None:
        """Listen on the socket, created mode 0600 (never wider, not even for a moment)."""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._server.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        self._server.listen(8)
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()

    def close(self) -> None:
        """Stop listening and remove the socket (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def serve_forever(self) -> None:
        """Run the handler on each accepted message until interrupted (`_Stop`)."""
        while True:
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            started = time.perf_counter()
            try:
                job.reply = self.handler(job.message, job.context)
            except Exception as exc:  # goes back to the ClientApp, raised there
                job.error = exc
            job.seconds = time.perf_counter() - started
            job.done.set()

    def _accept_loop(self) -> None:
        server = self._server
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the worker is stopping
                return
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _refusal(self, hello: dict, uid: int | None) -> str:
        """Why this hello cannot be served ("" when it can)."""
        if uid is not None and uid != os.getuid():
            return f"peer uid {uid} is not the worker's uid {os.getuid()}"
        if hello.get("protocol") != PROTOCOL:
            return f"protocol {hello.get('protocol')} (the worker speaks {PROTOCOL})"
        theirs = str(hello.get("app-sha256", ""))
        if theirs != self.digest:
            return (
                f"the run's federa_app (sha256 {theirs[:12]}) differs from the worker's "
                f"({self.digest[:12]}): restart the worker with the run's app version"
            )
        if app_digest(self.package_dir) != self.digest:
            return "the worker's federa_app sources changed on disk since it started: restart it"
        theirs_env = hello.get("environment", {})
        differ = sorted(k for k in self.environment if theirs_env.get(k) != self.environment[k])
        if differ:
            listed = ", ".join(
                f"{k} {theirs_env.get(k) or '-'} vs {self.environment[k] or '-'}" for k in differ
            )
            return f"other package versions than the worker's ({listed})"
        if self.node_config is not None and hello.get("node-config") != self.node_config:
            return (
                "the worker serves another node (its node config differs); one worker per "
                "node: start one for this node, or restart this one if the node's config changed"
            )
        return ""

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(REQUEST_TIMEOUT)
            try:
                hello = _recv_json(conn)
                reason = self._refusal(hello, peer_uid(conn))
                if not reason and not self._slot.acquire(blocking=False):
                    reason = "busy with another message"
                if reason:
                    self.say(f"federa worker: refused node {hello.get('node-id')}: {reason}")
                    _send_json(conn, {"accept": False, "reason": reason})
                    return
            except (OSError, ValueError):
                return
            try:
                if self.node_config is None:
                    self.node_config = hello.get("node-config")
                _send_json(conn, {"accept": True})
                self._handle(conn, hello)
            except (OSError, ValueError) as exc:
                self.say(f"federa worker: node {hello.get('node-id')}: connection lost ({exc})")
            finally:
                self._slot.release()

    def _handle(self, conn: socket.socket, hello: dict) -> None:
        self.timings = {}
        t = time.perf_counter()
        try:
            message = _recv_message(conn, _recv_json(conn))
            context = context_from_proto(ProtoContext.FromString(_recv(conn)))
        except OSError:
            raise
        except Exception as exc:  # not the handler's error: the ClientApp falls back
            _send_json(conn, {"status": "failed", "reason": f"unreadable request: {exc}"})
            return
        self.timings["receive"] = time.perf_counter() - t
        job = _Job(message, context)
        self._jobs.put(job)
        job.done.wait()
        self.timings["handler"] = job.seconds
        self.timings.update(self.handler_timings or {})
        state = recorddict_to_proto(context.state).SerializeToString()
        if job.error is None:
            _send_message(conn, job.reply, {"status": "ok", "timings": self.timings})
            outcome = f"trained in {job.seconds:.2f} s"
        else:
            error = describe_error(job.error)
            _send_json(conn, {"status": "error", "error": error, "timings": self.timings})
            outcome = f"{type(job.error).__name__}: {str(job.error)[:200]}"
        _send(conn, state)
        self.say(f"federa worker: node {hello.get('node-id')} run {hello.get('run-id')}: {outcome}")


def describe_error(error: Exception) -> dict[str, Any]:
    """What the ClientApp needs to raise the same exception: type, arguments, message, trace."""
    cls = type(error)
    args = list(error.args)
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        args = None
    return {
        "type": f"{cls.__module__}:{cls.__qualname__}",
        "args": args,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }


def run_worker(
    socket_path: str | Path,
    threads: int | None = None,
    handler: Handler | None = None,
    say: Callable[[str], None] | None = None,
    handler_timings: dict[str, float] | None = None,
) -> None:
    """`federa worker`: import the training code, listen, print one line when ready, serve until
    SIGINT/SIGTERM, then remove the socket. `handler` defaults to `client.handle_train`; a
    handler's own phase timings, put in `handler_timings`, go back with each reply."""
    say = say or (lambda line: print(line, flush=True))
    started = time.perf_counter()
    path = prepare_socket_path(socket_path)  # fails fast, before the slow imports
    if threads:
        if threads < 1:
            raise ConfigError(f"--threads {threads} must be >= 1")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch starts its thread pool
    if handler is None:
        from federa_app.federation.client import (
            handle_train,  # torch, transformers, peft, datasets: once
        )

        handler = handle_train
    import torch

    if threads:
        torch.set_num_threads(threads)  # `set_threads` keeps it (OMP_NUM_THREADS) unless the
        # run config sets num-threads

    def stop(*_: object) -> None:
        raise _Stop

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker = WarmWorker(path, handler, say, handler_timings)
    try:
        worker.bind()
        say(
            f"federa worker: ready on {path} (pid {os.getpid()}, federa_app sha256 "
            f"{worker.digest[:12]}, {torch.get_num_threads()} threads, "
            f"started in {time.perf_counter() - started:.1f} s)"
        )
        worker.serve_forever()
    except _Stop:
        pass
    finally:
        worker.close()
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
    say("federa worker: stopped")
