"""Sampling settings: the one place their defaults live (the API, the CLI's flags and the server read them).

Light on purpose: the CLI builds its flags from these defaults without loading libllama.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    """Token sampling. temperature <= 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed

    def check(self) -> None:
        if self.temperature != self.temperature:  # NaN
            raise ValueError("temperature is NaN")
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise ValueError("top_p and min_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")


DEFAULTS = SamplingParams()
