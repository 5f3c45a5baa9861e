"""Image -> text end to end on each tiny VLM."""
from __future__ import annotations

import pytest

import vp_gguf
from vp_gguf import SamplingParams

from conftest import FAMILIES

PROMPT = "Describe the picture."


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_deterministic_and_sees_the_image(load_model, images, family):
    m = load_model(family)
    r1 = m.generate(PROMPT, images=[images["a"]], max_tokens=12)
    r2 = m.generate(PROMPT, images=[images["a"]], max_tokens=12)
    assert r1.tokens == r2.tokens and r1.text == r2.text
    assert r1.n_generated == len(r1.tokens) > 0
    assert r1.n_image_tokens > 0
    assert r1.n_prompt_tokens > r1.n_image_tokens
    # the image is part of the computation: another image changes the answer
    r3 = m.generate(PROMPT, images=[images["b"]], max_tokens=12)
    assert r3.tokens != r1.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_result_fields_and_timings(load_model, images, family):
    m = load_model(family)
    r = m.generate(PROMPT, images=[images["grad"]], max_tokens=8)
    d = r.to_dict()
    assert set(d) >= {"text", "tokens", "n_prompt_tokens", "n_image_tokens", "n_generated", "timings"}
    t = d["timings"]
    assert t["image_encode_ms"] > 0 and t["prefill_ms"] > 0
    if r.n_generated > 1:
        assert t["decode_tok_s"] > 0
    assert r.stop_reason in ("eos", "length")
    assert r.text == m.detokenize(r.tokens, special=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_matches_generate(load_model, images, family):
    m = load_model(family)
    full = m.generate(PROMPT, images=[images["a"]], max_tokens=10)
    pieces = list(m.stream(PROMPT, images=[images["a"]], max_tokens=10))
    assert "".join(pieces) == full.text
    assert m.last_result.tokens == full.tokens


def test_sampling_is_seeded(load_model, images):
    m = load_model("llava")
    s = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = m.generate(PROMPT, images=[images["a"]], max_tokens=16, sampling=s)
    b = m.generate(PROMPT, images=[images["a"]], max_tokens=16, sampling=s)
    assert a.tokens == b.tokens
    s2 = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=43)
    c = m.generate(PROMPT, images=[images["a"]], max_tokens=16, sampling=s2)
    assert c.tokens != a.tokens
    greedy = m.generate(PROMPT, images=[images["a"]], max_tokens=16)
    assert greedy.tokens != a.tokens


def test_two_images_with_markers(load_model, images):
    m = load_model("llava")
    one = m.generate(PROMPT, images=[images["a"]], max_tokens=4)
    r = m.generate(f"First {m.marker} then {m.marker}. Compare.", images=[images["a"], images["b"]],
                   max_tokens=6)
    assert r.n_image_tokens == 2 * one.n_image_tokens
    swapped = m.generate(f"First {m.marker} then {m.marker}. Compare.",
                         images=[images["b"], images["a"]], max_tokens=6)
    assert swapped.tokens != r.tokens


def test_image_inputs_in_every_form(load_model, images):
    import numpy as np
    from PIL import Image
    m = load_model("llava")
    ref = m.generate(PROMPT, images=[images["grad"]], max_tokens=6).tokens
    pil = Image.open(images["grad"])
    assert m.generate(PROMPT, images=[pil], max_tokens=6).tokens == ref
    assert m.generate(PROMPT, images=[np.asarray(pil)], max_tokens=6).tokens == ref
    assert m.generate(PROMPT, images=[images["grad"].read_bytes()], max_tokens=6).tokens == ref
    assert m.generate(PROMPT, images=[str(images["grad"])], max_tokens=6).tokens == ref


def test_text_only_prompt(load_model):
    m = load_model("llava")
    r = m.generate("Hello there", images=[], max_tokens=5)
    assert r.n_image_tokens == 0 and r.n_generated == 5


def test_import_llama_cpp_alone_uses_our_library(tmp_path):
    """`import llama_cpp` without vp_gguf loads vp-gguf's libllama, and only one copy of it."""
    import subprocess
    import sys
    code = ("import llama_cpp, llama_cpp.mtmd_cpp\n"
            "libs = {l.split()[-1] for l in open('/proc/self/maps') if 'libllama' in l}\n"
            "print(len(libs), *libs)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "1", out
    assert out[1].endswith("vp_gguf/lib/libllama.so")
    assert out[1] == str(vp_gguf._libs.lib_dir() / "libllama.so")


def test_one_libllama_in_process(load_model):
    load_model("llava")
    libs = {line.split()[-1] for line in open("/proc/self/maps") if "libllama" in line}
    assert len(libs) == 1, libs
