"""An OpenAI-compatible server: `vp-gguf serve` (FastAPI + uvicorn).

    POST /v1/chat/completions   messages with text, image_url and video_url parts (data: or
                                file: URLs; a video_url may add "fps" and "max_frames", the latter
                                at most the server's), stream or not; extra body fields
                                "visionpulse": 5 | 10 | "off" | {"mode": ..., "ratio": ..., ...}
                                (default: the server's --visionpulse) and "cache_prompt" (default
                                true, as llama.cpp's server: the KV of the previous request's
                                common prefix is kept, so a conversation's images are encoded once)
    GET  /v1/models

One model serves one request at a time; others wait in a queue (bounded: beyond
--max-queue they get 503). A request's settings never outlive it. Errors follow
OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import base64
import json
import queue
import threading
import time
import uuid
from dataclasses import fields, replace
from typing import Any
from urllib.parse import unquote, urlparse

from .chat import IMAGE, render_messages
from .errors import VPGGUFError
from .model import VisionModel
from .sampling import DEFAULTS as SAMPLING
from .sampling import SamplingParams
from .video import Video
from .visionpulse import VisionPulse

MAX_IMAGE_BYTES = 20 << 20
MAX_VIDEO_BYTES = 200 << 20


class RequestError(ValueError):
    """A bad request (HTTP 400) with a message that says what to fix."""


def _vp_from_body(v: Any, default: VisionPulse | None) -> VisionPulse | None:
    if v is None:
        return default
    if isinstance(v, (int, str)) and not isinstance(v, bool):
        try:
            return VisionPulse.parse(v)
        except ValueError as e:
            raise RequestError(str(e)) from None
    if isinstance(v, dict):
        known = {f.name for f in fields(VisionPulse)} - {"forced"}
        unknown = set(v) - known
        if unknown:
            raise RequestError(f"unknown visionpulse field(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            vp = VisionPulse(**v)
            vp.check()
        except (TypeError, ValueError) as e:
            raise RequestError(f"visionpulse: {e}") from None
        return vp
    raise RequestError('"visionpulse" must be 5, 10, "off" or an object of VisionPulse settings')


def _media_bytes(url: Any, kind: str = "image", limit: int = MAX_IMAGE_BYTES) -> bytes:
    if not isinstance(url, str):
        raise RequestError(f"{kind}_url.url must be a string")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise RequestError(f"data: {kind} URLs must be base64")
        if len(data) > limit * 4 // 3 + 4:
            raise RequestError(f"{kind} larger than {limit >> 20} MB")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise RequestError(f"data: {kind} URL is not valid base64") from None
    if url.startswith("file://"):
        path = unquote(urlparse(url).path)
        try:
            with open(path, "rb") as f:
                b = f.read(limit + 1)
        except OSError as e:
            raise RequestError(f"cannot read {kind} {path}: {e.strerror}") from None
        if len(b) > limit:
            raise RequestError(f"{kind} larger than {limit >> 20} MB")
        return b
    raise RequestError(f"{kind} URLs must be data: (base64) or file:// URLs; this server fetches nothing remote")


def _video(part: Any, defaults: Video) -> Video:
    """A video_url part (vLLM's convention) -> a Video; "fps" and "max_frames" may refine the
    server's settings, never raise its frame cap."""
    vu = part.get("video_url")
    url = vu.get("url") if isinstance(vu, dict) else vu
    opts = vu if isinstance(vu, dict) else {}
    fps = _num(opts, "fps", float, defaults.fps, 0.01, 120)
    max_frames = _num(opts, "max_frames", int, defaults.max_frames, 1, defaults.max_frames)
    return replace(defaults, source=_media_bytes(url, "video", MAX_VIDEO_BYTES), fps=fps, max_frames=max_frames)


def parse_messages(model: VisionModel, messages: Any, video: Video | None = None) -> tuple[str, list[Any]]:
    """OpenAI messages -> (prompt in the model's chat template, images and videos in order);
    ``video`` holds the server's video settings (its source is unused)."""
    video = video or Video(b"-")
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list')
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role")
        c = m.get("content")
        content: str | list[Any]
        if isinstance(c, str):
            content = c
        elif isinstance(c, list):
            parts = []
            for j, p in enumerate(c):
                if not isinstance(p, dict):
                    raise RequestError(f"messages[{i}].content[{j}] must be an object")
                if p.get("type") == "text" and isinstance(p.get("text"), str):
                    parts.append(p["text"])
                elif p.get("type") == "image_url":
                    iu = p.get("image_url")
                    images.append(_media_bytes(iu.get("url") if isinstance(iu, dict) else iu))
                    parts.append(IMAGE)
                elif p.get("type") == "video_url":
                    images.append(_video(p, video))
                    parts.append(IMAGE)
                else:
                    raise RequestError(f"messages[{i}].content[{j}]: parts are text, image_url or video_url")
            content = parts
        elif c is None:
            content = ""
        else:
            raise RequestError(f"messages[{i}].content must be a string or a list of parts")
        out.append({"role": m["role"], "content": content})
    return render_messages(model, out), images


def _num(body: dict, key: str, typ, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if typ is float else int):
        raise RequestError(f'"{key}" must be a {"number" if typ is float else "integer"}')
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f'"{key}" must be in [{lo}, {hi}]')
    return typ(v)


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


