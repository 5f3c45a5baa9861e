"""Sampling settings: the one place their defaults live (the API, the CLI's flags and the server read them).

Light on purpose: the CLI builds its flags from these defaults without loading libllama. The argument
checks (``int_arg``, ``float_arg``) live here for the same reason: the model's and VisionPulse's settings
use them too.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import InvalidArgumentError

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# Below this a temperature samples as greedy. llama.cpp's temp sampler divides each logit by the
# temperature in float32 (llama_sampler_temp_impl: logit /= temp): at 1e-44 every logit over ~4e-6 becomes
# inf, the softmax NaN, and the draw random. 1e-6 keeps logit/temp finite for logits up to 3e32, and at
# 1e-6 a logit gap of 1e-4 already weighs exp(-100): the draw is the argmax in all but float noise.
MIN_TEMPERATURE = 1e-6


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
    """Token sampling. temperature <= 0 is greedy (argmax); so is one below MIN_TEMPERATURE."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed

    def check(self) -> None:
        """Refuse (InvalidArgumentError, a ValueError) what llama.cpp would misread: NaN or infinite
        floats, integers outside their C types."""
        float_arg("temperature", self.temperature)
        float_arg("top_p", self.top_p, 0.0, 1.0)
        float_arg("min_p", self.min_p, 0.0, 1.0)
        int_arg("top_k", self.top_k, 0, INT32_MAX, "0 disables it")
        int_arg("seed", self.seed, 0, UINT32_MAX)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


DEFAULTS = SamplingParams()
