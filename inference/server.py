"""Websocket + msgpack policy server (spec 4.4) in front of one InferenceRuntime.

Transport as in the reference: no compression, no pings, on connect the server sends packb({}) (the
metadata), then one response per request; every response carries server_timing {infer_ms} plus,
from the second request of a connection on, prev_total_ms (the whole previous request, receive to
send). HTTP GET /healthz answers 200 "OK\\n" (without a token, so load balancers can probe it).

Hardening the reference lacks: the server binds 127.0.0.1 unless told otherwise; with a token it
refuses the websocket handshake (401, before any model work) unless the request carries
"Authorization: Bearer <token>" or the reference client's "Authorization: Api-Key <token>";
messages above max_message_bytes are refused by the websocket layer (close code 1009); decoding
never unpickles (protocol.py).

Errors. The reference sends the traceback as a text frame and closes the connection on any server
exception. Here a malformed request or one that does not fit the episode (ProtocolError,
EpisodeError) gets a text frame "error: ..." and the connection stays usable, so a client bug does
not cost the robot its session; only an unexpected server failure sends "internal error: ..." and
closes with 1011 (the traceback goes to the server log, not to the client). Reference clients raise
on any text response, so they see both.

Sessions. Every connection is one session: its own episode, KV cache, camera streams and noise
generator (`InferenceRuntime.new_session`: the weights and encoders are shared), so the reference
clients, which send no session id, need nothing new, and two robots on one server never see each
other's episode. At most `max_sessions` connections are served; a further handshake is refused with
503 and a message saying so (a handshake that races past that check is closed with 1013, try again
later), and the others keep serving. A session's cache goes with its connection: on disconnect,
even in the middle of a request, the session is dropped once the request in flight finishes; a reset
releases the cache's memory until the next forward.

Scheduling (scheduling.py, chosen once per server). Each session's requests run in a worker thread
of its own (one per possible session), so the event loop keeps answering /healthz and handshakes.
With `batch_sessions` (by default on when the model runs on CUDA) the sessions share one
ForwardBatcher (batching.py): a model forward waits until every request in progress has one waiting
too, or `batch_wait_ms` has passed, and forwards of the same token counts then run as one model
call; a lone session never waits. Without it, up to `parallel_requests` requests run at once, each
forward alone (by default on a CPU the cores over torch's intra-op threads, so at one thread per
core, one request at a time).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from .protocol import Feedback, Imagine, Infer, ProtocolError, Reset, packb, parse_request, unpackb
from .runtime import EpisodeError, InferenceRuntime
from .scheduling import SessionScheduling
from .settings import DEFAULT_PORT

log = logging.getLogger(__name__)


# The schemes a client may name its token with: the common "Bearer" and the reference client's "Api-Key".
TOKEN_SCHEMES = ("bearer", "api-key")


def token_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header value carries `token` under one of TOKEN_SCHEMES. The scheme
    is case-insensitive (as HTTP auth schemes are); the token is compared in constant time, so a
    wrong guess learns nothing from how long the refusal took."""
    scheme, _, given = authorization.strip().partition(" ")
    matches = hmac.compare_digest(given.strip().encode(), token.encode())
    return scheme.lower() in TOKEN_SCHEMES and matches


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    token: str | None = None
    max_message_bytes: int = 64 << 20
    max_sessions: int = 4  # concurrent connections, each with its own episode and KV cache
    # Concurrent sessions' forwards in shared model calls (batching.py); None: on when the model runs
    # on CUDA. batch_wait_ms: how long a forward waits for the others to join its call.
    batch_sessions: bool | None = None
    batch_wait_ms: float = 5.0
    # Without batching, requests of different sessions run at once; None: the CPU's cores over torch's
    # intra-op threads, 1 on CUDA (scheduling.py).
    parallel_requests: int | None = None


