"""cache_prompt: a request keeps the KV of what the previous one left of its prompt (a conversation's
earlier turns, their images), and prefills only the rest; the answer is the one a full prefill gives."""
from __future__ import annotations

import pytest

from vp_gguf.chat import Chat
from vp_gguf.errors import VideoError


@pytest.mark.parametrize("family", ["llava", "qwen2vl", "gemma3"])
def test_a_second_turn_encodes_no_image(load_model, images, family):
    m = load_model(family, n_ctx=4096)
    chat = Chat(m, max_tokens=12)
    chat.attach(images["a"])
    "".join(chat.say("Describe the picture."))
    first = chat.last_result
    "".join(chat.say("And the colours?"))
    second = chat.last_result
    assert first.timings.image_encode_ms > 0
    assert second.timings.image_encode_ms == 0  # the image's KV came from turn 1
    assert second.n_cached_tokens >= first.n_prompt_tokens
    assert second.n_cached_tokens < second.n_prompt_tokens


@pytest.mark.parametrize("family", ["llava", "qwen2vl", "gemma3"])
def test_a_kept_prefix_answers_as_a_full_prefill(load_model, images, family):
    """The kept part was prefilled as a batch, as a full prefill does: the answers are equal. (A
    previous reply's tokens were decoded one at a time, which llama.cpp computes with other kernels
    than a batch: there the KV, as in llama.cpp's server, is the one generation made.)"""
    m = load_model(family, n_ctx=4096)
    mk = m.marker
    m.generate(f"Picture: {mk} Question one.", images=[images["a"]], max_tokens=1, cache_prompt=True)
    longer = f"Picture: {mk} Question one. And a question two, longer."
    kept = m.generate(longer, images=[images["a"]], max_tokens=8, cache_prompt=True)
    assert kept.n_cached_tokens > kept.images[0].pos + kept.images[0].n_tokens and kept.timings.image_encode_ms == 0
    fresh = m.generate(longer, images=[images["a"]], max_tokens=8)
    assert fresh.n_cached_tokens == 0 and fresh.tokens == kept.tokens


def test_the_common_prefix_is_kept_up_to_the_first_difference(load_model, images):
    m = load_model("llava", n_ctx=4096)
    a = m.generate("Look: <__media__> now answer.", images=[images["a"]], max_tokens=4, cache_prompt=True)
    again = m.generate("Look: <__media__> now answer.", images=[images["a"]], max_tokens=4, cache_prompt=True)
    assert again.n_cached_tokens == a.n_prompt_tokens - 1 and again.tokens == a.tokens  # the last token: its logits
    other = m.generate("Look: <__media__> now answer.", images=[images["b"]], max_tokens=4, cache_prompt=True)
    n_before_image = other.images[0].pos
    assert other.n_cached_tokens == n_before_image and other.timings.image_encode_ms > 0
    assert other.tokens == m.generate("Look: <__media__> now answer.", images=[images["b"]], max_tokens=4).tokens


def test_a_failed_request_leaves_nothing_stale(load_model, images):
    m = load_model("llava", n_ctx=4096)
    ref = m.generate("Describe.", images=[images["a"]], max_tokens=4)
    with pytest.raises(VideoError):
        m.generate("Describe.", images=[images["a"]], videos=[b"not a video"], max_tokens=4, cache_prompt=True)
    again = m.generate("Describe.", images=[images["a"]], max_tokens=4, cache_prompt=True)
    assert again.tokens == ref.tokens


def test_visionpulse_selects_in_a_turn_that_reuses_the_cache(load_model, images):
    m = load_model("qwen2vl", n_ctx=4096)
    chat = Chat(m, max_tokens=8, visionpulse=5)
    chat.attach(images["a"])
    "".join(chat.say("Describe the picture."))
    "".join(chat.say("Again."))
    r = chat.last_result
    assert r.n_cached_tokens > 0 and r.visionpulse is not None and r.visionpulse.steps
    assert all(0 < s.n_kept < s.n_visual for s in r.visionpulse.steps)


def test_a_cache_changed_behind_the_record_is_not_trusted(load_model, images):
    from vp_gguf._libs import llama_cpp as L

    m = load_model("llava", n_ctx=4096)
    ref = m.generate("Describe.", images=[images["a"]], max_tokens=4, cache_prompt=True)
    L.llama_memory_seq_rm(L.llama_get_memory(m._ctx), 0, 3, -1)  # a tool of one's own cuts the cache
    again = m.generate("Describe.", images=[images["a"]], max_tokens=4, cache_prompt=True)
    assert again.n_cached_tokens == 0 and again.tokens == ref.tokens
