"""A chat-completions request, checked and turned into a Job before any model work.

The limits live in server_policy.ServerLimits (the CLI's `serve` flags read their defaults from it); each is
checked in order of cost, so a request that is too big is refused in milliseconds: the body's
size (while it is read), the number of messages and media, the text's least possible token count
against the context, the images' pixels from their headers. Every field a request sets is
honoured or refused with a 400 that names it; none is silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .chat import IMAGE, render_messages
from .errors import InvalidArgumentError
from .model import VisionModel
from .sampling import FLOAT32_MAX, SamplingParams
from .server_policy import MediaAccess, RequestError, ServerLimits, image_pixels, media_bytes
from .video import Video
from .visionpulse import VisionPulse

INT32_MAX = 2**31 - 1
MAX_STOP = 4  # as OpenAI: up to four stop sequences


# OpenAI fields this server does not implement: a request that sets them to anything but their
# no-op value is refused rather than answered as if they had been applied
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


@dataclass
class Job:
    """What the model is to do for one request."""

    prompt: str
    media: list[Any]
    max_tokens: int
    sampling: SamplingParams
    visionpulse: VisionPulse | None
    stream: bool = False
    cache_prompt: bool = True
    stop: list[str] = field(default_factory=list)


@dataclass
class Defaults:
    """The server's own settings, which a request may refine: `serve`'s flags."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    visionpulse: VisionPulse | None = None
    video: Video = field(default_factory=lambda: Video(b"-"))
    stop: list[str] = field(default_factory=list)


def number(body: dict, key: str, typ: type, default: Any, lo: float, hi: float) -> Any:
    """body[key] as an int or a finite float in [lo, hi]; a bool, a string, NaN or an out-of-range
    integer (never wrapped) is refused."""
    v = body.get(key, default)
    if v is None:
        return default
    want = "number" if typ is float else "integer"
    ok = isinstance(v, (int, float)) if typ is float else isinstance(v, int)
    if isinstance(v, bool) or not ok:
        raise RequestError(f'"{key}" must be a {want}')
    if not math.isfinite(v) or v < lo or v > hi:
        raise RequestError(f'"{key}" must be a {want} in [{lo:g}, {hi:g}]')
    return typ(v)


def flag(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise RequestError(f'"{key}" must be true or false')
    return v


def _text(s: str, where: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{where}: the text holds a lone surrogate (not valid Unicode)") from None
    return s


def parse_visionpulse(v: Any, default: VisionPulse | None, n_layer: int) -> VisionPulse | None:
    if v is None:
        return default
    if isinstance(v, (int, str)) and not isinstance(v, bool):
        try:
            return VisionPulse.parse(v)
        except ValueError as e:
            raise RequestError(str(e)) from None
    if not isinstance(v, dict):
        raise RequestError('"visionpulse" must be 5, 10, "off" or an object of VisionPulse settings')
    known = {f.name: f for f in fields(VisionPulse)}
    unknown = set(v) - (set(known) - {"forced"})
    if unknown:
        raise RequestError(f"unknown visionpulse field(s) {sorted(unknown)}; known: {sorted(set(known) - {'forced'})}")
    for k, x in v.items():  # JSON types checked here, so that C never sees a wrapped integer
        if isinstance(x, bool) and k not in ("prune_anchor", "lagged", "prune_swa"):
            raise RequestError(f"visionpulse.{k} must not be true/false")
        if isinstance(x, int) and not isinstance(x, bool) and not -INT32_MAX <= x <= INT32_MAX:
            raise RequestError(f"visionpulse.{k} is out of range")
        if isinstance(x, float) and not math.isfinite(x):
            raise RequestError(f"visionpulse.{k} must be finite")
    for k in ("anchor_layer", "first_pruned_layer"):
        x = v.get(k)
        if x is not None and (not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < n_layer):
            raise RequestError(f"visionpulse.{k} must be an integer in [0, {n_layer - 1}]")
    try:
        vp = VisionPulse(**v)
        vp.check()
    except (TypeError, ValueError) as e:
        raise RequestError(f"visionpulse: {e}") from None
    return vp


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(f'"stop" must be a non-empty string or a list of at most {MAX_STOP} of them')
    return [_text(s, "stop") for s in stops]


def _refuse_unsupported(body: dict) -> None:
    for k, noop in UNSUPPORTED.items():
        if k in body and body[k] not in noop:
            raise RequestError(f'"{k}" is not supported by this server')
    if body.get("n", 1) != 1:
        raise RequestError('"n" must be 1: this server generates one choice per request')
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}):
        raise RequestError('"stream_options" may only hold "include_usage"')


