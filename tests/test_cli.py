"""The vp-gguf command line."""
from __future__ import annotations

import json
import subprocess
import sys


def vp(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kw)


def describe(model, mmproj, image, n: int, *args):
    """`vp-gguf run` asking "Describe." of one image for n tokens (1024-token context, 2 threads)."""
    return vp("run", "-m", model, "--mmproj", mmproj, "--image", image, "-p", "Describe.", "-n", n, "-c", 1024, "-t", 2,
              *args)


def test_run_json(tiny_paths, images):
    model, mmproj = tiny_paths("llava")
    r = describe(model, mmproj, images["a"], 8, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"text", "tokens", "n_prompt_tokens", "n_image_tokens", "n_generated", "timings"}
    assert d["n_generated"] == len(d["tokens"]) > 0
    assert {"image_encode_ms", "prefill_ms", "decode_tok_s"} <= set(d["timings"])


def test_run_text_matches_json(tiny_paths, images):
    model, mmproj = tiny_paths("llava")
    common = ["run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "--image", images["b"],
              "-p", "Describe.", "-n", 8, "-c", 1024, "-t", 2]
    j = json.loads(vp(*common, "--json").stdout)
    t = vp(*common)
    assert t.returncode == 0, t.stderr
    assert t.stdout == j["text"] + "\n"
    assert "generated" in t.stderr


def test_run_reports_errors_clearly(tiny_paths, tmp_path):
    model, mmproj = tiny_paths("llava")
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    r = vp("run", "-m", model, "--mmproj", mmproj, "--image", bad, "-p", "Describe.")
    assert r.returncode == 1
    assert "vp-gguf: error:" in r.stderr and "cannot be read as an image" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_shows_an_example():
    r = vp("run", "--help")
    assert r.returncode == 0 and "example:" in r.stdout and "--mmproj" in r.stdout


def test_run_with_visionpulse_json(tiny_paths, images):
    model, mmproj = tiny_paths("gemma3")
    r = describe(model, mmproj, images["a"], 8, "--visionpulse", "5", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["visionpulse"]
    assert v["mode"] == "visionpulse" and v["settings"]["tau"] == 0.1
    assert len(v["steps"]) == v["summary"]["steps"] > 0
    assert {"n_visual", "n_kept", "mass", "mass_kept", "kept"} <= set(v["steps"][0])
    g = describe(model, mmproj, images["a"], 8, "--visionpulse", "5", "--vp-attn", "gather", "--vp-lagged",
                 "--vp-prune-anchor", "--json")
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout)["visionpulse"]["attn"] == "gather"
    assert json.loads(g.stdout)["visionpulse"]["settings"]["prune_anchor"] is True
    assert v["settings"]["prune_anchor"] is False  # the default: the anchor stays dense
    t = describe(model, mmproj, images["a"], 8, "--visionpulse", "10", "--mode", "random")
    assert t.returncode == 0 and "[random 5-10%, anchor layer" in t.stderr, t.stderr


def test_run_with_quest_pages(tiny_paths, images):
    """--visionpulse 5+: the preset with Quest pages below the anchor, said in the settings and the status line."""
    model, mmproj = tiny_paths("llava")
    r = describe(model, mmproj, images["a"], 6, "--visionpulse", "5+", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["visionpulse"]
    assert v["settings"]["quest"] == "bound" and v["settings"]["tau"] == 0.1
    t = describe(model, mmproj, images["a"], 4, "--visionpulse", "5+")
    assert t.returncode == 0 and "[VisionPulse 5, Quest pages below the anchor, anchor layer" in t.stderr, t.stderr
    w = describe(model, mmproj, images["a"], 4, "--visionpulse", "5+", "--vp-quest-min", "0.75", "--vp-quest-max",
                 "0.75", "--json")
    assert w.returncode == 0, w.stderr
    s = json.loads(w.stdout)["visionpulse"]["settings"]
    assert (s["quest_budget_min"], s["quest_budget_max"]) == (0.75, 0.75)
    bad = vp("run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "-p", "x", "--visionpulse", "5+",
             "--vp-lagged")
    assert bad.returncode == 2 and "lagged" in bad.stderr and "Traceback" not in bad.stderr


def test_run_rejects_bad_visionpulse_settings(tiny_paths, images):
    model, mmproj = tiny_paths("llava")
    for args, msg in ((["--visionpulse", "7"], "preset"), (["--visionpulse", "5", "--vp-tau", "0"], "tau"),
                      (["--visionpulse", "5", "--vp-budget-min", "0.5", "--vp-budget-max", "0.1"], "exceeds")):
        r = vp("run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "-p", "x", *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_prompt_escapes_like_llama_cpp(tiny_paths, images, load_model):
    model, mmproj = tiny_paths("llava")
    common = ["run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "-n", 6, "-c", 1024, "-t", 2,
              "--json", "--raw"]
    esc = json.loads(vp(*common, "-p", r"Line one\nLine two").stdout)
    raw = json.loads(vp(*common, "-p", r"Line one\nLine two", "--no-escape").stdout)
    ref = load_model("llava").generate("Line one\nLine two", images=[images["a"]], max_tokens=6)
    assert esc["tokens"] == ref.tokens
    assert esc["n_prompt_tokens"] != raw["n_prompt_tokens"] or esc["tokens"] != raw["tokens"]


def test_chat_multi_turn_with_images(tiny_paths, images, tmp_path):
    model, mmproj = tiny_paths("gemma3")
    script = f"/image {images['a']}\nWhat is this?\n/image {tmp_path / 'missing.png'}\n" \
             f"/image {images['b']}\nAnd this one?\n/stats\n/reset\nHello\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "chat", "-m", str(model), "--mmproj", str(mmproj),
                        "-n", "4", "-c", "2048", "-t", "2", "--visionpulse", "5"],
                       input=script, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 3  # three replies
    assert "missing.png: no such file" in r.stderr  # a bad image is reported, the session goes on
    assert "[VisionPulse 5, anchor layer" in r.stderr and "[new conversation]" in r.stderr


def test_chat_history_renders_images_in_their_turns(load_model, images):
    from vp_gguf.chat import IMAGE, Chat
    m = load_model("gemma3")
    c = Chat(m, max_tokens=3)
    c.attach(images["a"])
    first = "".join(c.say("One?"))
    c.attach(images["b"])
    "".join(c.say("Two?"))
    assert [msg["content"].count(IMAGE) for msg in c.messages if msg["role"] == "user"] == [1, 1]
    assert c.images == [images["a"], images["b"]] and c.last_result.n_image_tokens > 0
    assert c.messages[1]["content"] == first
