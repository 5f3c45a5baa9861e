"""What `vp-gguf serve` tells a load balancer and an operator: /health's state and /metrics' counts.

/health, as llama-server's: 200 {"status": "ok"} while a request would be taken, with the load
(`generating`, `waiting`, `queue_limit`). Busy is when the next chat request would be refused:
--max-queue requests already wait for the model (which is generating another). Then it answers 503
in llama-server's error shape ({"error": {"code": 503, "message", "type": "unavailable_error"}}),
so a balancer sends requests elsewhere. Generating with room in the queue is ok: a request would
wait, not fail. While `serve` loads the model every request, /health included, answers 503
{"status": "loading"} with llama-server's "Loading model" (server_loading.py); a model that lost
an RPC server answers 503 {"status": "error"} until the operator restarts it.

/metrics is Prometheus' text format. Where llama-server has a metric, ours has its name and meaning
with our prefix (`llamacpp:prompt_tokens_total` -> `vpgguf_prompt_tokens_total`), so a dashboard
made for one reads the other by changing the prefix. The prefix ends in "_", not ":", because
Prometheus keeps colons for recording rules. Throughput is a ratio of counters, e.g. in PromQL
rate(vpgguf_tokens_predicted_total[5m]) / rate(vpgguf_tokens_predicted_seconds_total[5m]), over the
scraper's own window (llama-server's throughput gauges restart at each read, so two scrapers would
cut each other's windows).

Counted: each chat request once, by how it ended (`outcome_of`); the tokens and seconds of each
generation that finished (a cancelled one leaves no result, so its partial work is not counted).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server imports this module; the result types are only read here
    from .result import GenerationResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format
PREFIX = "vpgguf_"
OUTCOMES = ("ok", "client_error", "server_error", "cancelled", "rejected")


def outcome_of(status: int, busy: bool = False) -> str:
    """A chat reply's HTTP status as the outcome it is counted under: 499 is our "the client left"
    (as nginx's); busy: the 503 of a full queue (the request was refused, not failed; a 503 of a
    model that lost its RPC server is a server error)."""
    if status == 499:
        return "cancelled"
    if busy:
        return "rejected"
    if status >= 500:
        return "server_error"
    return "client_error" if status >= 400 else "ok"


@dataclass(frozen=True)
class Load:
    """The model's queue at one moment."""

    generating: int  # 0 or 1: one model, one generation at a time
    waiting: int
    queue_limit: int

    @property
    def busy(self) -> bool:
        return self.waiting >= self.queue_limit


