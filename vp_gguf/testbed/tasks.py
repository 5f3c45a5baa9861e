"""Visual tasks whose evidence moves, for the glyph testbed.

Every item is an image (or two) of glyph tiles plus a prompt whose answer can
only be read from the image. Generators are seeded and deterministic. A suite is
a folder with `items.jsonl` (one item per line) and the PNGs it names:

    {"id": "copy-256-0", "task": "copy", "grid": 16, "images": ["copy-256-0.png"],
     "prompt": "Sequence:<__media__>\\nSequence again:", "answer": "2 9 1 ...", "max_tokens": 82}

- copy:   read back N digits laid out in the image (each generated digit needs another patch);
- lookup: key -> code among many pairs (the evidence is one small region);
- second: two images, a question about the second;
grids of 16, 32 and 64 tiles a side give 256, 1024 and 4096 visual tokens per image.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .glyphs import GlyphGrid

MARKER = "<__media__>"
KEY_LETTERS = "ABCDEFGHKLMNPRSUVWXYZ"


@dataclass
class Item:
    id: str
    task: str
    grid: int                 # tiles per side (the projector's image size / 14)
    images: list[str]         # file names, relative to the suite folder
    prompt: str               # one MARKER per image
    answer: str
    max_tokens: int
    meta: dict = field(default_factory=dict)

    def image_paths(self, suite_dir: Path) -> list[Path]:
        return [Path(suite_dir) / p for p in self.images]


def score(item: Item, text: str) -> bool:
    """Exact match on what the task asks for."""
    if item.task in ("copy", "second"):
        want = item.answer.split()
        return text.split()[:len(want)] == want
    if item.task == "lookup":
        return text.strip()[:len(item.answer)] == item.answer
    raise ValueError(f"unknown task {item.task!r}")


def _digits(rng: random.Random, n: int) -> list[str]:
    return [str(rng.randrange(10)) for _ in range(n)]


def make_copy(rng: random.Random, idx: int, grid: int, n_digits: int, out: Path) -> Item:
    digits = _digits(rng, n_digits)
    name = f"copy-{grid * grid}-{idx}"
    GlyphGrid(grid).render(" " + " ".join(digits)).save(out / f"{name}.png")
    return Item(name, "copy", grid, [f"{name}.png"], f"Sequence:{MARKER}\nSequence again:",
                " ".join(digits), 2 * n_digits + 2, {"n_digits": n_digits})


def make_lookup(rng: random.Random, idx: int, grid: int, n_pairs: int, out: Path) -> Item:
    keys: list[str] = []
    while len(keys) < n_pairs:
        k = rng.choice(KEY_LETTERS) + str(rng.randrange(10))
        if k not in keys:
            keys.append(k)
    codes = ["".join(_digits(rng, 4)) for _ in keys]
    q = rng.randrange(n_pairs)
    name = f"lookup-{grid * grid}-{idx}"
    body = "|".join(f"{k}:{c}" for k, c in zip(keys, codes))
    GlyphGrid(grid).render(" " + body).save(out / f"{name}.png")
    return Item(name, "lookup", grid, [f"{name}.png"], f"Codes:{MARKER}\n{keys[q]}:", codes[q], 5,
                {"n_pairs": n_pairs, "key": keys[q], "pair_index": q})


def make_second(rng: random.Random, idx: int, grid: int, n_digits: int, out: Path) -> Item:
    name = f"second-{grid * grid}x2-{idx}"
    seqs = [_digits(rng, n_digits), _digits(rng, n_digits)]
    files = []
    for j, s in enumerate(seqs):
        files.append(f"{name}-{j}.png")
        GlyphGrid(grid).render(" " + " ".join(s)).save(out / files[-1])
    return Item(name, "second", grid, files, f"First:{MARKER}\nSecond:{MARKER}\nSecond again:",
                " ".join(seqs[1]), 2 * n_digits + 2, {"n_digits": n_digits})


SUITES = {
    # name: list of (generator, grid, size, count)
    # default: the tasks Gemma 3 270M solves densely (validity first) - 256 visual tokens
    "default": [(make_copy, 16, 40, 5), (make_lookup, 16, 12, 5)],
    # extended: larger images and two images. Not valid yet: with long runs of blank tiles,
    # or two images, or 48+ pairs, the 270M model itself fails densely (see docs/testbed)
    "extended": [(make_second, 16, 24, 3), (make_copy, 32, 40, 1), (make_lookup, 32, 48, 2),
                 (make_lookup, 64, 160, 1)],
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
        for it in items:
            f.write(json.dumps(asdict(it)) + "\n")


def read_items(path: str | Path) -> list[Item]:
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                items.append(Item(**d))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a testbed item ({e})") from None
    return items
