"""Bad input: a clear Python exception, never a crash, and the model stays usable."""
from __future__ import annotations

import itertools

import pytest

import vp_gguf
from vp_gguf import (ContextOverflowError, ImageError, ModelFileError, ProjectorMismatchError,
                     PromptError)
from vp_gguf.gguf_file import read_gguf_info

PROMPT = "Describe the picture."


@pytest.fixture
def usable(load_model, images):
    """The shared llava model and its reference output; asserts it still works afterwards."""
    m = load_model("llava")
    ref = m.generate(PROMPT, images=[images["a"]], max_tokens=6).tokens
    yield m
    assert m.generate(PROMPT, images=[images["a"]], max_tokens=6).tokens == ref


def test_missing_model_file(tmp_path, tiny_paths):
    _, mmproj = tiny_paths("llava")
    with pytest.raises(ModelFileError, match="no such file"):
        vp_gguf.VisionModel(tmp_path / "nope.gguf", mmproj)


@pytest.mark.parametrize("which", ["model", "mmproj"])
@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_gguf(tmp_path, tiny_paths, which, keep):
    model, mmproj = tiny_paths("llava")
    src = model if which == "model" else mmproj
    data = src.read_bytes()
    cut = tmp_path / src.name
    cut.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    args = (cut, mmproj) if which == "model" else (model, cut)
    with pytest.raises(ModelFileError, match="truncated|not a GGUF"):
        vp_gguf.VisionModel(*args)


def test_not_a_gguf(tmp_path, tiny_paths):
    _, mmproj = tiny_paths("llava")
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        vp_gguf.VisionModel(f, mmproj)


def test_swapped_model_and_mmproj(tiny_paths):
    model, mmproj = tiny_paths("llava")
    with pytest.raises(ModelFileError, match="mmproj"):
        vp_gguf.VisionModel(mmproj, model)
    with pytest.raises(ModelFileError, match="not a multimodal projector"):
        vp_gguf.VisionModel(model, model)


def test_mmproj_of_another_model(tiny_paths):
    from conftest import FAMILIES
    pairs = []
    for a, b in itertools.permutations(FAMILIES, 2):
        ma, _ = tiny_paths(a)
        _, pb = tiny_paths(b)
        info = read_gguf_info(ma)
        if info.get(f"{info.architecture}.embedding_length") != read_gguf_info(pb).get("clip.vision.projection_dim"):
            pairs.append((ma, pb))
    assert pairs, "the tiny families must not all share one embedding size"
    for ma, pb in pairs:
        with pytest.raises(ProjectorMismatchError, match="embedding size|does not belong"):
            vp_gguf.VisionModel(ma, pb)


def test_projector_mismatch_caught_by_libmtmd(tiny_paths, monkeypatch):
    """If our header pre-check misses a mismatch, libmtmd's own check still becomes a clear error."""
    import vp_gguf.loading as vm
    ma, _ = tiny_paths("llava")
    _, pb = tiny_paths("qwen2vl")
    real = vm.read_gguf_info

    def without_projection_dim(path):
        info = real(path)
        info.metadata.pop("clip.vision.projection_dim", None)
        return info
    monkeypatch.setattr(vm, "read_gguf_info", without_projection_dim)
    assert real(ma).get("llama.embedding_length") != real(pb).get("clip.vision.projection_dim")
    with pytest.raises(ProjectorMismatchError, match="mismatch"):
        vp_gguf.VisionModel(ma, pb)


def test_unreadable_image(usable, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello, I am text")
    with pytest.raises(ImageError, match="cannot be read as an image"):
        usable.generate(PROMPT, images=[bad])
    with pytest.raises(ImageError, match="no such file"):
        usable.generate(PROMPT, images=[tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="no such file"):
        usable.generate(PROMPT, images=[tmp_path])  # a directory


def test_truncated_image(usable, tmp_path, images):
    data = images["a"].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        usable.generate(PROMPT, images=[cut])


def test_bad_array_image(usable):
    import numpy as np
    with pytest.raises(ImageError, match="uint8"):
        usable.generate(PROMPT, images=[np.zeros((4, 4, 3), dtype=np.float32)])


def test_more_markers_than_images(usable, images):
    with pytest.raises(PromptError, match="2 media marker"):
        usable.generate(f"{usable.marker} and {usable.marker}", images=[images["a"]])
    with pytest.raises(PromptError, match="1 media marker"):
        usable.generate(f"{usable.marker} only", images=[images["a"], images["b"]])


def test_prompt_ending_with_image(usable, images):
    with pytest.raises(PromptError, match="ends with an image"):
        usable.generate(f"Look: {usable.marker}", images=[images["a"]])


def test_context_too_small_for_the_image(tiny_paths, images):
    model, mmproj = tiny_paths("llava")
    with vp_gguf.VisionModel(model, mmproj, n_ctx=256, n_threads=2) as m:  # 256: llama.cpp's minimum
        n_img = m.generate(PROMPT, images=[images["a"]], max_tokens=1).n_image_tokens
        many = [images["a"]] * (m.n_ctx // n_img + 1)
        with pytest.raises(ContextOverflowError, match="raise n_ctx"):
            m.generate(PROMPT, images=many)
        # still usable with text that fits
        assert m.generate("Hi", max_tokens=2).n_generated >= 1


def test_generation_stops_at_full_context(tiny_paths, images):
    model, mmproj = tiny_paths("llava")
    with vp_gguf.VisionModel(model, mmproj, n_ctx=256, n_threads=2) as m:
        r = m.generate(PROMPT, images=[images["a"]], max_tokens=10_000)
        assert r.stop_reason in ("context", "eos")
        assert r.stop_reason == "context" or r.n_generated < 10_000
        # the last token is sampled from the last free cell's logits and never needs a cell itself
        assert r.n_prompt_tokens + r.n_generated <= m.n_ctx + 1


def test_impossible_parameters(tiny_paths):
    model, mmproj = tiny_paths("llava")
    with pytest.raises(ValueError, match="flash_attn"):
        vp_gguf.VisionModel(model, mmproj, flash_attn="sometimes")
    with pytest.raises(ValueError, match="n_ctx"):
        vp_gguf.VisionModel(model, mmproj, n_ctx=0)
    with pytest.raises(TypeError, match="unknown model parameter"):
        vp_gguf.VisionModel(model, mmproj, n_kontext=5)


def test_bad_sampling_parameters(usable, images):
    with pytest.raises(ValueError):
        usable.generate(PROMPT, images=[images["a"]], sampling=vp_gguf.SamplingParams(top_p=2.0))
    with pytest.raises(ValueError):
        usable.generate(PROMPT, images=[images["a"]], sampling=vp_gguf.SamplingParams(temperature=float("nan")))
    with pytest.raises(ValueError):
        usable.generate(PROMPT, images=[images["a"]], max_tokens=-1)