class PolicyServer:
    """Serves sessions of `runtime` over websockets (each connection runs its episode on
    `runtime.new_session()`); see the module docstring for the protocol, sessions and error policy."""

    def __init__(self, runtime: InferenceRuntime, options: ServerOptions) -> None:
        if options.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {options.max_sessions}")
        if options.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {options.batch_wait_ms}")
        self.runtime = runtime
        self.options = options
        self.sessions: dict[int, InferenceRuntime] = {}  # by session id, one per open connection
        self.scheduling = SessionScheduling.choose(
            runtime.device, batch=options.batch_sessions, parallel=options.parallel_requests,
            batch_wait_s=options.batch_wait_ms / 1000.0, sessions=options.max_sessions)
        self._workers: ThreadPoolExecutor | None = None  # one thread per session, while serving
        self._session_ids = itertools.count(1)

    async def serve(self, on_ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (forever without one); `on_ready(port)` once listening."""
        with ThreadPoolExecutor(self.options.max_sessions, thread_name_prefix="lbva-session") as workers:
            self._workers = workers
            await self._listen(on_ready, stop)

    async def _listen(self, on_ready: Callable[[int], None] | None, stop: asyncio.Event | None) -> None:
        async with serve(
            self._session, self.options.host, self.options.port, compression=None, ping_interval=None,
            max_size=self.options.max_message_bytes, process_request=self._process_request,
        ) as server:
            port = server.sockets[0].getsockname()[1]
            log.info("serving on ws://%s:%d (%s)", self.options.host, port, self.scheduling.describe())
            if on_ready is not None:
                on_ready(port)
            await (stop.wait() if stop is not None else asyncio.Future())

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.options.token is not None and not token_matches(request.headers.get("Authorization", ""),
                                                                 self.options.token):
            return connection.respond(HTTPStatus.UNAUTHORIZED,
                                      "missing or wrong token (Authorization: Bearer or Api-Key <token>)\n")
        if self._full():
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, self._full_message() + "\n")
        return None

    def _full(self) -> bool:
        return len(self.sessions) >= self.options.max_sessions

    def _full_message(self) -> str:
        return (f"the server already serves its maximum of {self.options.max_sessions} sessions "
                "(--max-sessions); retry when one disconnects")

    async def _session(self, connection: ServerConnection) -> None:
        if self._full():  # another handshake got past _process_request first
            await connection.close(CloseCode.TRY_AGAIN_LATER, self._full_message())
            return
        session_id = next(self._session_ids)
        runtime = self.sessions[session_id] = self.runtime.new_session(self.scheduling.batcher)
        try:
            await self._serve_session(connection, runtime)
        finally:
            del self.sessions[session_id]

    async def _serve_session(self, connection: ServerConnection, runtime: InferenceRuntime) -> None:
        try:
            await connection.send(packb({}))
            previous_total_ms: float | None = None
            async for message in connection:
                started = time.perf_counter()
                answer = await self._answer(connection, runtime, message)
                if answer is None:
                    continue
                response, infer_ms = answer
                timing = {"infer_ms": infer_ms}
                if previous_total_ms is not None:
                    timing["prev_total_ms"] = previous_total_ms
                response["server_timing"] = timing
                await connection.send(packb(response))
                previous_total_ms = (time.perf_counter() - started) * 1000.0
        except ConnectionClosed:
            return

    async def _answer(self, connection: ServerConnection, runtime: InferenceRuntime, message: str | bytes
                      ) -> tuple[dict, float] | None:
        """(response map, milliseconds the runtime took), or None after an error frame."""
        try:
            if isinstance(message, str):
                raise ProtocolError("requests are binary msgpack frames, not text")
            request = parse_request(unpackb(message), runtime.cameras.layout.keys)
            started = time.perf_counter()
            work = functools.partial(self._handle, runtime, request)
            response = await asyncio.get_running_loop().run_in_executor(self._workers, work)
            return response, (time.perf_counter() - started) * 1000.0
        except (ProtocolError, EpisodeError) as error:
            await connection.send(f"error: {error}")
            return None
        except Exception as error:  # a server bug: report it, end this connection, keep serving others
            log.exception("request failed")
            await connection.send(f"internal error: {type(error).__name__}: {error}")
            await connection.close(CloseCode.INTERNAL_ERROR, "internal error")
            return None

    def _handle(self, runtime: InferenceRuntime, request: Reset | Infer | Feedback | Imagine) -> dict[str, Any]:
        """One request, in a session's worker thread, in its turn (scheduling.py)."""
        with self.scheduling.request():
            return _handle(runtime, request)


def _handle(runtime: InferenceRuntime, request: Reset | Infer | Feedback | Imagine) -> dict[str, Any]:
    if isinstance(request, Imagine):
        latents, actions = runtime.imagine(request.observation, request.prompt, request.chunks)
        frames = runtime.decode(latents)
        reply = {"latents": latents.float().numpy(), "action": actions}
        return reply if frames is None else {**reply, "frames": frames}
    if isinstance(request, Reset):
        runtime.reset(request.prompt)
        return {}
    if isinstance(request, Infer):
        return {"action": runtime.infer(request.observation)}
    runtime.feedback(request.keyframes, request.executed)
    return {}


class BackgroundServer:
    """A PolicyServer on its own thread and event loop (tests, benchmarks, embedding in a process)."""

    def __init__(self, runtime: InferenceRuntime, options: ServerOptions) -> None:
        self.server = PolicyServer(runtime, options)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="lbva-policy-server", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(port: int) -> None:
                self.port = port
                self._ready.set()

            await self.server.serve(ready, self._stop)

        try:
            asyncio.run(main())
        except BaseException as error:  # a failure before listening (e.g. the port is taken) goes to __enter__
            self._failure = error
            self._ready.set()
