"""Oracle: our greedy output equals llama.cpp's own llama-mtmd-cli built from the same tree.

llama-mtmd-cli cannot print token ids; it prints each generated token's piece
(special tokens included) to stdout. We compare those bytes with the pieces of
our generated ids, which pins the id sequence down up to tokens with identical
text. A raw chat template makes it use the prompt as given, like our API.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import FAMILIES

# builds llama.cpp's own llama-mtmd-cli (minutes the first time)
pytestmark = pytest.mark.slow

RAW_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
MARK = "@@VP-GGUF-RESPONSE@@"
N = 16


def run_cli(exe, model, mmproj, images, prompt, n, fa, n_ctx=1024, n_batch=2048):
    cmd = [str(exe), "-m", str(model), "--mmproj", str(mmproj), "-p", prompt, "-n", str(n),
           "--temp", "0", "--top-k", "1", "--repeat-penalty", "1", "-c", str(n_ctx), "-b", str(n_batch),
           "-ub", str(n_batch), "-fa", fa, "-t", "2", "--jinja", "--chat-template", RAW_TEMPLATE]
    for im in images:
        cmd += ["--image", str(im)]
    env = dict(os.environ, MTMD_TEST_RESPONSE_MARKER=MARK, GGML_NO_BACKTRACE="1")
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    out = r.stdout.split((MARK + "\n").encode(), 1)[1]
    return out[1:] if out.startswith(b"\n") else out  # the CLI prints "\n" before the answer


@pytest.mark.parametrize("fa", ["off", "on"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_llama_mtmd_cli(mtmd_cli, tiny_paths, load_model, images, family, fa):
    model, mmproj = tiny_paths(family)
    m = load_model(family, flash_attn=fa, n_batch=2048, n_ubatch=2048)
    for img in ("a", "jpeg"):
        ours = m.generate("Describe the picture.", images=[images[img]], max_tokens=N)
        ref = run_cli(mtmd_cli, model, mmproj, [images[img]], "Describe the picture.", N, fa)
        ours_bytes = b"".join(m.token_to_bytes(t, special=True) for t in ours.tokens)
        # the CLI ends with "\n" after an end-of-generation token, and "\n\n" at exit
        assert ref.rstrip(b"\n") == ours_bytes.rstrip(b"\n"), (family, fa, img)
        assert ours.n_generated > 0


def test_two_images_match_llama_mtmd_cli(mtmd_cli, tiny_paths, load_model, images):
    model, mmproj = tiny_paths("llava")
    m = load_model("llava", flash_attn="off", n_batch=2048, n_ubatch=2048)
    prompt = f"Left {m.marker} right {m.marker} compare them."
    ours = m.generate(prompt, images=[images["a"], images["grad"]], max_tokens=N)
    ref = run_cli(mtmd_cli, model, mmproj, [images["a"], images["grad"]], prompt, N, "off")
    ours_bytes = b"".join(m.token_to_bytes(t, special=True) for t in ours.tokens)
    assert ref.rstrip(b"\n") == ours_bytes.rstrip(b"\n")
