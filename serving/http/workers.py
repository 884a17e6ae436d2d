"""One model server over several processes: ``python -m serving --workers N``.

One process, the *engine process*, owns the models (and the accelerator): it loads them, runs
the backends' schedulers and the :class:`serving.dataplane.plane.DataPlane`, and serves the whole
HTTP API on a private loopback port. N *front-end processes* share the public listening socket
(the kernel spreads connections over them) and do the per-request work, so it scales with cores
while the engine process only batches and runs forwards:

- the hot routes (``POST /predictions/...``, ``POST /v2/models/.../infer``) are decoded,
  tokenised and answered in the front end (:class:`serving.http.frontend.FrontEnd`); it sends
  the engine process token ids in binary frames (:mod:`serving.http.frames`) over ZeroMQ (a
  DEALER per front end, a ROUTER in the engine process, on a Unix socket) and gets output rows
  back. A model the front end has no tokenizer for yet goes to the engine whole (the body and
  headers as read off the wire, a :class:`serving.http.fastpath.Call`), answered as a
  one-process server answers it;
- every other route (health, metadata, repository, metrics) is proxied to the engine
  process's own HTTP port: one source of truth for state and metrics (the engine's data plane
  counts every request, including those a front end refused, which it reports in its frames).

The engine process starts the front ends once its HTTP port answers, restarts one that dies,
and on SIGTERM stops them first (each drains its connections) and then itself.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from serving import settings
from serving.errors import DeadlineExceeded, ServingError
from serving.http import frames
from serving.http.fastpath import Answer, Call, FastPath, problem, read_body, send_answer, v2_error
from serving.http.frames import FrameError
from serving.http.frontend import EngineError, FrontEnd, ModelInfo, describe_model, model_info

logger = logging.getLogger("myriad.workers")

# How long a front end waits for the engine's answer before it answers 504 itself: past the
# engine's own deadline (a request the engine dropped, or an engine that died, is not waited
# on for ever).
ANSWER_TIMEOUT_S = 60.0
# Hop-by-hop headers a proxy must not forward (RFC 9110 section 7.6.1).
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
    b"te",
    b"trailer",
    b"host",
    b"content-length",
}

_call_encoder = msgspec.msgpack.Encoder()
_call_fields = msgspec.msgpack.Decoder(tuple)


def encode_call(call: Call) -> list[bytes]:
    head = (
        call.kind,
        call.model_id,
        call.version,
        call.content_type,
        call.query_string,
        call.header_length,
    )
    return [_call_encoder.encode(head), call.body]


def decode_call(head: bytes, body: bytes) -> Call:
    kind, model_id, version, content_type, query_string, header_length = _call_fields.decode(head)
    return Call(kind, model_id, version, body, content_type, query_string, header_length)


def encode_answer(answer: Answer) -> list[bytes]:
    return [_call_encoder.encode((answer.status, answer.media_type, answer.headers)), answer.body]


def decode_answer(head: bytes, body: bytes) -> Answer:
    status, media_type, headers = _call_fields.decode(head)
    return Answer(status, body, media_type, headers)


def zmq_socket(kind: int) -> Any:
    """A plain (not asyncio) ZeroMQ socket that drops unsent messages on close (a stopping
    process does not wait for a peer that is gone); read with :class:`Pump`."""
    import zmq

    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


class Pump:
    """Reads a ZeroMQ socket on the event loop without a future per message: the loop watches
    the socket's file descriptor, and each time it is readable every message waiting is read
    and handed to ``handle`` in one callback (a front end's frames, or the engine's replies,
    that arrived together cost one wake-up). ZeroMQ's descriptor is edge-triggered and a send
    can consume its edge, so after sending call :meth:`kick`."""

    # Messages read per callback before the loop gets a turn for other work.
    BURST = 256

    def __init__(self, sock: Any, handle: Any, drained: Any = None) -> None:
        """``drained``: called after each callback's messages were handled (the engine runs
        the frames read together as one)."""
        import zmq

        self.sock, self.handle, self.drained = sock, handle, drained
        # Plain ints: pyzmq's flag enums cost microseconds per operation.
        self._again, self._noblock = zmq.Again, int(zmq.NOBLOCK)
        self._events, self._pollin = int(zmq.EVENTS), int(zmq.POLLIN)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._due = False
        self._loop.add_reader(self._fd, self._drain)
        self.kick()

    def kick(self) -> None:
        if not self._due:
            self._due = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._due = False
        sock, handle, noblock = self.sock, self.handle, self._noblock
        recv, events, pollin = sock.recv_multipart, sock.getsockopt, self._pollin
        try:
            for _ in range(self.BURST):
                if not events(self._events) & pollin:  # (cheaper than a failed receive)
                    return
                try:
                    message = recv(noblock)
                except self._again:
                    return
                try:
                    handle(message)
                except Exception:  # noqa: BLE001 - one bad message must not stop the reader
                    logger.exception("dropped a message it could not handle")
            self.kick()  # more waiting: read on after the loop's other work
        finally:
            if self.drained is not None:
                self.drained()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)


# ------------------------------------------------------------------------ engine process

# The kinds of message between a front end's DEALER and the engine's ROUTER (first part).
CALL, DESCRIBE, FRAME, REPLY = b"C", b"D", b"F", b"R"


class EngineEndpoint:
    """The engine process's ROUTER. Frames of token ids (:mod:`serving.http.frames`) read in
    one callback are run together through :meth:`DataPlane.run_ids_frame`, and their output
    rows go back coalesced: what finished within one turn of the loop leaves in one reply frame
    per front end. Whole calls (models a front end cannot tokenise for yet) are answered by
    ``answer`` as a one-process server answers them."""

    def __init__(self, answer: Any, address: str, plane: Any = None) -> None:
        self.answer = answer
        self.address = address
        self.plane = plane
        self._socket: Any = None
        self._pump: Pump | None = None
        self._inflight: set[asyncio.Task] = set()
        self._replies: dict[bytes, list[bytes]] = {}
        self._flush_due = False
        # The requests of the frames read in one callback, by model: run together.
        self._groups: dict[tuple[str, str | None], list[tuple[bytes, frames.IdsItem]]] = {}

    async def start(self) -> None:
        import zmq

        self._socket = zmq_socket(zmq.ROUTER)
        self._socket.bind(self.address)
        self._pump = Pump(self._socket, self._message, self.run_frames)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _send(self, message: list[bytes]) -> None:
        # ROUTER sends never block (an unreachable peer's message is dropped).
        self._socket.send_multipart(message)
        assert self._pump is not None
        self._pump.kick()

    def _message(self, message: list[bytes]) -> None:
        identity, kind, *parts = message
        try:
            if kind == FRAME:
                self._frame(identity, parts[0])
            elif kind == CALL:
                request_id, head, body = parts
                self._spawn(self._reply(identity, request_id, decode_call(head, body)))
            elif kind == DESCRIBE:
                request_id, model_id = parts
                described = describe_model(self.plane, model_id.decode())
                self._send([identity, DESCRIBE, request_id, _call_encoder.encode(described)])
        except (FrameError, ValueError):
            logger.exception("dropped a malformed message from a front end")

    def _frame(self, identity: bytes, data: bytes) -> None:
        """A frame's requests, grouped by model with those of the other frames read in the same
        callback (:meth:`run_frames` runs them)."""
        plane, groups = self.plane, self._groups
        for item in frames.decode_request_frame(data):
            if item.kind == frames.REFUSAL:
                plane.metrics.observe(item.model_id, item.status, 0.0, 0)
                continue
            group = groups.get((item.model_id, item.version))
            if group is None:
                groups[(item.model_id, item.version)] = [(identity, item)]
            else:
                group.append((identity, item))

    def run_frames(self) -> None:
        """The requests of the frames read together, by :meth:`DataPlane.run_ids_frame`: per
        model one lookup and metrics counted once, per cross-model engine one submission and
        one completion; no task unless a model must be held on demand. The more front ends
        send at once, the fewer of these per request."""
        if not self._groups:
            return
        groups, self._groups = self._groups, {}
        self.plane.run_ids_frame(
            [
                (
                    model_id,
                    version,
                    [(item.input_ids, item.attention_mask) for _, item in items],
                    functools.partial(self._answered, items),
                )
                for (model_id, version), items in groups.items()
            ]
        )

    def _answered(
        self, items: list[tuple[bytes, frames.IdsItem]], results: list[Any], cold: bool
    ) -> None:
        for (identity, item), result in zip(items, results, strict=True):
            if not isinstance(result, BaseException):
                encoded = frames.encode_output(item.request_id, result, cold)
            elif isinstance(result, ServingError):
                encoded = frames.encode_error(
                    item.request_id, result.status, result.title, str(result), result.headers
                )
            else:  # logged by the data plane; an answer all the same
                encoded = frames.encode_error(
                    item.request_id, 500, "Internal error", type(result).__name__
                )
            replies = self._replies.get(identity)
            if replies is None:
                self._replies[identity] = [encoded]
            else:
                replies.append(encoded)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        replies, self._replies = self._replies, {}
        for identity, items in replies.items():
            self._send([identity, REPLY, frames.reply_frame(items)])

    async def _reply(self, identity: bytes, request_id: bytes, call: Call) -> None:
        answer = await self.answer(call)  # answer_call never raises: errors are answers
        self._send([identity, CALL, request_id, *encode_answer(answer)])

    async def close(self) -> None:
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=30)
        if self._replies:
            self._flush()
        if self._pump is not None:
            self._pump.close()
        if self._socket is not None:
            self._socket.close()
        if self.address.startswith("ipc://"):
            Path(self.address.removeprefix("ipc://")).unlink(missing_ok=True)


# ------------------------------------------------------------------------ front ends


class EngineClient:
    """A front end's DEALER, and its engine (:class:`serving.http.frontend.Engine`): token ids
    go out coalesced (the requests of one turn of the loop in one frame), whole calls and
    questions about models one by one; one reader task settles the answers."""

    def __init__(self, address: str, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        # Each pending answer's future and when it is due (insertion order is deadline order):
        # one sweep a second expires the late ones, instead of a timer made and cancelled per
        # request.
        self._pending: dict[Any, tuple[asyncio.Future, float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._outgoing: list[bytes] = []
        self._socket: Any = None
        self._pump: Pump | None = None

    async def start(self) -> None:
        import zmq

        self._socket = zmq_socket(zmq.DEALER)
        # No high-water mark: a send never fails for a queue that is full (each request waits
        # at most timeout_s, which bounds what can queue behind a stalled engine).
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.connect(self.address)
        self._pump = Pump(self._socket, self._read)
        self._sweep()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key, (future, due) in list(self._pending.items()):
            if due > now:
                break
            del self._pending[key]
            _expire(future)
        self._sweeper = loop.call_later(min(1.0, self.timeout_s / 4), self._sweep)

    def _read(self, message: list[bytes]) -> None:
        kind, *parts = message
        if kind == REPLY:
            for item in frames.decode_reply_frame(parts[0]):
                self._settle(item.request_id, item)
        elif kind == CALL:
            request_id, head, body = parts
            self._settle(request_id, decode_answer(head, body))
        elif kind == DESCRIBE:
            request_id, described = parts
            self._settle(request_id, msgspec.msgpack.decode(described))

    def _send(self, message: list[bytes]) -> None:
        self._socket.send_multipart(message)
        assert self._pump is not None
        self._pump.kick()

    def _settle(self, key: Any, value: Any) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result(value)

    async def _wait(self, key: Any, send: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[key] = (future, loop.time() + self.timeout_s)
        try:
            send()
            return await future
        finally:
            self._pending.pop(key, None)

    def _queue(self, item: bytes) -> None:
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(item)

    def _flush(self) -> None:
        items, self._outgoing = self._outgoing, []
        if items:
            self._send([FRAME, frames.request_frame(items)])

    async def run_ids(
        self, model_id: str, version: str | None, input_ids: Any, mask: Any
    ) -> tuple[Any, bool]:
        request_id = next(self._ids) & 0xFFFFFFFF
        item = frames.encode_ids_item(request_id, model_id, version, input_ids, mask)
        try:
            reply = await self._wait(request_id, lambda: self._queue(item))
        except TimeoutError:
            raise DeadlineExceeded(
                f"the engine process did not answer within {self.timeout_s:.0f} s"
            ) from None
        if reply.status != 200:
            raise EngineError(reply.status, reply.title, reply.message, reply.headers)
        return reply.output, reply.cold_start

    def refuse(self, model_id: str, status: int) -> None:
        self._queue(frames.encode_refusal(0, model_id, status))

    async def describe(self, model_id: str) -> ModelInfo | None:
        key = next(self._ids).to_bytes(8, "little")
        message = [DESCRIBE, key, model_id.encode()]
        described = await self._wait(key, lambda: self._send(message))
        return None if described is None else model_info(described)

    async def forward_call(self, call: Call) -> Answer:
        key = next(self._ids).to_bytes(8, "little")
        message = [CALL, key, *encode_call(call)]
        try:
            return await self._wait(key, lambda: self._send(message))
        except TimeoutError:
            message_text = f"the engine process did not answer within {self.timeout_s:.0f} s"
            if call.kind == "infer":
                return v2_error(504, message_text)
            return problem(504, "Deadline exceeded", message_text)

    # The whole call, as before (tests and callers that hold a client).
    __call__ = forward_call

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._pump is not None:
            self._pump.close()
        if self._socket is not None:
            self._socket.close()


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class EngineProxy:
    """ASGI: every route that is not hot, forwarded to the engine process's HTTP port."""

    def __init__(self, base_url: str, client: EngineClient) -> None:
        self.base_url = base_url
        self.client = client
        self._http: Any = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        import httpx

        try:
            # No limit here: the engine's app applies its own and answers as it always does.
            body = await read_body(receive, None, limit=None)
        except ConnectionResetError:
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP]
        url = self.base_url + scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            response = await self._http.request(scope["method"], url, headers=headers, content=body)
        except httpx.TransportError as exc:
            message = f"the engine process is not answering: {exc}"
            await send_answer(send, v2_error(503, message, {"Retry-After": "1"}))
            return
        forwarded = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
        forwarded.append((b"content-length", str(len(response.content)).encode()))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": forwarded}
        )
        await send({"type": "http.response.body", "body": response.content})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._http = httpx.AsyncClient(
                    timeout=ANSWER_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=16)
                )
                await self.client.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.close()
                await self._http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def run_front_end(fd: int, engine_url: str, engine_address: str) -> None:
    import uvicorn

    client = EngineClient(engine_address)
    app = FastPath(EngineProxy(engine_url, client), FrontEnd(client))
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(
        app,
        log_level=settings.current().server.log_level,
        timeout_graceful_shutdown=30,
        lifespan="on",
        # Nothing reads the client's address: no X-Forwarded-For parsing per request.
        proxy_headers=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


def front_end_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.http.workers", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the shared listening socket")
    parser.add_argument("--engine-url", required=True, help="the engine process's HTTP URL")
    parser.add_argument("--engine-address", required=True, help="its ZeroMQ address")
    args = parser.parse_args(argv)
    settings.use_serial_tokenizers()
    run_front_end(args.fd, args.engine_url, args.engine_address)