def loading_health() -> tuple[int, dict[str, Any]]:
    """/health's status and body (and every route's) while the model loads."""
    return 503, {"status": "loading", "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


def health(load: Load, broken: str | None = None) -> tuple[int, dict[str, Any]]:
    """/health's status and body; broken: why the model cannot generate any more (a lost RPC server)."""
    body: dict[str, Any] = {
        "status": "error" if broken else "busy" if load.busy else "ok",
        "generating": load.generating,
        "waiting": load.waiting,
        "queue_limit": load.queue_limit,
    }
    if broken:
        body["error"] = {"code": 503, "message": broken, "type": "unavailable_error"}
        return 503, body
    if not load.busy:
        return 200, body
    message = f"busy: {load.waiting} requests already wait for the model (the queue's limit); retry elsewhere or later"
    body["error"] = {"code": 503, "message": message, "type": "unavailable_error"}
    return 503, body


class ServerMetrics:
    """The counts since the server started. The request path adds (from the event loop and from the
    generation's thread), /metrics reads: one lock over all, so a reading is one consistent moment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = dict.fromkeys(OUTCOMES, 0)
        self._prompt_tokens = 0  # evaluated: the prompt less what the cache held
        self._prompt_cached = 0
        self._prompt_seconds = 0.0  # image encoding and prefill: the wait before the first token
        self._predicted = 0
        self._predicted_seconds = 0.0
        self._vp_requests = 0
        self._vp_steps = 0
        self._vp_visual = 0  # visual tokens each step could keep, summed over steps
        self._vp_kept = 0  # those it kept: kept / visual is the token-weighted mean retention
        self._vp_last_retention: float | None = None

    def count_reply(self, status: int, busy: bool = False) -> None:
        outcome = outcome_of(status, busy)
        with self._lock:
            self._requests[outcome] += 1

    def count_result(self, res: GenerationResult) -> None:
        t = res.timings
        report = res.visionpulse
        steps = report.steps if report is not None else []
        with self._lock:
            self._prompt_tokens += res.n_prompt_tokens - res.n_cached_tokens
            self._prompt_cached += res.n_cached_tokens
            self._prompt_seconds += (t.image_encode_ms + t.prefill_ms) / 1e3
            self._predicted += res.n_generated
            self._predicted_seconds += t.decode_ms / 1e3
            if report is not None and steps:
                self._vp_requests += 1
                self._vp_steps += len(steps)
                self._vp_visual += sum(s.n_visual for s in steps)
                self._vp_kept += sum(s.n_kept for s in steps)
                self._vp_last_retention = float(report.summary()["retention_mean"])

    def render(self, load: Load) -> str:
        """The Prometheus text: each metric's HELP and TYPE lines, then its samples."""
        with self._lock:
            families = self._families(load)
        lines: list[str] = []
        for name, kind, text, samples in families:
            if not samples:  # nothing to report yet (no VisionPulse request so far)
                continue
            lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
            lines += [f"{PREFIX}{name}{labels} {_number(v)}" for labels, v in samples]
        return "\n".join(lines) + "\n"

    def _families(self, load: Load) -> list[tuple[str, str, str, list[tuple[str, float]]]]:
        def one(v: float) -> list[tuple[str, float]]:
            return [("", v)]

        last = self._vp_last_retention
        return [
            (
                "requests_total",
                "counter",
                "Chat requests by how they ended (ok, client_error, server_error, cancelled, rejected: queue full)",
                [(f'{{outcome="{o}"}}', n) for o, n in self._requests.items()],
            ),
            (
                "prompt_tokens_total",
                "counter",
                "Prompt tokens evaluated, excluding cached tokens",
                one(self._prompt_tokens),
            ),
            ("prompt_tokens_cached_total", "counter", "Prompt tokens reused from the cache", one(self._prompt_cached)),
            (
                "prompt_seconds_total",
                "counter",
                "Time spent on prompts (image encoding and prefill)",
                one(self._prompt_seconds),
            ),
            ("tokens_predicted_total", "counter", "Tokens generated", one(self._predicted)),
            ("tokens_predicted_seconds_total", "counter", "Time spent generating tokens", one(self._predicted_seconds)),
            ("requests_processing", "gauge", "Requests generating now", one(load.generating)),
            ("requests_deferred", "gauge", "Requests waiting for the model", one(load.waiting)),
            ("requests_queue_limit", "gauge", "Requests that may wait (--max-queue)", one(load.queue_limit)),
            (
                "visionpulse_requests_total",
                "counter",
                "Finished requests that ran VisionPulse steps",
                one(self._vp_requests),
            ),
            (
                "visionpulse_steps_total",
                "counter",
                "VisionPulse decode steps, with any that skipped the selection (ran dense)",
                one(self._vp_steps),
            ),
            (
                "visionpulse_visual_tokens_total",
                "counter",
                "Visual tokens in context at each VisionPulse step, summed over steps",
                one(self._vp_visual),
            ),
            (
                "visionpulse_kept_tokens_total",
                "counter",
                "Visual tokens each VisionPulse step kept, summed over steps (kept / visual: mean retention)",
                one(self._vp_kept),
            ),
            (
                "visionpulse_last_retention_mean",
                "gauge",
                "Mean retention of the last request that ran VisionPulse steps (its usage.visionpulse.retention_mean)",
                [] if last is None else one(last),
            ),
        ]


def _number(v: float) -> str:
    """Integers as integers; floats in Python's shortest exact form (a valid Prometheus float)."""
    return str(v) if isinstance(v, int) else repr(float(v))
