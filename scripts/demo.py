#!/usr/bin/env python3
"""The README's main job on the built-in default: a tiny generated VLM, image in, text out.

The default model has random weights (no model can be downloaded here), so its
words are noise; what the demo shows is the whole path: an image is encoded
by the projector, prefilled with the prompt, and text is generated, with
counts and timings. Pass --model/--mmproj/--image to run a real model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".vp-cache" / "demo"


def demo_image(path: Path) -> Path:
    img = Image.new("RGB", (224, 224), (245, 245, 240))
    d = ImageDraw.Draw(img)
    d.ellipse((30, 30, 110, 110), fill=(220, 40, 40))
    d.rectangle((120, 120, 200, 200), fill=(40, 90, 220))
    d.text((20, 180), "vp-gguf", fill=(0, 0, 0))
    img.save(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--image")
    ap.add_argument("-p", "--prompt", default="What is in this image?")
    ap.add_argument("-n", type=int, default=24)
    a = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    if not a.model:
        from vp_gguf.testing.tiny_vlm import build_tiny_vlm
        a.model, a.mmproj = build_tiny_vlm("llava", CACHE)
        print(f"built-in default: tiny random-weight LLaVA-style VLM ({a.model})")
    image = a.image or demo_image(CACHE / "demo.png")
    from vp_gguf.cli import main as cli
    print(f"vp-gguf run -m {a.model} --mmproj {a.mmproj} --image {image} -p {a.prompt!r} -n {a.n}\n")
    return cli(["run", "-m", str(a.model), "--mmproj", str(a.mmproj), "--image", str(image),
                "-p", a.prompt, "-n", str(a.n), "--json"])


if __name__ == "__main__":
    sys.exit(main())
