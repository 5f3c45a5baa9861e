"""Sampling settings: the one place their defaults live (the API, the CLI's flags and the server read them).

Light on purpose: the CLI builds its flags from these defaults without loading libllama. The argument
checks (``int_arg``, ``float_arg``) live here for the same reason: the model's and VisionPulse's settings
use them too.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# Below this a temperature samples as greedy. llama.cpp's temp sampler divides each logit by the
# temperature in float32 (llama_sampler_temp_impl: logit /= temp): at 1e-44 every logit over ~4e-6 becomes
# inf, the softmax NaN, and the draw random. 1e-6 keeps logit/temp finite for logits up to 3e32, and at
# 1e-6 a logit gap of 1e-4 already weighs exp(-100): the draw is the argmax in all but float noise.
MIN_TEMPERATURE = 1e-6
# llama.cpp reads the penalties as C floats: a finite double beyond this is +-inf there
FLOAT32_MAX = 3.4028234663852886e38


def int_arg(name: str, value: object, lo: int, hi: int, note: str = "") -> int:
    """``value`` as an int in [lo, hi]: a whole number (not a bool, float or string), never wrapped as a
    C integer would wrap it (2**32 + 300 is refused, not 300). ``note`` says where the bounds come from."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if not lo <= v <= hi:
        raise InvalidArgumentError(
            f"{name} is out of range: {v} is not in [{lo}, {hi}]" + (f" ({note})" if note else "")
        )
    return v


def float_arg(name: str, value: object, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a finite float in [lo, hi] (NaN and infinities refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{name} must be a finite number, got {v}")
    if not lo <= v <= hi:
        raise InvalidArgumentError(f"{name} is out of range: {v} is not in [{lo}, {hi}]")
    return v


@dataclass
class SamplingParams:
    """Token sampling. temperature <= 0 is greedy (argmax); so is one below MIN_TEMPERATURE.

    The penalties, with llama.cpp's names and defaults (all off): ``repeat_penalty`` divides a positive
    logit (multiplies a negative one) of each token seen in the last ``repeat_last_n`` tokens, the
    prompt's text included as llama.cpp's server counts it; ``frequency_penalty`` subtracts this much
    per time it was seen, ``presence_penalty`` this much once. ``grammar`` (GBNF, llama.cpp's grammar
    language, start symbol ``root``) or ``json_schema`` (a JSON schema, as a dict or its JSON text)
    constrain the text: a token the grammar does not allow is never drawn, and generation ends
    where the grammar is complete."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # 0: off
    presence_penalty: float = 0.0  # 0.0: off
    frequency_penalty: float = 0.0  # 0.0: off
    grammar: str | None = None
    json_schema: dict[str, Any] | str | None = None

    def check(self) -> None:
        """Refuse (InvalidArgumentError, a ValueError) what llama.cpp would misread: NaN or infinite
        floats, integers outside their C types, a grammar and a schema at once (the grammar's own
        syntax is checked where the model's vocabulary is at hand: VisionModel.check_sampling)."""
        float_arg("temperature", self.temperature)
        float_arg("top_p", self.top_p, 0.0, 1.0)
        float_arg("min_p", self.min_p, 0.0, 1.0)
        int_arg("top_k", self.top_k, 0, INT32_MAX, "0 disables it")
        int_arg("seed", self.seed, 0, UINT32_MAX)
        # llama.cpp's rule: > 0 and its inverse finite, in float (it divides logits by it)
        rp = float_arg("repeat_penalty", self.repeat_penalty, 0.0, FLOAT32_MAX)
        if rp == 0.0 or 1.0 / rp > FLOAT32_MAX:
            raise InvalidArgumentError(f"repeat_penalty must be > 0 (1.0: off), got {rp}")
        int_arg("repeat_last_n", self.repeat_last_n, 0, INT32_MAX, "0 disables the penalties")
        float_arg("presence_penalty", self.presence_penalty, -FLOAT32_MAX, FLOAT32_MAX)
        float_arg("frequency_penalty", self.frequency_penalty, -FLOAT32_MAX, FLOAT32_MAX)
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InvalidArgumentError(f"grammar must be a string of GBNF, got {type(self.grammar).__name__}")
        if self.grammar and self.json_schema is not None:  # an empty grammar is none, as in llama.cpp
            raise InvalidArgumentError("give either grammar or json_schema, not both")
        self.schema()

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema as a dict (parsed if given as text), or None."""
        js = self.json_schema
        if js is None or isinstance(js, dict):
            return js
        if not isinstance(js, str):
            raise InvalidArgumentError(f"json_schema must be a dict or its JSON text, got {type(js).__name__}")
        try:
            parsed = json.loads(js)
        except (ValueError, RecursionError) as e:
            raise InvalidArgumentError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise InvalidArgumentError("json_schema must be a JSON object")
        return parsed

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether the penalties do anything (llama.cpp leaves its penalties sampler out otherwise)."""
        off = self.repeat_penalty == 1.0 and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0
        return self.repeat_last_n != 0 and not off


DEFAULTS = SamplingParams()
