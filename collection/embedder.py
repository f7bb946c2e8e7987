"""Embed an image from outside the collection where the model already lives.

The Datasette process never imports TensorFlow: it hands the image's bytes over a
Unix socket next to the database (``socket_path``) to the process that has the
collection's model loaded, and gets back the vector and top labels.

Who answers: the watcher daemon (`collection watch` / `collection start`) serves the
channel with the model it ingests with; it claims the channel before its model loads
(a request meanwhile waits for the model). When none runs, ``embed()`` starts a
worker, ``python -m collection.embedder --db DB``, which loads the same model,
answers, and exits after ``COLLECTION_EMBED_IDLE`` seconds (600) without a request.
One server at a time: the one holding an exclusive lock on ``<db>.embed.lock``
serves (a process that dies drops its lock, so its socket file is known stale and
is replaced). A daemon whose model is loaded asks a worker holding the channel to
quit, and takes over.

Only the user's processes reach the channel: the socket is created with mode 0600
(umask set around bind) and a peer of another user is hung up on (SO_PEERCRED).

The protocol, one request per connection: a JSON header line (at most 4 KiB), then
``size`` raw bytes of the image. ``{"op": "embed", "size": N, "box": [l, t, r, b]}``
is answered by a JSON header line ``{"ok": true, "model", "dimensions", "labels",
"seconds", "via"}`` and ``dimensions`` little-endian float32s; an error by
``{"ok": false, "status", "message"}``. ``{"op": "ping"}`` answers who serves
(``pid``, ``via``, ``model``); ``{"op": "quit"}`` asks a worker to exit.

Statuses (HTTP-like, for the web page to pass on): 400 a bad box, 413 over the size
limit (``COLLECTION_UPLOAD_MAX_BYTES``, 25 MB, checked before anything is sent or
decoded), 415 not an image, 422 empty, truncated or corrupt, or a decompression bomb
(more pixels than ``COLLECTION_MAX_PIXELS``), 503 no model or the worker failed, 504
no answer in time.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files

UPLOAD_MAX_BYTES = 25_000_000
IDLE = 600.0  # seconds a worker waits for a request before it exits
HEADER_MAX = 4096  # bytes of a request's or answer's JSON header line
READ_TIMEOUT = 30.0  # seconds a client may take to send its request
CLIENTS = 8  # connections answered at once; more are told the server is busy
MIN_REGION = 8  # pixels a box must span on each side, in the image as stored
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with its terminating zero
MODEL_WAIT = 120.0  # seconds a request waits for a model still loading
RETRY_CLAIM = 10.0  # seconds between a daemon's tries at a channel another daemon holds
FAILED_LINGER = 3.0  # seconds a worker that could not load its model tells callers why


class EmbedError(Exception):
    """An image that was not embedded; ``status`` is HTTP-like, ``message`` for a person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class NoServer(EmbedError):
    """Nothing answers on the collection's socket."""

    def __init__(self, message: str = "no embedding server runs for this collection"):
        super().__init__(503, message)


@dataclass
class Embedding:
    vector: np.ndarray  # float32, L2-normalised like the stored vectors
    labels: list[tuple[str, float]]  # top 5 (label, score), best first
    model: str
    seconds: float  # spent decoding and embedding, where the model lives
    via: str  # "daemon", "worker" or "in-process"


def upload_max_bytes() -> int:
    return int(os.environ.get("COLLECTION_UPLOAD_MAX_BYTES", UPLOAD_MAX_BYTES))


def idle_seconds() -> float:
    return float(os.environ.get("COLLECTION_EMBED_IDLE", IDLE))


def socket_path(db_path: str | os.PathLike) -> Path:
    """``<db>.embed.sock`` next to the database; when that path is too long for a Unix
    socket, a file named by the database's hash in a private folder of the user's."""
    db = Path(os.path.abspath(db_path))
    beside = db.with_name(db.name + ".embed.sock")
    if len(os.fsencode(beside)) <= SOCKET_PATH_MAX:
        return beside
    digest = hashlib.sha256(os.fsencode(os.path.realpath(db))).hexdigest()[:24]
    return _private_folder() / f"{digest}.embed.sock"