# ------------------------------------------------------------------------ the engine's side


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class FrontEnds:
    """The front-end processes of one engine process: started once the engine's HTTP port
    answers, restarted when one dies, stopped (gracefully) before the engine stops."""

    def __init__(self, count: int, sock: socket.socket, engine_url: str, address: str) -> None:
        self.count = count
        self.sock = sock
        self.engine_url = engine_url
        self.address = address
        self.processes: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="front-ends", daemon=True)

    def _spawn(self) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "serving.http.workers",
            "--fd",
            str(self.sock.fileno()),
            "--engine-url",
            self.engine_url,
            "--engine-address",
            self.address,
        ]
        return subprocess.Popen(
            command, pass_fds=(self.sock.fileno(),), preexec_fn=_die_with_parent
        )

    def start(self) -> None:
        self.processes = [self._spawn() for _ in range(self.count)]
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for index, process in enumerate(self.processes):
                if process.poll() is not None and not self._stopping.is_set():
                    logger.warning(
                        "front end %d exited with %s; restarting", index, process.returncode
                    )
                    self.processes[index] = self._spawn()

    def stop(self, timeout_s: float = 35.0) -> None:
        self._stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the engine process dies, however it dies, so no
    front end outlives it holding the public port."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def engine_address(directory: Path | None = None) -> str:
    base = directory or Path(tempfile.gettempdir())
    return f"ipc://{base}/myriad-engine-{os.getpid()}.sock"


if __name__ == "__main__":
    front_end_main()
