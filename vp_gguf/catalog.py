"""Known-good GGUF + mmproj pairs on the Hugging Face hub.

Each entry names a repository that holds a language model and its mmproj, as the
llama.cpp project publishes them. File names, sizes and sha256 are not written
here: ``vp_gguf.fetch`` reads them from the hub (and keeps a manifest for offline
use), so the table cannot go stale when a repository adds a quantization.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # what `vp-gguf fetch NAME` takes
    repo: str  # hub repository
    family: str  # libmtmd projector family
    quants: tuple[str, ...]  # the usual quantizations (the repo's listing is the authority)
    default_quant: str
    note: str = ""


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "smolvlm-256m",
        "ggml-org/SmolVLM-256M-Instruct-GGUF",
        "idefics3",
        ("Q8_0", "F16"),
        "Q8_0",
        "smallest; runs anywhere",
    ),
    CatalogEntry("smolvlm-500m", "ggml-org/SmolVLM-500M-Instruct-GGUF", "idefics3", ("Q8_0", "F16"), "Q8_0"),
    CatalogEntry(
        "smolvlm2-256m-video",
        "ggml-org/SmolVLM2-256M-Video-Instruct-GGUF",
        "idefics3",
        ("Q8_0", "F16"),
        "Q8_0",
        "video frames as images",
    ),
    CatalogEntry(
        "smolvlm2-500m-video",
        "ggml-org/SmolVLM2-500M-Video-Instruct-GGUF",
        "idefics3",
        ("Q8_0", "F16"),
        "Q8_0",
        "video frames as images",
    ),
    CatalogEntry(
        "smolvlm2-2.2b",
        "ggml-org/SmolVLM2-2.2B-Instruct-GGUF",
        "idefics3",
        ("Q4_K_M", "Q8_0", "F16"),
        "Q4_K_M",
        "video frames as images",
    ),
    CatalogEntry(
        "qwen2.5-vl-3b", "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF", "qwen2.5vl", ("Q4_K_M", "Q8_0", "F16"), "Q4_K_M"
    ),
    CatalogEntry(
        "qwen2.5-vl-7b", "ggml-org/Qwen2.5-VL-7B-Instruct-GGUF", "qwen2.5vl", ("Q4_K_M", "Q8_0", "F16"), "Q4_K_M"
    ),
    CatalogEntry("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct-GGUF", "qwen3vl", ("Q4_K_M", "Q8_0", "F16"), "Q4_K_M"),
    CatalogEntry(
        "qwen3-vl-4b-thinking",
        "Qwen/Qwen3-VL-4B-Thinking-GGUF",
        "qwen3vl",
        ("Q4_K_M", "Q8_0", "F16"),
        "Q4_K_M",
        "the model of the VisionPulse paper",
    ),
    CatalogEntry("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct-GGUF", "qwen3vl", ("Q4_K_M", "Q8_0", "F16"), "Q4_K_M"),
    CatalogEntry(
        "qwen3-vl-8b-thinking", "Qwen/Qwen3-VL-8B-Thinking-GGUF", "qwen3vl", ("Q4_K_M", "Q8_0", "F16"), "Q4_K_M"
    ),
    CatalogEntry("gemma3-4b", "ggml-org/gemma-3-4b-it-GGUF", "gemma3", ("Q4_K_M", "Q8_0", "F16"), "Q4_K_M"),
    CatalogEntry("llava-1.5-7b", "mys/ggml_llava-v1.5-7b", "llava", ("Q4_K", "Q5_K", "F16"), "Q4_K"),
    CatalogEntry("internvl3-1b", "ggml-org/InternVL3-1B-Instruct-GGUF", "internvl", ("Q8_0", "F16"), "Q8_0"),
    CatalogEntry("internvl3-2b", "ggml-org/InternVL3-2B-Instruct-GGUF", "internvl", ("Q8_0", "F16"), "Q8_0"),
)


def find(name: str) -> CatalogEntry | None:
    """The entry called ``name`` or holding repo ``name`` (case-insensitive)."""
    key = name.lower()
    for e in CATALOG:
        if e.name == key or e.repo.lower() == key:
            return e
    return None