def _response_schema(rf: Any) -> dict[str, Any] | None:
    """The JSON schema an OpenAI "response_format" asks for (None for text), as llama.cpp's server
    reads it: json_object is any object unless it carries a "schema"; json_schema wraps the schema."""
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.get("schema", {"type": "object"})
    elif kind == "json_schema":
        wrapper = rf.get("json_schema", {})
        schema = wrapper.get("schema", {"type": "object"}) if isinstance(wrapper, dict) else None
    else:
        raise RequestError(
            '"response_format" must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"schema": {...}}}'
        )
    return _schema(schema, '"response_format": the schema')


def _schema(schema: Any, what: str) -> dict[str, Any]:
    """A request's JSON schema: an object; an empty one is any object, as llama.cpp's server has it."""
    if not isinstance(schema, dict):
        raise RequestError(f"{what} must be a JSON object")
    return schema or {"type": "object"}


def _constraint(body: dict, d: SamplingParams) -> tuple[str | None, dict[str, Any] | str | None]:
    """(grammar, json_schema) of a request: "response_format" (OpenAI's), or llama.cpp's server's own
    "json_schema" and "grammar" fields; one of them at most. None set: the server's own (`serve`'s flags)."""
    schema = _response_schema(body.get("response_format"))
    asked = {"response_format": schema, "json_schema": body.get("json_schema"), "grammar": body.get("grammar")}
    given = [k for k, v in asked.items() if v is not None]
    if len(given) > 1:
        raise RequestError(f"give one of {', '.join(given)}: each constrains the whole reply")
    if "grammar" in given:
        if not isinstance(body["grammar"], str):
            raise RequestError('"grammar" must be a string of GBNF')
        return _text(body["grammar"], "grammar"), None
    if "json_schema" in given:
        return None, _schema(body["json_schema"], '"json_schema"')
    if schema is not None:
        return None, schema
    return d.grammar, d.json_schema


