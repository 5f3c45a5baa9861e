"""vp-gguf: GGUF vision-language models with VisionPulse per-step visual token selection."""
from __future__ import annotations

from .errors import (ContextOverflowError, DecodeError, ImageError, ModelFileError,
                     ProjectorMismatchError, PromptError, VPGGUFError)
from .model import ModelParams, SamplingParams, VisionModel
from .result import GenerationResult, ImageSpan, Timings, locate
from .visionpulse import StepStats, VisionPulse, VisionPulseReport
from .llama_cpp_dropin import VisionPulseSession, enable_visionpulse
from .fetch import FetchedModel, FetchError, fetch

__version__ = "0.1.0"
__all__ = [
    "VisionModel", "ModelParams", "SamplingParams", "GenerationResult", "Timings", "ImageSpan",
    "VisionPulse", "VisionPulseReport", "StepStats", "locate", "enable_visionpulse", "VisionPulseSession",
    "VPGGUFError", "ModelFileError", "ProjectorMismatchError", "ImageError", "PromptError",
    "ContextOverflowError", "DecodeError", "fetch", "FetchedModel", "FetchError",
]