def _private_folder() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = Path(base) / f"collection-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError as e:
        raise EmbedError(503, f"cannot make the folder for the embedding socket {folder}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise EmbedError(503, f"{folder} is not a private folder of this user: not used for the embedding socket")
    return folder


def check_box(box) -> tuple[float, float, float, float] | None:
    """``box`` as (left, top, right, bottom) fractions of the image, or EmbedError(400)."""
    if box is None:
        return None
    if isinstance(box, (str, bytes)):
        raise EmbedError(400, "a region is four numbers: left, top, right, bottom (fractions 0 to 1)")
    try:
        left, top, right, bottom = (float(v) for v in box)
    except (TypeError, ValueError):
        raise EmbedError(400, "a region is four numbers: left, top, right, bottom (fractions 0 to 1)") from None
    if not all(math.isfinite(v) for v in (left, top, right, bottom)):
        raise EmbedError(400, "a region's edges must be finite numbers")
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
        edges = ", ".join(f"{v:g}" for v in (left, top, right, bottom))
        raise EmbedError(400, f"a region needs 0 <= left < right <= 1 and 0 <= top < bottom <= 1, not {edges}")
    return left, top, right, bottom


# --- the caller's side: no model, no TensorFlow ----------------------------------------------

_workers: dict[Path, subprocess.Popen] = {}  # by socket: the workers this process started
_workers_lock = threading.Lock()  # callers on several threads start one worker, not several


def embed(
    db_path: str | os.PathLike,
    data: bytes,
    box: tuple[float, float, float, float] | None = None,
    *,
    timeout: float = 60,
    start_worker: bool = True,
    max_bytes: int | None = None,
) -> Embedding:
    """The vector and top labels of the image in ``data``, from the collection's model.

    Asks the daemon (or a worker) serving the collection; with none and ``start_worker``,
    starts a worker and waits for it (up to ``timeout`` in all, model loading included),
    else raises NoServer. ``box``: embed only that region, as fractions of the image
    after its EXIF rotation. ``max_bytes``: the size limit [COLLECTION_UPLOAD_MAX_BYTES].
    Raises EmbedError, whose status and message a web page can pass on.
    """
    limit = max_bytes or upload_max_bytes()
    if len(data) > limit:
        raise EmbedError(413, f"{len(data):,} bytes, over the upload limit of {limit:,} bytes")
    if not data:
        raise EmbedError(422, "empty file (0 bytes)")
    box = check_box(box)
    path = socket_path(db_path)
    deadline = time.monotonic() + timeout
    header = {"op": "embed", "size": len(data), "box": box}
    try:
        answer, payload = _ask(path, header, data, deadline)
    except NoServer:
        if not start_worker:
            raise
        _start_worker(db_path, path, deadline)
        answer, payload = _ask(path, header, data, deadline)
    return _embedding(answer, payload)


def ping(db_path: str | os.PathLike, timeout: float = 2.0) -> dict | None:
    """Who serves the collection's channel (``pid``, ``via``, ``model``), or None."""
    return _ping_path(socket_path(db_path), time.monotonic() + timeout)


def _embedding(answer: dict, payload: bytes) -> Embedding:
    try:
        return Embedding(
            vector=np.frombuffer(payload, "<f4").astype(np.float32),
            labels=[(str(label), float(score)) for label, score in answer["labels"]],
            model=str(answer["model"]),
            seconds=float(answer["seconds"]),
            via=str(answer["via"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EmbedError(503, f"the embedding server's answer was unreadable: {e!r}") from None


def _ask(path: Path, header: dict, data: bytes, deadline: float) -> tuple[dict, bytes]:
    """One request; the answer's header and payload. EmbedError for an error answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            conn.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoServer() from None
        except socket.timeout:
            raise EmbedError(504, "the embedding server did not answer in time") from None
        except OSError as e:
            raise EmbedError(503, f"cannot reach the embedding server: {e.strerror or e}") from None
        try:
            try:
                conn.sendall(json.dumps(header).encode() + b"\n" + data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before reading it all: its answer says why
            reader = conn.makefile("rb")
            answer = _read_header(reader)
            if answer is None:
                raise EmbedError(503, "the embedding server hung up without answering")
            if not answer.get("ok"):
                raise EmbedError(int(answer.get("status", 500)), str(answer.get("message", "unknown error")))
            size = 4 * int(answer.get("dimensions", 0))
            payload = reader.read(size)
            if len(payload) != size:
                raise EmbedError(503, "the embedding server's answer was cut short")
            return answer, payload
        except socket.timeout:
            raise EmbedError(504, "the embedding server did not answer in time") from None
        except (OSError, ValueError) as e:
            raise EmbedError(503, f"the embedding server's answer was unreadable: {e}") from None


def _read_header(reader) -> dict | None:
    line = reader.readline(HEADER_MAX + 1)
    if not line:
        return None
    if len(line) > HEADER_MAX or not line.endswith(b"\n"):
        raise ValueError("header line too long or unterminated")
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("header is not a JSON object")
    return value


def _start_worker(db_path, path: Path, deadline: float) -> None:
    """Start ``python -m collection.embedder`` (unless ours still runs) and wait until
    something answers on ``path``: it, or a daemon or worker that won the channel."""
    with _workers_lock:
        worker = _workers.get(path)
        if worker is None or worker.poll() is not None:  # never started, or exited (idle) and now reaped
            log = tempfile.TemporaryFile()  # unnamed: read only if it fails before answering
            worker = _workers[path] = subprocess.Popen(
                [sys.executable, "-m", "collection.embedder", "--db", os.fspath(db_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # a Ctrl-C meant for the caller does not cut a request short
            )
            worker.log = log
    while True:
        if _ping_path(path, min(deadline, time.monotonic() + 2.0)):
            return
        code = worker.poll()
        if code:  # it failed; 0 means another server won the channel: wait for that one
            worker.log.seek(0)
            lines = [line for line in worker.log.read().decode(errors="replace").splitlines() if line.strip()]
            _workers.pop(path, None)
            why = lines[-1].removeprefix("Error: ") if lines else f"exit code {code}"
            raise EmbedError(503, f"the embedding worker failed: {why}")
        if time.monotonic() > deadline:
            raise EmbedError(504, "the embedding worker did not start in time (loading the model)")
        time.sleep(0.1)


def _ping_path(path: Path, deadline: float) -> dict | None:
    try:
        answer, _ = _ask(path, {"op": "ping"}, b"", deadline)
        return answer
    except EmbedError:
        return None


# --- where the model lives ----------------------------------------------------------------


def compute(model, data: bytes, box=None, *, via: str = "in-process", max_pixels: int = files.MAX_PIXELS) -> Embedding:
    """Decode ``data`` through the collection's guarded decoder, crop ``box``, and run the
    model: the same decode and fit as `collection add`, so a file embedded here gets the
    vector that adding it stores."""
    from . import images

    started = time.perf_counter()
    box = check_box(box)
    if not data:
        raise EmbedError(422, "empty file (0 bytes)")
    min_side = model.min_side
    if box is not None:  # decode enough pixels that the region still fills the model's input
        min_side = math.ceil(min_side / min(box[2] - box[0], box[3] - box[1]))
    try:
        decoded = images.decode("upload", data, min_side, max_pixels=max_pixels)
    except images.NotAnImage as e:
        raise EmbedError(415, str(e)) from None
    except images.ImageError as e:
        raise EmbedError(422, str(e)) from None
    image = decoded.image
    if box is not None:
        left, top, right, bottom = box
        if (right - left) * decoded.width < MIN_REGION or (bottom - top) * decoded.height < MIN_REGION:
            raise EmbedError(400, f"the region is too small: at least {MIN_REGION}x{MIN_REGION} pixels of the image")
        w, h = image.size
        image = image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
    pixels = model.prepare(image)
    vectors, probs = model.embed_batch([pixels])
    labels = [(label, score) for _, label, score in model.top_labels(probs)[0]]
    return Embedding(np.asarray(vectors[0], np.float32), labels, model.model_id, time.perf_counter() - started, via)


class EmbedServer:
    """Answers embedding requests on the collection's socket, a thread per connection.

    The socket can be bound before the model is there (``model`` set later): a request
    meanwhile waits for it, so a caller never starts a second model while one loads.
    """

    def __init__(self, db_path, model=None, *, via: str = "daemon", echo: Callable[[str], None] | None = None,
                 max_bytes: int = files.MAX_BYTES, max_pixels: int = files.MAX_PIXELS):
        self.db_path = db_path
        self.via = via
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.path = socket_path(db_path)
        self.last_active = time.monotonic()
        self._ready = threading.Event()  # set once there is a model, or a reason there is none
        self._failure: str | None = None
        self._model = None
        self.model = model
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._clients = threading.BoundedSemaphore(CLIENTS)
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        """The model to answer with (made a models.Serialised: one forward pass at a time)."""
        from .models import serialised

        if model is not None:
            self._model = serialised(model)
            self._ready.set()

    def fail(self, message: str) -> None:
        """No model will come: requests are answered 503 with ``message``."""
        self._failure = message
        self._ready.set()

    @property
    def serving(self) -> bool:
        return self._listener is not None

    # --- owning the channel ---------------------------------------------------------------

    def start(self, take_over: bool = False, wait: float = 30.0) -> bool:
        """Claim the channel, bind the socket (0600) and answer in a thread. False when
        another server holds the channel (with ``take_over``: unless it is a worker,
        which is asked to quit and given ``wait`` seconds to)."""
        if self._lock_fd is None and not self._claim(take_over, wait):
            return False
        self._bind()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept, name="embed-server", daemon=True)
        self._thread.start()
        return True

    def _claim(self, take_over: bool, wait: float) -> bool:
        lock_path = self.path.with_name(self.path.name.removesuffix(".sock") + ".lock")
        with _umask(0o177):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if _try_lock(fd):
            self._lock_fd = fd
            return True
        holder = _ping_path(self.path, time.monotonic() + 5.0) if take_over else None
        if holder and holder.get("via") == "worker":
            _ask_to_quit(self.path)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if _try_lock(fd):
                    self.echo(f"Took over answering image searches from worker pid {holder.get('pid')}")
                    self._lock_fd = fd
                    return True
                time.sleep(0.1)
        os.close(fd)
        return False

    def _bind(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:  # the lock is ours, so whoever made this file has gone: stale
            if not stat.S_ISSOCK(st.st_mode):
                os.close(self._lock_fd)
                self._lock_fd = None
                raise EmbedError(503, f"{self.path} exists and is not a socket: move it away")
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _umask(0o177):  # created 0600: no moment when others could connect
            listener.bind(os.fspath(self.path))
        listener.listen(CLIENTS)
        listener.settimeout(0.5)
        self._listener = listener

    def stop(self) -> None:
        """Stop accepting, remove the socket, answer any waiting request, release the channel."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._close_listener()
        if not self._ready.is_set():
            self.fail("the embedding server stopped before its model was loaded")
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with the descriptor
            self._lock_fd = None

    def _close_listener(self) -> None:
        """Closed at once when accepting ends: a connect is refused, not left in the backlog."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def serve_until_idle(self, idle: float) -> None:
        """Block until no request came for ``idle`` seconds (or a quit), then stop."""
        try:
            while not self._stopping.wait(0.25):
                if self._busy == 0 and time.monotonic() - self.last_active > idle:
                    break
        finally:
            self.stop()

    # --- answering --------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError as e:
                    if self._stopping.is_set():
                        return
                    self.echo(f"image search channel: accept failed: {e}")
                    time.sleep(0.5)
                    continue
                if not self._clients.acquire(blocking=False):
                    _send_quietly(conn, _error(503, "the embedding server is busy: try again in a moment"))
                    conn.close()
                    continue
                with self._busy_lock:
                    self._busy += 1
                threading.Thread(target=self._serve, args=(conn,), name="embed-request", daemon=True).start()
        finally:
            self._close_listener()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(READ_TIMEOUT)
                if not _same_user(conn):
                    return
                reply = self._answer(conn)
                if reply:
                    _send_quietly(conn, reply)
        except Exception as e:  # a bad client never stops the server
            self.echo(f"image search channel: {type(e).__name__}: {e}")
        finally:
            self.last_active = time.monotonic()
            with self._busy_lock:
                self._busy -= 1
            self._clients.release()

    def _answer(self, conn: socket.socket) -> bytes | None:
        reader = conn.makefile("rb")
        try:
            request = _read_header(reader)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "malformed request header")
        except OSError:  # timed out or gone
            return None
        if request is None:
            return None
        op = request.get("op")
        if op == "ping":
            model = self.model.model_id if self.model is not None else None
            return _line({"ok": True, "pid": os.getpid(), "via": self.via, "model": model})
        if op == "quit":
            if self.via != "worker":
                return _error(400, f"the {self.via} does not quit on request")
            self._stopping.set()
            return _line({"ok": True})
        if op != "embed":
            return _error(400, f"unknown op {op!r}")
        size = request.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return _error(400, "size must be a whole number of bytes")
        if size > self.max_bytes:
            return _error(413, f"{size:,} bytes, over the limit of {self.max_bytes:,} bytes")
        try:
            data = reader.read(size)
        except OSError:
            return None
        if len(data) != size:
            return _error(400, f"the request was cut short: {len(data):,} of {size:,} bytes")
        if not self._ready.wait(MODEL_WAIT):
            return _error(503, "the model is still loading: try again in a moment")
        if self._failure:
            return _error(503, self._failure)
        try:
            embedding = compute(self.model, data, request.get("box"), via=self.via, max_pixels=self.max_pixels)
        except EmbedError as e:
            return _error(e.status, e.message)
        vector = np.asarray(embedding.vector, "<f4")
        head = {"ok": True, "model": embedding.model, "dimensions": int(vector.size),
                "labels": embedding.labels, "seconds": round(embedding.seconds, 6), "via": self.via}
        return _line(head) + vector.tobytes()


def _ask_to_quit(path: Path) -> None:
    try:
        _ask(path, {"op": "quit"}, b"", time.monotonic() + 5.0)
    except EmbedError:
        pass


def _line(value: dict) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _error(status: int, message: str) -> bytes:
    return _line({"ok": False, "status": status, "message": message})


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass  # the client has gone


def _same_user(conn: socket.socket) -> bool:
    """The peer runs as this user (or root); the socket's mode already says so, this makes sure."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


@contextmanager
def _umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@contextmanager
def serving(db_path, echo: Callable[[str], None] | None = None):
    """For the watcher daemon: the channel, for as long as the block runs. Claimed at
    once when free, before the model loads (a request waits for the model instead of
    starting a worker); set ``.model`` once it is loaded. A worker holding the channel
    is asked to step aside once the daemon's model is there; while another daemon holds
    it, it is tried again every RETRY_CLAIM seconds."""
    server = EmbedServer(db_path, via="daemon", echo=echo)
    stopping = threading.Event()

    def claim_later() -> None:
        said = False
        while not stopping.is_set():
            if server.model is not None:
                try:
                    if server.start(take_over=True):
                        return
                except (OSError, EmbedError) as e:
                    server.echo(f"image search by upload is off: {getattr(e, 'message', e)}")
                    return
                holder = ping(db_path)
                if holder and holder.get("via") == "daemon" and not said:
                    server.echo(f"another daemon (pid {holder.get('pid')}) answers image searches "
                                "for this collection; this one takes over when it stops")
                    said = True
            stopping.wait(RETRY_CLAIM if server.model is not None else 0.25)

    claimer = None
    try:
        if not server.start():
            claimer = threading.Thread(target=claim_later, name="embed-claim", daemon=True)
            claimer.start()
    except (OSError, EmbedError) as e:
        server.echo(f"image search by upload is off: {getattr(e, 'message', e)}")
    try:
        yield server
    finally:
        stopping.set()
        if claimer is not None:
            claimer.join()
        server.stop()


# --- the worker process ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m collection.embedder --db DB``: serve the channel until idle."""
    parser = argparse.ArgumentParser(prog="python -m collection.embedder", description=main.__doc__)
    parser.add_argument("--db", required=True, help="the collection database")
    parser.add_argument("--idle", type=float, default=None, help=f"seconds without a request before exiting [{IDLE:g}]")
    args = parser.parse_args(argv)
    idle = args.idle if args.idle is not None else idle_seconds()
    server = EmbedServer(args.db, via="worker")
    try:
        if not server.start():
            return 0  # another server answers
    except (OSError, EmbedError) as e:
        print(f"Error: {getattr(e, 'message', e)}", file=sys.stderr)
        return 3
    try:
        server.model = _load_model(args.db)
    except Exception as e:
        message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        print(f"Error: {message}", file=sys.stderr)
        server.fail(f"the embedding worker failed: {message}")
        server.serve_until_idle(FAILED_LINGER)  # long enough for the callers waiting to hear why
        return 3
    server.serve_until_idle(idle)
    return 0


def _load_model(db_path):
    """The collection's own model, as `collection similar FILE` loads it."""
    import click

    from .cli import collection_model, open_store

    if not Path(db_path).exists():
        raise EmbedError(503, f"no collection database at {db_path}")
    try:
        store = open_store(os.fspath(db_path), create=False)
        if store.model is None:
            raise EmbedError(503, "the collection is empty: add images first")
        try:
            return collection_model(store)
        finally:
            store.close()
    except click.ClickException as e:
        raise EmbedError(503, e.message) from None


if __name__ == "__main__":
    sys.exit(main())
