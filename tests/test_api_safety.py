"""The Python API never crashes the process (issue 16, item 5): a closed model, calls from two
threads, token ids out of the vocabulary, integers C would wrap, non-finite floats, threads and
contexts beyond the machine, decompression bombs and a full context all end as Python exceptions
or a clean stop. What crashed before runs in a subprocess."""
from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vp_gguf
from vp_gguf import images as images_mod
from vp_gguf import loading
from vp_gguf.errors import ImageError, InvalidArgumentError, ModelBusyError, ResourceLimitError
from vp_gguf.loading import ModelParams
from vp_gguf.sampling import SamplingParams
from vp_gguf.visionpulse import VisionPulse

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the picture."


def run_script(code: str, *args, timeout: float = 180) -> str:
    """Run ``code`` in a fresh interpreter on this checkout's source; its stdout, once it exited cleanly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GGML_NO_BACKTRACE": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


LOAD = """
import sys, threading
import vp_gguf
from vp_gguf.errors import ModelClosedError
m = vp_gguf.VisionModel(sys.argv[1], sys.argv[2], n_ctx=512, n_threads=2)
img = sys.argv[3]
"""


# -- a closed model, and close() from another thread ---------------------------------------------

def test_every_call_after_close_raises(tiny_paths, images):
    out = run_script(LOAD + """
m.close()
calls = {
    "n_embd": lambda: m.n_embd,
    "n_vocab": lambda: m.n_vocab,
    "token_to_bytes": lambda: m.token_to_bytes(1),
    "detokenize": lambda: m.detokenize([1, 2]),
    "apply_chat_template": lambda: m.apply_chat_template("hi"),
    "prepare": lambda: m.prepare("hi", images=[img]),
    "generate": lambda: m.generate("hi", images=[img], max_tokens=2),
    "stream": lambda: list(m.stream("hi", images=[img], max_tokens=2)),
    "teacher_forced": lambda: m.teacher_forced("hi", [img], [1, 2]),
}
for name, call in calls.items():
    try:
        call()
        print(name, "answered")
    except ModelClosedError as e:
        print(name, "closed" if "closed" in str(e) else "?")
m.close()  # twice: nothing left to free
""", *tiny_paths("llava"), images["a"])
    lines = out.split("\n")
    for name in ("n_embd", "n_vocab", "token_to_bytes", "detokenize", "apply_chat_template", "prepare",
                 "generate", "stream", "teacher_forced"):
        assert f"{name} closed" in lines, out


def test_close_while_another_thread_streams(tiny_paths, images):
    """close() marks the model closed; the stream stops at its next step and frees the handles at its end."""
    out = run_script(LOAD + """
started, result = threading.Event(), {}
def consume():
    try:
        for _ in m.stream("Describe the picture.", images=[img], max_tokens=300):
            started.set()
        result["end"] = "finished"
    except ModelClosedError:
        result["end"] = "closed"
t = threading.Thread(target=consume)
t.start()
assert started.wait(120)
m.close()
t.join(120)
print("stream", result.get("end"), "freed", m.context is None)
""", *tiny_paths("llava"), images["a"])
    assert "stream closed freed True" in out


def test_close_with_a_suspended_stream_in_the_same_thread(tiny_paths, images):
    """close() does not wait for the stream (its consumer may never resume it): no deadlock, no crash."""
    out = run_script(LOAD + """
it = m.stream("Describe the picture.", images=[img], max_tokens=50)
next(it)
m.close()
print("held", m.context is not None)
try:
    next(it)
except ModelClosedError:
    print("resumed: closed")
print("freed", m.context is None)
""", *tiny_paths("llava"), images["a"])
    assert out.split("\n")[:3] == ["held True", "resumed: closed", "freed True"]


# -- one generation at a time, whoever asks -------------------------------------------------------

def test_calls_beside_a_running_generation(load_model, images):
    m = load_model("llava")
    it = m.stream(PROMPT, images=[images["a"]], max_tokens=20)
    try:
        next(it)
        with pytest.raises(ModelBusyError, match="already generating"):
            m.generate(PROMPT, images=[images["a"]], max_tokens=2)
        with pytest.raises(ModelBusyError):
            m.teacher_forced(PROMPT, [images["a"]], [1, 2])
        with pytest.raises(ModelBusyError):  # the projector's context: the one the generation encodes with
            m.prepare(PROMPT, images=[images["a"]])
        errors: list[BaseException] = []

        def other_thread():
            try:
                m.generate(PROMPT, images=[images["a"]], max_tokens=2)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(60)
        assert len(errors) == 1 and isinstance(errors[0], ModelBusyError)
        assert m.detokenize([1, 2]) is not None  # reading the vocabulary goes on beside it
    finally:
        it.close()
    assert m.generate(PROMPT, images=[images["a"]], max_tokens=2).n_generated >= 1


# -- token ids -------------------------------------------------------------------------------------

def test_token_ids_out_of_the_vocabulary(tiny_paths, images):
    out = run_script(LOAD + """
