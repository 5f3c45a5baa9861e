"""Glyph videos: evidence that moves across frames, for the testbed's video suite.

A video is a run of small glyph frames (8 x 8 tiles, 64 visual tokens each), encoded
losslessly (FFV1) so that ffmpeg gives back the exact tiles. Every frame but the evidence shows
key:code pairs (distractors that hold digits too); an evidence frame is filled with 32 digits.
The answer reads digits back after a primed start: the first 4 digits of an evidence frame
(unique in the video). The 270M base model finds a sequence by its start only where a frame
begins (primed mid-frame it fails densely), hence small frames, so that an answer can run
past a frame's end:

- vframe: the digits of frame k (k drawn per item); read 20 of them;
- vspan:  frame k and frame k+1 hold one sequence: read frame k's rest, then 8 digits of k+1;
- vthen:  the last frame's digits go on in the prompt's text after the video: read the frame's
          rest (28 steps that need the image), then 12 digits of text that need none, so the
          visual mass a step pays falls within one answer.

The frames play at 1 fps without text timestamps (the 270M base model would read them as part
of the sequence).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .glyphs import GlyphGrid
from .tasks import MARKER, Item, codes_image, random_digits

GRID = 8  # tiles per side of a frame: 64 visual tokens
FPS = 1
PRIME = 4  # digits given: four make the start unique among a video's digits
N_READ = 20  # vframe: digits to read back
N_NEXT = 8  # vspan: digits read in the next frame
N_TEXT = 12  # vthen: digits read in the text after the video
TEXT_DIGITS = 24  # vthen: digits after the video, in the prompt's text
N_PAIRS = 7  # key:code pairs in a distractor frame (7 x 9 tiles fill one)
VIDEO_TASKS = ("vframe", "vspan", "vthen")


def encode_video(frames: list, out: Path, fps: int = FPS) -> None:
    """PNG frames -> a lossless FFV1 video (exact pixels back through ffmpeg)."""
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("the video suite needs ffmpeg to make its videos (apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(frames):
            f.save(Path(tmp) / f"f{i:04d}.png")
        cmd = ["ffmpeg", "-y", "-loglevel", "error", "-framerate", str(fps), "-i", str(Path(tmp) / "f%04d.png")]
        subprocess.run([*cmd, "-c:v", "ffv1", str(out)], check=True)


def _digit_frame(digits: list[str]):
    g = GlyphGrid(GRID)
    return g.render((" " + " ".join(digits))[: g.n_cells])


def _frame_digits() -> int:
    return GlyphGrid(GRID).n_cells // 2  # " d" per digit


def _unique_prime(seq: list[str], others: str) -> bool:
    """The sequence's first PRIME digits appear nowhere else in the video."""
    key = " ".join(seq[:PRIME])
    return " ".join(seq).count(key) == 1 and key.replace(" ", "") not in others


def make_video_item(rng: random.Random, task: str, idx: int, n_frames: int, out: Path) -> Item:
    """One video item of ``task`` with n_frames frames (n_frames x 256 visual tokens)."""
    if task not in VIDEO_TASKS:
        raise ValueError(f"unknown video task {task!r}; one of {VIDEO_TASKS}")
    per = _frame_digits()
    k = n_frames - 1 if task == "vthen" else rng.randrange(n_frames - (1 if task == "vspan" else 0))
    evidence = {k, k + 1} if task == "vspan" else {k}
    frames: list[Any] = []  # None where an evidence frame goes
    codes_text = ""
    for i in range(n_frames):
        if i in evidence:
            frames.append(None)
        else:
            _keys, codes, img = codes_image(rng, GRID, N_PAIRS)
            codes_text += " ".join(codes) + " "
            frames.append(img)
    while True:  # digits whose primed start is unique in the video
        seq = random_digits(rng, per * (2 if task == "vspan" else 1))
        text_digits = random_digits(rng, TEXT_DIGITS) if task == "vthen" else []
        full = seq + text_digits
        if _unique_prime(full, codes_text):
            break
    n_read = {"vframe": N_READ, "vspan": per - PRIME + N_NEXT, "vthen": per - PRIME + N_TEXT}[task]
    for j, i in enumerate(sorted(evidence)):
        frames[i] = _digit_frame(seq[j * per : (j + 1) * per])
    name = f"{task}-{n_frames * GRID * GRID}-{idx}"
    encode_video(frames, out / f"{name}.mkv")
    after = " " + " ".join(text_digits) if text_digits else ""
    prompt = f"Sequence:{MARKER}{after}\nSequence again: " + " ".join(full[:PRIME])
    answer = full[PRIME : PRIME + n_read]
    return Item(
        name,
        task,
        GRID,
        [],
        prompt,
        " ".join(answer),
        2 * n_read,
        {
            "n_frames": n_frames,
            "evidence_frames": sorted(evidence),
            "fps": FPS,
            "timestamp_ms": 0,
            # answer steps whose digit is in a frame (vthen: the rest are in the text)
            "image_steps": n_read - N_TEXT if task == "vthen" else n_read,
        },
        videos=[f"{name}.mkv"],
    )
