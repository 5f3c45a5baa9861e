"""Visual tasks whose evidence moves, for the glyph testbed.

Every item is an image (or two) of glyph tiles plus a prompt whose answer can
only be read from the image. Generators are seeded and deterministic. A suite is
a folder with `items.jsonl` (one item per line) and the PNGs it names:

    {"id": "copy-256-0", "task": "copy", "grid": 16, "images": ["copy-256-0.png"],
     "prompt": "Sequence:<__media__>\\nSequence again: 2 9", "answer": "1 7 ...", "max_tokens": 80}

- copy:   read back N digits laid out in the image (each generated digit needs another patch);
- lookup: key -> code among many pairs (the evidence is one small region);
- second: two images, a question about the second;
- many:   several images, the digits to read back in the last one;
grids of 16, 32 and 64 tiles a side give 256, 1024 and 4096 visual tokens per image.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL.Image import Image

from ..runs import jsonl
from .glyphs import GlyphGrid

MARKER = "<__media__>"
KEY_LETTERS = "ABCDEFGHKLMNPRSUVWXYZ"


@dataclass
class Item:
    id: str
    task: str
    grid: int  # tiles per side (the projector's image size / 14)
    images: list[str]  # file names, relative to the suite folder
    prompt: str  # one MARKER per image
    answer: str
    max_tokens: int
    meta: dict = field(default_factory=dict)
    videos: list[str] = field(default_factory=list)  # after the images, one MARKER each (video_tasks.py)

    def image_paths(self, suite_dir: Path) -> list[Path]:
        return [Path(suite_dir) / p for p in self.images]

    def video_paths(self, suite_dir: Path) -> list[Path]:
        return [Path(suite_dir) / p for p in self.videos]


READ_BACK_TASKS = ("copy", "second", "many", "vframe", "vspan", "vthen")  # the answer: digits read back
TASKS = (*READ_BACK_TASKS, "lookup")


def score(item: Item, text: str) -> bool:
    """Exact match on what the task asks for."""
    if item.task in READ_BACK_TASKS:
        want = item.answer.split()
        return text.split()[: len(want)] == want
    if item.task == "lookup":
        return text.strip()[: len(item.answer)] == item.answer
    raise ValueError(f"unknown task {item.task!r}")


def random_digits(rng: random.Random, n: int) -> list[str]:
    return [str(rng.randrange(10)) for _ in range(n)]


# The answer is primed with its first PRIME digits, as in the plain-text probe of the
# model ("Sequence again: 2 9" and let it continue): without them the 270M base model
# often starts counting "1 2 3 ..." whatever it was shown.
PRIME = 2


def _copy_prompt(prefix: str, digits: list[str]) -> str:
    return f"{prefix}Sequence:{MARKER}\nSequence again: " + " ".join(digits[:PRIME])


def _sequence_image(rng: random.Random, grid: int, n_digits: int, fill: bool) -> tuple[list[str], Image]:
    """n_digits to read back; with fill the rest of the grid holds more digits (no blank runs)."""
    g = GlyphGrid(grid)
    digits = random_digits(rng, g.n_cells // 2 if fill else n_digits)
    return digits, g.render((" " + " ".join(digits))[: g.n_cells])


def codes_image(rng: random.Random, grid: int, n_pairs: int) -> tuple[list[str], list[str], Image]:
    keys: list[str] = []
    while len(keys) < n_pairs:
        k = rng.choice(KEY_LETTERS) + str(rng.randrange(10))
        if k not in keys:
            keys.append(k)
    codes = ["".join(random_digits(rng, 4)) for _ in keys]
    img = GlyphGrid(grid).render(" " + "|".join(f"{k}:{c}" for k, c in zip(keys, codes)))
    return keys, codes, img


def make_copy(rng: random.Random, idx: int, grid: int, n_digits: int, out: Path) -> Item:
    """Read back n_digits from one image. Grids over 16 tiles a side are filled with digits:
    long blank runs make the model itself fail (see docs/testbed/RESULTS.md)."""
    fill = grid > 16
    digits, img = _sequence_image(rng, grid, n_digits, fill)
    name = f"copy-{grid * grid}-{idx}"
    img.save(out / f"{name}.png")
    return Item(
        name,
        "copy",
        grid,
        [f"{name}.png"],
        _copy_prompt("", digits),
        " ".join(digits[PRIME:n_digits]),
        2 * n_digits,
        {"n_digits": n_digits, "filled": fill},
    )


def make_lookup(rng: random.Random, idx: int, grid: int, n_pairs: int, out: Path) -> Item:
    keys, codes, img = codes_image(rng, grid, n_pairs)
    q = rng.randrange(n_pairs)
    name = f"lookup-{grid * grid}-{idx}"
    img.save(out / f"{name}.png")
    return Item(
        name,
        "lookup",
        grid,
        [f"{name}.png"],
        f"Codes:{MARKER}\n{keys[q]}:",
        codes[q],
        5,
        {"n_pairs": n_pairs, "key": keys[q], "pair_index": q},
    )


def _many(rng: random.Random, name: str, task: str, grid: int, n_images: int, n_digits: int, out: Path) -> Item:
    """n_images - 1 images of key:code pairs, then the sequence to read back."""
    files = []
    for j in range(n_images - 1):
        files.append(f"{name}-{j}.png")
        codes_image(rng, grid, 12)[2].save(out / files[-1])
    digits, img = _sequence_image(rng, grid, n_digits, False)
    files.append(f"{name}-{n_images - 1}.png")
    img.save(out / files[-1])
    prompt = f"Codes:{MARKER}\n" * (n_images - 1)
    return Item(
        name,
        task,
        grid,
        files,
        _copy_prompt(prompt, digits),
        " ".join(digits[PRIME:]),
        2 * n_digits,
        {"n_digits": n_digits, "n_images": n_images},
    )


def make_second(rng: random.Random, idx: int, grid: int, n_digits: int, out: Path) -> Item:
    """Two images, a question about the second: codes first, then the digits to read back."""
    return _many(rng, f"second-{grid * grid}x2-{idx}", "second", grid, 2, n_digits, out)


def make_many(rng: random.Random, idx: int, grid: int, n_images: int, out: Path) -> Item:
    """Several images (n_images x grid^2 visual tokens); the digits are in the last one."""
    return _many(rng, f"many-{grid * grid}x{n_images}-{idx}", "many", grid, n_images, 40, out)


SUITES: dict[str, list[tuple[Callable[..., Item], int, int, int]]] = {
    # name: list of (generator, grid, size, count); size = digits, pairs or images
    # default: 256 to 4096 visual tokens, one image or several
    "default": [
        (make_copy, 16, 40, 4),
        (make_lookup, 16, 12, 4),
        (make_second, 16, 40, 3),
        (make_copy, 32, 40, 2),
        (make_copy, 64, 40, 1),
        (make_many, 16, 16, 1),
    ],
    # extended: what the 270M model itself cannot do densely (kept to show it)
    "extended": [(make_lookup, 32, 48, 2), (make_lookup, 64, 160, 1)],
    "quick": [(make_copy, 16, 40, 2), (make_lookup, 16, 12, 2)],
}


def make_suite(name: str, out_dir: str | Path, seed: int = 0) -> list[Item]:
    """Generate suite `name` into out_dir (items.jsonl + PNGs); deterministic for a seed."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; one of {sorted(SUITES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for gen, grid, size, count in SUITES[name]:
        for i in range(count):
            items.append(gen(rng, i, grid, size, out))
    write_items(out / "items.jsonl", items)
    return items


def write_items(path: str | Path, items: list[Item]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(asdict(it)) + "\n" for it in items)


def read_items(path: str | Path) -> list[Item]:
    items = []
    for n, d in jsonl(path):
        try:
            items.append(Item(**d))
        except TypeError as e:
            raise ValueError(f"{path}:{n}: not a testbed item ({e})") from None
    return items