def check_shape(body: Any, limits: ServerLimits) -> list[dict[str, Any]]:
    """The cheap checks: the body is an object, the messages a list within the limit."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list')
    if len(messages) > limits.max_messages:
        raise RequestError(f"{len(messages)} messages: more than the server's limit of {limits.max_messages}")
    _refuse_unsupported(body)
    return messages


def _video(part: dict, defaults: Video, access: MediaAccess) -> Video:
    """A video_url part (vLLM's convention): "fps" and "max_frames" may refine the server's
    settings, never raise its frame cap."""
    vu = part.get("video_url")
    url = vu.get("url") if isinstance(vu, dict) else vu
    opts = vu if isinstance(vu, dict) else {}
    fps = number(opts, "fps", float, defaults.fps, 0.01, 120)
    max_frames = number(opts, "max_frames", int, defaults.max_frames, 1, defaults.max_frames)
    return replace(defaults, source=media_bytes(url, "video", access), fps=fps, max_frames=max_frames)


def parse_messages(
    model: VisionModel,
    messages: list[Any],
    video: Video,
    limits: ServerLimits,
    access: MediaAccess,
) -> tuple[str, list[Any]]:
    """OpenAI messages -> (prompt in the model's chat template, images and videos in order)."""
    out: list[dict[str, Any]] = []
    media: list[Any] = []
    pixels = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role")
        c = m.get("content")
        content: str | list[Any]
        if isinstance(c, str):
            content = _text(c, f"messages[{i}]")
        elif isinstance(c, list):
            content = []
            for j, p in enumerate(c):
                where = f"messages[{i}].content[{j}]"
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    content.append(_text(p["text"], where))
                    continue
                if kind not in ("image_url", "video_url"):
                    raise RequestError(f"{where}: parts are objects of type text, image_url or video_url")
                if len(media) >= limits.max_media:
                    raise RequestError(f"more than the server's limit of {limits.max_media} images and videos")
                if kind == "image_url":
                    data, n = _image(p, len(media), access, limits)
                    pixels += n
                    if pixels > limits.max_pixels:
                        raise RequestError(
                            f"the images hold more than the server's limit of {limits.max_pixels:,} pixels"
                        )
                    media.append(data)
                else:
                    media.append(_video(p, video, access))
                content.append(IMAGE)
        elif c is None:
            content = ""
        else:
            raise RequestError(f"messages[{i}].content must be a string or a list of parts")
        out.append({"role": _text(m["role"], f"messages[{i}].role"), "content": content})
    return render_messages(model, out), _share_pixels(media, limits.max_pixels - pixels)


def _image(part: dict, index: int, access: MediaAccess, limits: ServerLimits) -> tuple[bytes, int]:
    """An image_url part's bytes and pixel count (from the header: nothing is decoded here)."""
    iu = part.get("image_url")
    data = media_bytes(iu.get("url") if isinstance(iu, dict) else iu, "image", access)
    n = image_pixels(data, index, limits.max_image_pixels)
    if n > limits.max_image_pixels:
        raise RequestError(f"image {index}: {n:,} pixels, more than the server's limit of {limits.max_image_pixels:,}")
    return data, n


def _share_pixels(media: list[Any], left: int) -> list[Any]:
    """The videos share what the images left of the request's pixels: each is refused, before its
    frames are decoded, if its frames would take more than its share."""
    videos = [i for i, m in enumerate(media) if isinstance(m, Video)]
    for i in videos:
        media[i] = replace(media[i], max_pixels=max(1, left // len(videos)))
    return media


def check_text_fits(messages: list[dict[str, Any]], n_ctx: int, max_piece_bytes: int) -> None:
    """Refuse, before tokenizing, a text that cannot fit: no token is longer than the vocab's longest
    piece, so the text's bytes over that length are fewer tokens than it will take."""
    n_bytes = 0
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        parts = [c] if isinstance(c, str) else c if isinstance(c, list) else []
        for p in parts:
            t = p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None
            if isinstance(t, str):
                n_bytes += len(t.encode("utf-8", errors="replace"))
    least = n_bytes // max(1, max_piece_bytes)
    if least > n_ctx:
        raise RequestError(f"the messages hold at least {least:,} tokens of text: more than the context of {n_ctx:,}")


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of the model, read once when the server starts."""

    n_ctx: int
    n_layer: int
    max_piece_bytes: int  # the vocab's longest token, in bytes

    @classmethod
    def of(cls, model: VisionModel) -> ModelFacts:
        from ._libs import llama_cpp as L

        longest = max((len(model.token_to_bytes(t)) for t in range(model.n_vocab)), default=1)
        return cls(model.n_ctx, int(L.llama_model_n_layer(model._model)), max(1, longest))


def parse_request(
    model: VisionModel, body: Any, defaults: Defaults, limits: ServerLimits, access: MediaAccess, facts: ModelFacts
) -> Job:
    """A request body -> a Job, or a RequestError naming what to fix."""
    messages = check_shape(body, limits)
    check_text_fits(messages, facts.n_ctx, facts.max_piece_bytes)
    d = defaults.sampling
    max_tokens = number(body, "max_tokens", int, defaults.max_tokens, 1, INT32_MAX)
    max_tokens = number(body, "max_completion_tokens", int, max_tokens, 1, INT32_MAX)
    grammar, schema = _constraint(body, d)
    sampling = SamplingParams(
        temperature=number(body, "temperature", float, d.temperature, 0, 5),
        top_p=number(body, "top_p", float, d.top_p, 0, 1),
        top_k=number(body, "top_k", int, d.top_k, 0, INT32_MAX),
        min_p=number(body, "min_p", float, d.min_p, 0, 1),
        seed=number(body, "seed", int, d.seed, 0, 2**32 - 1),
        repeat_penalty=number(body, "repeat_penalty", float, d.repeat_penalty, 0, FLOAT32_MAX),
        repeat_last_n=number(body, "repeat_last_n", int, d.repeat_last_n, 0, INT32_MAX),
        presence_penalty=number(body, "presence_penalty", float, d.presence_penalty, -FLOAT32_MAX, FLOAT32_MAX),
        frequency_penalty=number(body, "frequency_penalty", float, d.frequency_penalty, -FLOAT32_MAX, FLOAT32_MAX),
        grammar=grammar,
        json_schema=schema,
    )
    try:
        model.check_sampling(sampling)  # a grammar that does not parse is a 400 now, not after the queue
    except InvalidArgumentError as e:
        raise RequestError(str(e)) from None
    job = Job(
        prompt="",
        media=[],
        max_tokens=max_tokens,
        sampling=sampling,
        visionpulse=parse_visionpulse(body.get("visionpulse"), defaults.visionpulse, facts.n_layer),
        stream=flag(body, "stream", False),
        cache_prompt=flag(body, "cache_prompt", True),
        stop=_stop(body.get("stop")) if body.get("stop") is not None else list(defaults.stop),
    )
    job.prompt, job.media = parse_messages(model, messages, defaults.video, limits, access)
    return job