def create_app(
    model: VisionModel,
    name: str,
    default_vp: VisionPulse | None = None,
    max_queue: int = 16,
    video: Video | None = None,
):
    """The app; ``video`` holds the video settings (fps, frame cap, timestamps, ffmpeg folder)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="vp-gguf", version="1")
    lock = threading.Lock()  # one generation at a time on the one model
    waiting = {"n": 0}
    waiting_lock = threading.Lock()

    def err(status: int, msg: str, typ: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": msg, "type": typ, "param": None, "code": None}}, status_code=status)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vp-gguf"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return err(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return err(400, "the body must be a JSON object")
        try:
            prompt, images = parse_messages(model, body.get("messages"), video)
            max_tokens = _num(body, "max_tokens", int, 256, 1, model.n_ctx)
            if "max_completion_tokens" in body:
                max_tokens = _num(body, "max_completion_tokens", int, max_tokens, 1, model.n_ctx)
            sampling = SamplingParams(
                temperature=_num(body, "temperature", float, SAMPLING.temperature, 0, 5),
                top_p=_num(body, "top_p", float, SAMPLING.top_p, 0, 1),
                top_k=_num(body, "top_k", int, SAMPLING.top_k, 0, 10**6),
                min_p=_num(body, "min_p", float, SAMPLING.min_p, 0, 1),
                seed=_num(body, "seed", int, SAMPLING.seed, 0, 2**32 - 1),
            )
            vp = _vp_from_body(body.get("visionpulse"), default_vp)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError('"stream" must be true or false')
            cache_prompt = body.get("cache_prompt", True)
            if not isinstance(cache_prompt, bool):
                raise RequestError('"cache_prompt" must be true or false')
        except RequestError as e:
            return err(400, str(e))
        except VPGGUFError as e:
            return err(400, str(e))
        with waiting_lock:
            if waiting["n"] >= max_queue:
                return err(503, f"{max_queue} requests already waiting; retry later", "server_busy")
            waiting["n"] += 1
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def work():
            try:
                with lock:
                    with waiting_lock:
                        waiting["n"] -= 1
                    it = model.stream(
                        prompt,
                        images=images,
                        max_tokens=max_tokens,
                        sampling=sampling,
                        chat_template=False,
                        visionpulse=vp,
                        cache_prompt=cache_prompt,
                    )
                    for p in it:
                        if cancel.is_set():  # the client left: stop generating
                            it.close()
                            break
                        pieces.put(("piece", p))
                    pieces.put(("done", model.last_result))
            except Exception as e:  # noqa: BLE001 - a VPGGUFError or anything else: never a dead server
                pieces.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        loop = asyncio.get_running_loop()

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            c = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        def finish_reason(res) -> str:
            return "length" if res is not None and res.stop_reason in ("length", "context") else "stop"

        if not stream:
            text = []
            while True:
                kind, val = await loop.run_in_executor(None, pieces.get)
                if kind == "piece":
                    text.append(val)
                elif kind == "error":
                    status = 400 if isinstance(val, VPGGUFError) else 500
                    return err(status, str(val), "invalid_request_error" if status == 400 else "server_error")
                else:
                    res = val
                    break
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "finish_reason": finish_reason(res),
                    }
                ],
                "usage": _usage(res),
            }

        first = await loop.run_in_executor(None, pieces.get)  # errors before any text are HTTP errors
        if first[0] == "error":
            status = 400 if isinstance(first[1], VPGGUFError) else 500
            return err(status, str(first[1]), "invalid_request_error" if status == 400 else "server_error")

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                kind, val = first
                while True:
                    if kind is None:
                        kind, val = await loop.run_in_executor(None, pieces.get)
                    if kind == "piece":
                        yield chunk({"content": val})
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': str(val), 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        yield chunk({}, finish_reason(val), _usage(val))
                        break
                    kind = None
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
