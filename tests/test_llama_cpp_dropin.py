"""VisionPulse on llama-cpp-python's own Llama and chat handlers (enable_visionpulse)."""
from __future__ import annotations

import base64

import pytest

import vp_gguf
from vp_gguf import VisionPulse

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp import llama_chat_format as F  # noqa: E402

HANDLERS = {"llava": F.Llava15ChatHandler, "qwen2vl": F.Qwen25VLChatHandler, "gemma3": F.MTMDChatHandler}


def _llm(tiny_paths, family, **kw):
    model, mmproj = tiny_paths(family)
    return llama_cpp.Llama(str(model), chat_handler=HANDLERS[family](clip_model_path=str(mmproj), verbose=False),
                           n_ctx=2048, n_threads=2, verbose=False, seed=1, **kw)


def _messages(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe the picture."}]}]


@pytest.mark.parametrize("family", list(HANDLERS))
def test_chat_completion_reports_the_selection(tiny_paths, images, family):
    llm = _llm(tiny_paths, family)
    url = images["a"].resolve().as_uri()  # file://
    dense = llm.create_chat_completion(messages=_messages(url), max_tokens=8, temperature=0.0)
    assert "visionpulse" not in dense.get("usage", {})
    # a 100% budget changes nothing, so the drop-in leaves llama-cpp-python's output as it was
    s = vp_gguf.enable_visionpulse(llm, VisionPulse(mode="fixed", ratio=1.0))
    full = llm.create_chat_completion(messages=_messages(url), max_tokens=8, temperature=0.0)
    assert full["choices"][0]["message"]["content"] == dense["choices"][0]["message"]["content"]
    u = full["usage"]["visionpulse"]
    assert u["steps_pruned"] >= 1 and u["retention_mean"] == 1.0
    s = vp_gguf.enable_visionpulse(llm, VisionPulse(mode="fixed", ratio=0.25), per_step=True)
    out = llm.create_chat_completion(messages=_messages(url), max_tokens=8, temperature=0.0)
    u = out["usage"]["visionpulse"]
    assert 0.15 < u["retention_mean"] <= 0.25 and len(u["steps"]) == u["steps_pruned"]
    assert all(st["kept"] for st in u["steps"])
    s.disable()
    again = llm.create_chat_completion(messages=_messages(url), max_tokens=8, temperature=0.0)
    assert "visionpulse" not in again.get("usage", {})


def test_streaming_data_uri_and_text_only(tiny_paths, images):
    llm = _llm(tiny_paths, "llava")
    vp_gguf.enable_visionpulse(llm, 5)
    uri = "data:image/png;base64," + base64.b64encode(images["b"].read_bytes()).decode()
    chunks = list(llm.create_chat_completion(messages=_messages(uri), max_tokens=6, temperature=0.0, stream=True))
    assert chunks and "visionpulse" in chunks[-1]["usage"]
    assert all("usage" not in c for c in chunks[:-1])
    text = llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0)
    assert "visionpulse" not in text.get("usage", {})  # no image: untouched


def test_bad_settings_are_clear(tiny_paths):
    llm = _llm(tiny_paths, "llava")
    with pytest.raises(ValueError, match="preset"):
        vp_gguf.enable_visionpulse(llm, 7)
    with pytest.raises(ValueError, match="anchor_layer"):
        vp_gguf.enable_visionpulse(llm, VisionPulse(anchor_layer=99))


def test_unreadable_image_is_an_error_and_the_model_stays_usable(tiny_paths, images, tmp_path):
    llm = _llm(tiny_paths, "llava")
    vp_gguf.enable_visionpulse(llm, 5)
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a picture")
    for url in ((tmp_path / "missing.png").as_uri(), bad.as_uri()):
        with pytest.raises(Exception) as e:
            llm.create_chat_completion(messages=_messages(url), max_tokens=4, temperature=0.0)
        assert "missing.png" in str(e.value) or "image" in str(e.value).lower(), repr(e.value)
    ok = llm.create_chat_completion(messages=_messages(images["a"].resolve().as_uri()), max_tokens=4,
                                    temperature=0.0)
    assert ok["usage"]["visionpulse"]["steps_pruned"] >= 1


@pytest.mark.parametrize("family,n_batch", [("llava", 1), ("llava", 2), ("gemma3", 64), ("gemma3", 512)])
def test_prompt_processing_is_never_pruned_nor_a_step(tiny_paths, images, family, n_batch):
    """The text after an image goes through Llama.eval in n_batch pieces: a one-token piece (or the
    last token re-evaluated on a cache hit) is prompt, not a step, and is never pruned."""
    import numpy as np
    llm = _llm(tiny_paths, family, n_batch=n_batch)
    url = images["a"].resolve().as_uri()

    def first_scores():
        seen = []

        def capture(input_ids, scores):
            seen.append(np.array(scores, copy=True))
            return scores
        return seen, llama_cpp.LogitsProcessorList([capture])
    dense, lp = first_scores()
    llm.create_chat_completion(messages=_messages(url), max_tokens=6, temperature=0.0, logits_processor=lp)
    vp_gguf.enable_visionpulse(llm, VisionPulse(mode="fixed", ratio=0.25), per_step=True)
    pruned, lp = first_scores()
    out = llm.create_chat_completion(messages=_messages(url), max_tokens=6, temperature=0.0, logits_processor=lp)
    u = out["usage"]["visionpulse"]
    n = out["usage"]["completion_tokens"]
    assert u["steps_pruned"] == n - 1, (u["steps_pruned"], n)  # every decode after the first sampled token
    # the first token is sampled from the dense prompt's logits: exactly those of a run without VisionPulse
    assert np.array_equal(pruned[0], dense[0])
    assert not np.array_equal(pruned[-1], dense[-1])  # while the later steps are pruned


def test_forced_mode_applies_its_set(tiny_paths, images):
    llm = _llm(tiny_paths, "llava")
    vp_gguf.enable_visionpulse(llm, VisionPulse(mode="forced", forced=[1, 5, 7]), per_step=True)
    url = images["a"].resolve().as_uri()
    for _ in range(2):  # and again on the next request (each request resets the selection state)
        out = llm.create_chat_completion(messages=_messages(url), max_tokens=4, temperature=0.0)
        steps = out["usage"]["visionpulse"]["steps"]
        assert steps and all(st["kept"] == [1, 5, 7] for st in steps)