calls = {
    "big": lambda: m.detokenize([10**7]),
    "negative": lambda: m.detokenize([-5]),
    "n_vocab": lambda: m.token_to_bytes(m.n_vocab),
    "not an int": lambda: m.detokenize(["a"]),
    "forced": lambda: m.teacher_forced("hi", [img], [1, 10**7]),
}
for name, call in calls.items():
    try:
        call()
        print(name, "answered")
    except ValueError as e:
        print(name, "refused:", e)
print("still usable", m.detokenize([1, 2]) == m.detokenize([1]) + m.detokenize([2]))
""", *tiny_paths("llava"), images["a"])
    assert "big refused: token id is out of range: 10000000 is not in [0, " in out
    assert "negative refused: token id is out of range: -5 is not in [0, " in out
    for name in ("n_vocab", "not an int", "forced"):
        assert f"{name} refused" in out, out
    assert "still usable True" in out


# -- integers never wrapped, floats finite --------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("n_ctx", 2**32 + 300), ("n_ctx", 2**31), ("n_ctx", 2e9), ("n_ctx", 15), ("n_ctx", "4096"),
    ("n_batch", 2**32 + 1), ("n_batch", 0), ("n_ubatch", 2**32), ("n_seq_max", 2**32 + 1),
    ("n_seq_max", 257), ("n_gpu_layers", 2**32), ("n_gpu_layers", -2), ("n_threads", 0),
    ("n_threads", 100_000), ("n_threads", 4 * (os.cpu_count() or 1) + 1), ("type_k", ["f16"]),
    ("flash_attn", None),
])
def test_model_params_out_of_range(field, value):
    with pytest.raises(InvalidArgumentError, match=field):
        ModelParams(**{field: value}).check()


def test_model_params_refused_before_loading(tiny_paths):
    with pytest.raises(InvalidArgumentError, match=r"n_ctx is out of range: 4294967596 is not in \[16, 2147483392\]"):
        vp_gguf.VisionModel(*tiny_paths("llava"), n_ctx=2**32 + 300)


def test_too_many_threads_refused(tiny_paths):
    """n_threads=100000 segfaulted in ggml (20000 hung creating threads)."""
    out = run_script("""
import sys, vp_gguf
try:
    vp_gguf.VisionModel(sys.argv[1], sys.argv[2], n_threads=100_000)
except ValueError as e:
    print("refused:", e)
""", *tiny_paths("llava"))
    assert "refused: n_threads is out of range: 100000 is not in [1, " in out and "(at most 4x the" in out


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -math.inf), ("temperature", "0.5"),
    ("top_p", math.inf), ("top_p", math.nan), ("top_p", 1.5), ("min_p", math.nan),
    ("top_k", -1), ("top_k", 2**31), ("top_k", 1.5), ("seed", -1), ("seed", 2**32), ("seed", "x"),
])
def test_sampling_params_out_of_range(field, value):
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**{field: value}).check()


@pytest.mark.parametrize("max_tokens", [2**40, "5", -1, 1.0])
def test_max_tokens_out_of_range(load_model, images, max_tokens):
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        load_model("llava").generate(PROMPT, images=[images["a"]], max_tokens=max_tokens)


@pytest.mark.parametrize("field, value", [
    ("anchor_layer", 2**32 + 1), ("anchor_layer", -5), ("anchor_layer", "abc"), ("anchor_layer", 1.5),
    ("first_pruned_layer", 2**32), ("min_pruned_layers", -1), ("seed", 2**32), ("seed", -1),
    ("tau", math.nan), ("budget_max", math.inf), ("ratio", math.nan), ("forced", [2**32]),
    ("k_per_step", [0]), ("preset", 2**32 + 5), ("mode", ["visionpulse"]), ("attn", None),
])
def test_visionpulse_fields_out_of_range(field, value):
    kw = {"mode": "forced"} if field == "forced" else {}
    with pytest.raises(InvalidArgumentError, match=field if field not in ("mode", "attn") else "unknown"):
        VisionPulse(**kw, **{field: value}).check()


def test_visionpulse_anchor_beyond_the_model(load_model, images):
    m = load_model("llava")
    with pytest.raises(InvalidArgumentError, match=rf"anchor_layer is out of range: .*the model has {m.n_layer} layers"):
        m.generate(PROMPT, images=[images["a"]], max_tokens=2, visionpulse=VisionPulse(anchor_layer=99))
    with pytest.raises(InvalidArgumentError, match="anchor_layer"):
        m.generate(PROMPT, images=[images["a"]], max_tokens=2, visionpulse=VisionPulse(anchor_layer=2**32 + 1))


# -- a tiny temperature is greedy ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_tiny_temperature_is_greedy(load_model, images, family):
    """At 1e-44 llama.cpp's logit / temperature overflowed to inf and the draw was random."""
    m = load_model(family)
    greedy = m.generate(PROMPT, images=[images["a"]], max_tokens=12).tokens
    for seed in (1, 2):
        s = SamplingParams(temperature=1e-44, seed=seed)
        assert m.generate(PROMPT, images=[images["a"]], max_tokens=12, sampling=s).tokens == greedy


