"""Writing GGUF files with the ``gguf`` package: what the demo's glyph projector (and the tests' models) need.

The ``gguf`` package comes from the index, pinned in pyproject.toml to the pinned
llama.cpp tree's gguf-py version, so writing a projector needs no source checkout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


def gguf_module() -> Any:
    """The ``gguf`` package from the index, pinned (pyproject) to the pinned tree's gguf-py version.

    Writing GGUF files needs no source checkout: the demo's projector is written
    by an installed vp-gguf. Only the tiny test models read vocab files from the tree.
    """
    import gguf

    return gguf


@dataclass(frozen=True)
class VisionSpec:
    """The vision hyper-parameters a clip mmproj carries (libmtmd reads them)."""

    projector: str
    image_size: int
    patch_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    eps: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    use_gelu: bool = False
    tokens_per_image: int | None = None  # gemma3
    spatial_merge: int | None = None  # qwen2vl

    @property
    def image_tokens(self) -> int:
        """Tokens per image of a gemma3 projector."""
        assert self.tokens_per_image is not None, "only a gemma3 spec has a fixed token count"
        return self.tokens_per_image

    @property
    def merge(self) -> int:
        """Spatial merge of a qwen2vl projector."""
        assert self.spatial_merge is not None, "only a qwen2vl spec merges patches"
        return self.spatial_merge


def tensor_name(gguf, tensor, bid: int | None = None, suffix: str | None = "weight") -> str:
    """The GGUF name of a tensor kind (gguf.MODEL_TENSOR), block ``bid``, with its suffix."""
    name = gguf.TENSOR_NAMES[tensor]
    if bid is not None:
        name = name.format(bid=bid)
    return f"{name}.{suffix}" if suffix else name


def start_mmproj(gguf, path: Path, name: str, description: str, v: VisionSpec, n_embd_text: int):
    """A GGUFWriter for an F32 clip mmproj with the vision hyper-parameters of `v` written."""
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_description(description)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(v.projector)
    writer.add_vision_projection_dim(n_embd_text)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.n_embd)
    writer.add_vision_feed_forward_length(v.n_ff)
    writer.add_vision_block_count(v.n_layer)
    writer.add_vision_head_count(v.n_head)
    writer.add_vision_attention_layernorm_eps(v.eps)
    writer.add_vision_image_mean(list(v.mean))
    writer.add_vision_image_std(list(v.std))
    return writer


def finish(writer) -> None:
    """Write a GGUFWriter's header, key/values and tensors, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
