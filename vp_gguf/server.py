"""An OpenAI-compatible server: `vp-gguf serve` (FastAPI + uvicorn).

    POST /v1/chat/completions   messages with text, image_url and video_url parts (data: URLs, or
                                file:// URLs under the operator's --media-path), stream or not; also
                                "stop", "seed", "max_completion_tokens", and extra fields
                                "visionpulse": 5 | 10 | "off" | {"mode": ..., "ratio": ..., ...}
                                (default: the server's --visionpulse) and "cache_prompt" (default
                                true, as llama.cpp's server: the KV of the previous request's
                                common prefix is kept, so a conversation's images are encoded once)
    GET  /v1/models
    GET  /health                (no key needed) 200 ready, 503 busy (the queue is full), with the load;
                                503 loading while `serve` loads the model, 503 error once an RPC server is lost
    GET  /metrics               Prometheus text, with --metrics (server_metrics.py says what is counted)

Who may call: with an API key (--api-key or VP_GGUF_API_KEY) every route but /health wants
"Authorization: Bearer <key>"; a server bound to loopback answers only requests whose Host header
names loopback (DNS rebinding) and takes only application/json bodies (a browser page cannot post
those cross-origin without a preflight this server never grants).

One model serves one request at a time; others wait in a queue (bounded: beyond --max-queue they
get 503). A request's settings never outlive it; a client that leaves is cancelled, waiting or
generating. Errors follow OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from .errors import ImageError, MediaLimitError, RpcError, VideoError, VPGGUFError
from .model import VisionModel
from .server_metrics import CONTENT_TYPE, Load, ServerMetrics, health
from .server_policy import RequestError, ServerLimits, media_root
from .server_request import Defaults, Job, ModelFacts, parse_messages, parse_request
from .video import Video
from .visionpulse import VisionPulse

__all__ = ["RequestError", "ServerLimits", "create_app", "is_loopback", "parse_messages"]

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
LEAVE_CHECK_S = 0.1  # how often a waiting handler asks whether its client is still there


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8080" -> "::1", "localhost:80" -> "localhost"."""
    if header.startswith("["):
        return header[1:].partition("]")[0].lower()
    return header.rpartition(":")[0].lower() if ":" in header else header.lower()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Access:
    """Who may call, and what they may read: `serve`'s --api-key, --host, --media-path and --docs."""

    api_key: str | None = None
    bind_host: str = "127.0.0.1"  # a loopback bind also checks the Host header
    media_path: str | None = None  # file:// URLs read only below it; None: refused
    docs: bool = False  # /docs and /openapi.json


@dataclass
class _Queue:
    """One generation at a time; at most ``limit`` requests wait for it."""

    limit: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: int = 0
    guard: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> bool:
        with self.guard:
            if self.waiting >= self.limit:
                return False
            self.waiting += 1
            return True

    def leave(self) -> None:
        with self.guard:
            self.waiting -= 1

    def load(self) -> Load:
        with self.guard:
            return Load(generating=int(self.lock.locked()), waiting=self.waiting, queue_limit=self.limit)