# -- threads and memory bounded by the machine ----------------------------------------------------

def test_kv_cache_estimate_is_llama_cpp_s(tiny_paths, capsys):
    """The estimate is what llama.cpp allocates (an upper bound with sliding-window layers)."""
    import re

    from vp_gguf import _log
    for family, exact in (("llava", True), ("qwen2vl", True), ("gemma3", False)):
        try:
            with vp_gguf.VisionModel(*tiny_paths(family), n_ctx=1000, n_threads=2, verbose=True) as m:
                est = loading.kv_cache_bytes(m._model, m.params)
        finally:
            _log.install(False)  # the logs are global: quiet again for the tests that follow
        log = capsys.readouterr().err
        sizes = [float(x) for x in re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", log)]
        assert sizes, log[-2000:]
        real = sum(sizes) * 2**20
        if exact:
            assert abs(est - real) <= 0.01 * 2**20, (family, est, real)
        else:
            assert real <= est, (family, est, real)


def test_kv_cache_larger_than_memory_refused(tiny_paths, monkeypatch):
    monkeypatch.setattr(loading, "available_memory", lambda: 2**20)  # a machine with 1 MiB left
    with pytest.raises(ResourceLimitError, match=r"n_ctx=4096 needs a KV cache of 0\.00 GiB .* 0\.00 GiB"):
        vp_gguf.VisionModel(*tiny_paths("llava"), n_ctx=4096, n_threads=2)


def test_huge_context_refused_before_allocation(tiny_paths):
    """n_ctx=2e9 grew a process to 20.7 GB and woke the out-of-memory killer."""
    out = run_script("""
import sys, vp_gguf
try:
    vp_gguf.VisionModel(sys.argv[1], sys.argv[2], n_ctx=2_000_000_000, n_threads=2)
except ValueError as e:
    print("refused:", e)
""", *tiny_paths("llava"))
    assert "refused: n_ctx=2000000000 needs a KV cache of" in out and "GiB of memory is available" in out


# -- decompression bombs --------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds a few bytes of pixels: a bomb's header."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_an_image_error():
    """Over twice Pillow's bound, Pillow raises while opening: an ImageError naming the limit."""
    with pytest.raises(ImageError, match=r"too many pixels to decode .*exceeds limit of \d+ pixels"):
        images_mod.load_bitmap(None, None, png_header(30_000, 30_000))


def test_bomb_refused_from_its_header_in_milliseconds():
    pillow_limit = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="12000x12000 is 144000000 pixels, over the limit of 89478485"):
            images_mod.load_bitmap(None, None, png_header(12_000, 12_000))
    assert time.perf_counter() - t0 < 1.0
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's global is left alone


def test_bomb_warning_turned_error_is_an_image_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="too many pixels"):
            images_mod.load_bitmap(None, None, png_header(12_000, 12_000))


def test_pixel_limit_per_call_and_per_module(load_model, images, monkeypatch):
    data = images["a"].read_bytes()  # 96x80
    with pytest.raises(ImageError, match="96x80 is 7680 pixels, over the limit of 7679"):
        images_mod.load_bitmap(None, None, data, max_pixels=7679)
    with pytest.raises(ImageError, match="over the limit of 100"):
        images_mod.load_bitmap(None, None, Image.open(images["a"]), max_pixels=100)
    with pytest.raises(ImageError, match="over the limit of 100"):
        images_mod.load_bitmap(None, None, np.zeros((80, 96, 3), np.uint8), max_pixels=100)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 7679)
    m = load_model("llava")
    with pytest.raises(ImageError, match="over the limit of 7679"):
        m.generate(PROMPT, images=[images["a"]], max_tokens=2)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 7680)
    assert m.generate(PROMPT, images=[images["a"]], max_tokens=2).n_generated >= 1


def test_unreadable_image_message_never_quotes_the_file():
    """Pillow's messages may quote a file's first bytes ("Token too long in file header: b'SECRET...")."""
    with pytest.raises(ImageError) as e:
        images_mod.load_bitmap(None, None, b"P6 " + b"SECRET_API_KEY" * 20)
    assert "SECRET" not in str(e.value) and "cannot be read as an image" in str(e.value)


# -- a full context ends the generation with the text so far ---------------------------------------

@pytest.mark.parametrize("family", ["qwen2vl", "llava", "gemma3"])
def test_full_context_stops_with_the_text_so_far(load_model, images, family):
    """With M-RoPE (Qwen2-VL) an image takes fewer positions than KV cells: the position said there was
    room when there was none, and the decode raised ContextOverflowError."""
    m = load_model(family, n_ctx=256)
    r = m.generate(PROMPT + " Describe the picture." * 30, images=[images["a"]], max_tokens=1000)
    assert r.stop_reason == "context"
    assert r.text and r.n_generated >= 1
    # the last token is sampled from the last free cell's logits and never needs a cell itself
    assert r.n_prompt_tokens + r.n_generated == m.n_ctx + 1
