"""Edits of a model's KV cache for the oracle tests (a test helper, not shipped)."""

from __future__ import annotations

from collections.abc import Callable, Collection

from vp_gguf._libs import llama_cpp as L


def keep_only(keep: Collection[int]) -> Callable:
    """An ``after_prefill`` hook that removes the first image's cells whose ordinals are not in ``keep``
    (one position per image token, as LLaVA and Gemma 3 place them; sequence 0)."""

    def drop_others(model, spans) -> None:
        mem = L.llama_get_memory(model.context)
        for o in range(spans[0].n_tokens):
            if o not in keep:
                assert L.llama_memory_seq_rm(mem, 0, spans[0].pos + o, spans[0].pos + o + 1)

    return drop_others