def _error(status: int, msg: str, typ: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": msg, "type": typ, "param": None, "code": None}}, status_code=status)


BUSY = "server_busy"  # the error type of a full queue's 503 (counted as rejected, not failed)
RPC_LOST = "the model lost one of its RPC servers: this server cannot generate until its operator restarts it"


def _public_message(e: BaseException) -> tuple[int, str]:
    """A worker's exception as (status, text) for the client: a decoder's message can quote the
    file it read, so image errors are told in our words; anything unexpected is not detailed."""
    if isinstance(e, RequestError):
        return e.status, str(e)
    if isinstance(e, MediaLimitError):  # our own words, naming the limit
        return 400, str(e)
    if isinstance(e, VideoError):
        if "ffmpeg" in str(e) and "not found" in str(e):  # the operator's to fix, not the client's
            return 501, "this server cannot read videos: ffmpeg is not installed on it"
        return 400, "a video of the request cannot be read as a video (unsupported or corrupt)"
    if isinstance(e, ImageError):
        return 400, "an image of the request cannot be decoded (unsupported or corrupt)"
    if isinstance(e, RpcError):  # the operator's to fix; the hosts behind the server are not the client's to see
        print(f"vp-gguf serve: {e}", file=sys.stderr)
        return 503, RPC_LOST
    if isinstance(e, (VPGGUFError, ValueError)):
        return 400, str(e)
    traceback.print_exception(e, file=sys.stderr)  # for the operator; the client learns nothing of it
    return 500, "internal error while generating (see the server's log)"


def _usage(res) -> dict[str, Any]:
    u: dict[str, Any] = {
        "prompt_tokens": res.n_prompt_tokens,
        "completion_tokens": res.n_generated,
        "total_tokens": res.n_prompt_tokens + res.n_generated,
        "prompt_tokens_details": {"cached_tokens": res.n_cached_tokens},
    }
    vp = res.visionpulse.usage() if res.visionpulse is not None else None
    if vp is not None:
        u["visionpulse"] = vp
    return u


def _finish_reason(res) -> str:
    return "length" if res is not None and res.stop_reason in ("length", "context") else "stop"


class _Generation:
    """One request's generation on a worker thread, its pieces handed to the event loop as they come
    (no executor thread is held while a request waits: a finished reply is sent when it is finished)."""

    def __init__(
        self, model: VisionModel, job: Job, queue: _Queue, stopping: threading.Event, metrics: ServerMetrics
    ) -> None:
        self.model, self.job, self.queue, self.stopping, self.metrics = model, job, queue, stopping, metrics
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self._pending: asyncio.Future | None = None
        self._next_check = self.loop.time() + LEAVE_CHECK_S
        threading.Thread(target=self._work, daemon=True).start()

    def _put(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone, nobody listens
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def _gone(self) -> bool:
        return self.cancel.is_set() or self.stopping.is_set()

    def _work(self) -> None:
        job = self.job
        try:
            while not self.queue.lock.acquire(timeout=0.1):
                if self._gone():  # left while waiting: never starts
                    self.queue.leave()
                    return
            try:
                self.queue.leave()
                if self._gone():
                    return
                it = cast(
                    Generator[str, None, None],
                    self.model.stream(
                        job.prompt,
                        images=job.media,
                        max_tokens=job.max_tokens,
                        sampling=job.sampling,
                        chat_template=False,
                        visionpulse=job.visionpulse,
                        cache_prompt=job.cache_prompt,
                        stop=job.stop,
                    ),
                )
                for piece in it:
                    if self._gone():
                        it.close()
                        return
                    self._put(("piece", piece))
                res = self.model.last_result
                if res is not None:
                    self.metrics.count_result(res)
                self._put(("done", res))
            finally:
                self.queue.lock.release()
        except BaseException as e:  # noqa: BLE001 - whatever it is, the server lives and the client hears
            self._put(("error", e))

    async def next(self) -> tuple[str, Any]:
        return await self.out.get()

    async def next_or_leave(self, request) -> tuple[str, Any] | None:
        """The next item, or None (and the generation cancelled) once the client has left: a client
        that gives up on a non-streaming reply frees the model as a streaming one does. The client is
        looked at every LEAVE_CHECK_S whether pieces keep coming or not (they come every few ms)."""
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self.out.get())
            wait = max(0.0, self._next_check - self.loop.time())
            done, _ = await asyncio.wait({self._pending}, timeout=wait)
            item: tuple[str, Any] | None = None
            if done:
                item, self._pending = self._pending.result(), None
                if item[0] != "piece" or self.loop.time() < self._next_check:
                    return item
            self._next_check = self.loop.time() + LEAVE_CHECK_S
            if await request.is_disconnected():
                self.cancel.set()
                if self._pending is not None:
                    self._pending.cancel()
                return None
            if item is not None:
                return item


def create_app(
    model: VisionModel,
    name: str,
    default_vp: VisionPulse | None = None,
    max_queue: int = 16,
    video: Video | None = None,
    *,
    sampling=None,
    max_tokens: int = 256,
    limits: ServerLimits | None = None,
    access: Access | None = None,
    stop: Sequence[str] = (),
    metrics: bool = False,
):
    """The app. ``sampling`` and ``max_tokens`` are the defaults a request may override (`serve`'s
    flags); ``video`` the video settings (fps, frame cap, timestamps, ffmpeg folder); ``limits`` what a
    request may ask; ``access`` who may call and which files file:// URLs may read; ``stop`` the stop strings
    of a request that sets none; ``metrics`` whether /metrics answers (`serve --metrics`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    limits = limits or ServerLimits()
    access = access or Access()
    defaults = Defaults(max_tokens=max_tokens, visionpulse=default_vp, video=video or Video(b"-"), stop=list(stop))
    if sampling is not None:
        defaults.sampling = sampling
    media = limits.media_access(media_root(access.media_path) if access.media_path else None)
    facts = ModelFacts.of(model)
    queue = _Queue(max_queue)
    counts = ServerMetrics()  # counted whether or not /metrics is on: it costs a lock per request
    stopping = threading.Event()
    hosts = LOOPBACK_NAMES if is_loopback(access.bind_host) else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        stopping.set()  # shutting down: generations stop at their next token

    app = FastAPI(
        title="vp-gguf",
        version="1",
        redoc_url=None,
        lifespan=lifespan,
        docs_url="/docs" if access.docs else None,
        openapi_url="/openapi.json" if access.docs else None,
    )
    app.state.stopping = stopping

    def refused(request: Request, public: bool = False):
        """Host, key and body type, checked before anything is read."""
        if hosts is not None and _host_name(request.headers.get("host") or "") not in hosts:
            return _error(403, "this server answers only requests addressed to localhost (Host header)")
        if access.api_key and not public:
            auth = request.headers.get("authorization") or ""
            given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key") or ""
            if not hmac.compare_digest(given.encode(), access.api_key.encode()):
                return _error(401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error")
        if request.method == "POST":
            ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _error(415, "the body must be application/json")
        return None

    async def read_body(request: Request) -> bytes:
        cap = limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise RequestError(f"the body is larger than the server's limit of {limits.max_body_mb:g} MB", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise RequestError(f"the body is larger than the server's limit of {limits.max_body_mb:g} MB", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def get_health(request: Request):  # async: answered on the event loop, never behind busy threads
        bad = refused(request, public=True)
        if bad is not None:
            return bad
        status, body = health(queue.load(), RPC_LOST if model.rpc_lost else None)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def get_metrics(request: Request):  # with the API key, as llama-server's /metrics
        bad = refused(request)
        if bad is not None:
            return bad
        if not metrics:
            return _error(404, "this server does not serve /metrics: start it with --metrics", "not_found_error")
        return PlainTextResponse(counts.render(queue.load()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    def models(request: Request):
        return refused(request) or {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vp-gguf"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        # each request counted once, by its outcome; a stream counts itself when it ends
        try:
            reply = await answer(request)
        except BaseException as e:
            counts.count_reply(499 if isinstance(e, asyncio.CancelledError) else 500)
            raise
        if isinstance(reply, JSONResponse):
            counts.count_reply(reply.status_code, busy=reply.status_code == 503 and BUSY.encode() in reply.body)
        elif not isinstance(reply, StreamingResponse):
            counts.count_reply(200)
        return reply

    async def answer(request: Request):
        bad = refused(request)
        if bad is not None:
            return bad
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise RequestError("the body is not valid JSON") from None
            # reading files and image headers, the chat template: off the event loop
            job = await asyncio.to_thread(parse_request, model, body, defaults, limits, media, facts)
        except RequestError as e:
            return _error(e.status, str(e))
        except Exception as e:  # noqa: BLE001 - a VPGGUFError, or a bug: a JSON error either way
            return _error(*_public_message(e))
        if not queue.enter():
            return _error(503, f"{queue.limit} requests already waiting; retry later", BUSY)
        gen = _Generation(model, job, queue, stopping, counts)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not job.stream:
            return await _whole(request, gen, rid, created, name)
        try:
            first = await gen.next_or_leave(request)
        except BaseException:
            gen.cancel.set()
            raise
        if first is None:
            return _error(499, "the client closed the request")
        if first[0] == "error":
            return _error(*_public_message(first[1]))
        events = _events(gen, first, rid, created, name, counts)
        return StreamingResponse(events, media_type="text/event-stream")

    return app


async def _whole(request, gen: _Generation, rid: str, created: int, name: str):
    text: list[str] = []
    try:
        while True:
            item = await gen.next_or_leave(request)
            if item is None:
                return _error(499, "the client closed the request")
            kind, val = item
            if kind == "piece":
                text.append(val)
            elif kind == "error":
                return _error(*_public_message(val))
            else:
                break
    finally:
        gen.cancel.set()  # a no-op once done; cancels if this handler is torn down
    res = val
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": _finish_reason(res),
            }
        ],
        "usage": _usage(res),
    }


async def _events(gen: _Generation, first: tuple[str, Any], rid: str, created: int, name: str, counts: ServerMetrics):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        c: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            c["usage"] = usage
        return f"data: {json.dumps(c)}\n\n"

    outcome = 499  # the status the stream counts as: ended before its last event, the client left
    try:
        yield chunk({"role": "assistant", "content": ""})
        kind, val = first
        while True:
            if kind == "piece":
                yield chunk({"content": val})
            elif kind == "error":
                status, msg = _public_message(val)
                outcome = status
                yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error', 'code': status}})}\n\n"
                break
            else:
                outcome = 200
                yield chunk({}, _finish_reason(val), _usage(val))
                break
            kind, val = await gen.next()
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel.set()  # the client left mid-stream, or the stream ended: either way, stop
        counts.count_reply(outcome)
