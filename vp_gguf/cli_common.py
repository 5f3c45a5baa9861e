"""What the `vp-gguf` commands share: number flags checked at parse time, the model/sampling/VisionPulse
flags (llama.cpp's names), opening the model from them, and one-line errors."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import gpu
from .sampling import DEFAULTS as SAMPLING
from .sampling import INT32_MAX, UINT32_MAX, SamplingParams
from .video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_TIMESTAMP_MS, Video

EXAMPLE = """example:
  vp-gguf run -m model.gguf --mmproj mmproj.gguf --image photo.png -p "Describe the image." -n 64
  vp-gguf run -m model.gguf --mmproj mmproj.gguf --image photo.png -p "Describe it." --visionpulse 5 --json
  vp-gguf run -m model.gguf --mmproj mmproj.gguf --image a.png --image b.png \\
      -p "What differs between <__media__> and <__media__>?" --json
  vp-gguf run --hf qwen2.5-vl-3b --image photo.png -p "Describe it." --visionpulse 5
  vp-gguf fetch ggml-org/gemma-3-4b-it-GGUF:Q8_0
  vp-gguf models
  vp-gguf demo                      # offline: Gemma 3 270M reads an image of 40 digits
  vp-gguf viz -m model.gguf --mmproj mmproj.gguf --image photo.png -p "Describe it." --visionpulse 5 -o out/
"""


MAX_THREADS = 512  # GGML_MAX_N_THREADS: ggml's thread pool has no more slots


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    """``in [lo, hi]``, ``>= lo`` or ``<= hi``, the bounds written in full (2147483647, not 2.1e+09)."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"<= {hi}" if hi is not None else "finite"


def _int_in(lo: int | None = None, hi: int | None = INT32_MAX) -> Callable[[str], int]:
    """An argparse ``type=``: a base-10 integer in [lo, hi], refused at parse time with the range named."""

    def parse(s: str) -> int:
        try:
            v = int(s, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_range_text(lo, hi)}, got {s}")
        return v

    return parse


def _float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number in [lo, hi] ((lo, hi] when ``lo_open``); NaN and inf are refused."""

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        low_ok = lo is None or (v > lo if lo_open else v >= lo)
        if not math.isfinite(v) or not low_ok or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number {_range_text(lo, hi, lo_open)}, got {s}")
        return v

    return parse


_FRACTION = _float_in(0, 1, lo_open=True)  # a kept fraction of the visual tokens


def _gpu_layers(s: str) -> gpu.GpuLayers:
    """-ngl's argparse type: auto, all or a count (llama.cpp's spelling)."""
    try:
        n = gpu.parse(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto', 'all' or an integer >= -1, got {s!r}") from None
    if isinstance(n, int) and n > INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer <= {INT32_MAX}, got {s}")
    return n


def _rpc_servers(s: str) -> tuple[str, ...]:
    """--rpc's argparse type: host:port[,host:port...] (llama.cpp's spelling)."""
    from .rpc import parse_servers

    try:
        return parse_servers(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the usage block is what --help is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Model, context, sampling and VisionPulse flags shared by run and chat (llama.cpp's names)."""
    p.add_argument("-m", "--model", help="language model GGUF")
    p.add_argument("--mmproj", help="multimodal projector GGUF that belongs to the model")
    p.add_argument(
        "-hf",
        "--hf",
        metavar="REPO[:QUANT]",
        help="fetch the model and its mmproj from the hub (a catalog name or owner/repo[:QUANT])",
    )
    p.add_argument(
        "--no-escape",
        dest="escape",
        action="store_false",
        help="do not process escapes (\\n, \\t, ...) in the prompt (llama.cpp does by default)",
    )
    p.add_argument("-n", "--n-predict", type=_int_in(0), default=128, help="tokens to generate, >= 0 (default 128)")
    p.add_argument(
        "--temp",
        type=_float_in(0),
        default=SAMPLING.temperature,
        help=f"temperature; 0 is greedy (default {SAMPLING.temperature:g})",
    )
    p.add_argument("--top-k", type=_int_in(0), default=SAMPLING.top_k, help=f"(default {SAMPLING.top_k}; 0: off)")
    p.add_argument(
        "--top-p", type=_float_in(0, 1), default=SAMPLING.top_p, help=f"(default {SAMPLING.top_p:g}; 1: off)"
    )
    p.add_argument(
        "--min-p", type=_float_in(0, 1), default=SAMPLING.min_p, help=f"(default {SAMPLING.min_p:g}; 0: off)"
    )
    p.add_argument("--seed", type=_int_in(0, UINT32_MAX), default=SAMPLING.seed, help="sampling seed (default random)")
    p.add_argument("-c", "--ctx-size", type=_int_in(16), default=4096, help="context size, >= 16 (default 4096)")
    p.add_argument("-b", "--batch-size", type=_int_in(1), default=2048, help="logical batch size (default 2048)")
    p.add_argument(
        "-t", "--threads", type=_int_in(1, MAX_THREADS), default=None, help="CPU threads, 1 to 512 (default: all cores)"
    )
    p.add_argument(
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        dest="n_gpu_layers",
        type=_gpu_layers,
        default=gpu.AUTO,
        metavar="N|auto|all",
        help="layers to offload to the GPU: a number, 'all', or 'auto' (default: all that fit; none on a CPU build)",
    )
    p.add_argument(
        "--rpc",
        type=_rpc_servers,
        default=None,
        metavar="HOST:PORT[,...]",
        help="rpc-server hosts (`vp-gguf rpc-server` on each) that -ngl offloads layers to, before local GPUs",
    )
    p.add_argument(
        "-nr",
        "--no-repack",
        dest="repack",
        action="store_false",
        help="keep CPU weights in the file's layout (llama.cpp's; its faster kernels are not used)",
    )
    p.add_argument(
        "-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto", help="flash attention (default auto)"
    )
    p.add_argument(
        "--swa-full",
        action="store_true",
        help="full-size cache for sliding-window layers (keeps earlier turns reusable on Gemma 3 and the like)",
    )
    v = p.add_argument_group("video (read by ffmpeg)")
    v.add_argument(
        "--video-fps",
        type=_float_in(0, lo_open=True),
        default=DEFAULT_FPS,
        help=f"frames per second to sample (default {DEFAULT_FPS:g})",
    )
    v.add_argument(
        "--video-max-frames",
        type=_int_in(1),
        default=DEFAULT_MAX_FRAMES,
        help=f"at most this many frames, spread over the whole video (default {DEFAULT_MAX_FRAMES})",
    )
    v.add_argument(
        "--video-timestamp-interval",
        type=_int_in(0),
        default=DEFAULT_TIMESTAMP_MS,
        metavar="MS",
        help=f"a text timestamp every MS milliseconds of video (default {DEFAULT_TIMESTAMP_MS}; 0: none)",
    )
    v.add_argument(
        "--video-ffmpeg-dir", default=None, metavar="DIR", help="folder of ffmpeg and ffprobe (default: PATH)"
    )
    g = p.add_argument_group("VisionPulse (per-step visual token selection)")
    g.add_argument(
        "--visionpulse",
        default="off",
        metavar="5|10|5+|10+|off",
        help="preset: 5 (keep <=5%% of visual tokens per step), 10, or off (default); 5+/10+ also keep only the "
        "best pages of visual tokens in the layers below the anchor (Quest; beyond the paper: faster at long "
        "visual contexts, less exact)",
    )
    g.add_argument(
        "--mode",
        default=None,
        choices=["visionpulse", "dense", "fixed", "random", "static"],
        help="selection mode to compare with (default visionpulse when a preset is on)",
    )
    g.add_argument(
        "--vp-tau", type=_float_in(0, lo_open=True), default=None, help="temperature of the visual-mass softmax"
    )
    g.add_argument("--vp-budget-min", type=_FRACTION, default=None, help="lower clamp of the kept fraction")
    g.add_argument("--vp-budget-max", type=_FRACTION, default=None, help="upper clamp of the kept fraction")
    g.add_argument("--vp-ratio", type=_FRACTION, default=None, help="kept fraction for --mode fixed/static")
    g.add_argument("--vp-anchor", type=_int_in(0), default=None, help="anchor layer (default: nearest 47%% of depth)")
    g.add_argument("--vp-seed", type=_int_in(0, UINT32_MAX), default=0, help="seed of --mode random")
    g.add_argument(
        "--vp-attn",
        choices=["auto", "mask", "gather"],
        default="auto",
        help="how later layers skip dropped tokens (default auto: per backend; same result)",
    )
    g.add_argument(
        "--vp-lagged",
        action="store_true",
        help="also prune the layers before the anchor with the previous step's set (opt-in)",
    )
    g.add_argument(
        "--vp-quest-min",
        type=_FRACTION,
        default=None,
        help="with 5+: lower clamp of the kept share of pages (default: the library's)",
    )
    g.add_argument(
        "--vp-quest-max",
        type=_FRACTION,
        default=None,
        help="with 5+: upper clamp of the kept share of pages (default: the library's)",
    )
    g.add_argument(
        "--vp-prune-anchor",
        action="store_true",
        help="the anchor layer attends to its own selection too (the reference's eager path; default: dense)",
    )
    g.add_argument(
        "--vp-min-pruned-layers",
        type=_int_in(0),
        default=None,
        metavar="N",
        help="skip the selection (dense steps, reported) where fewer full-attention layers than N would be "
        "pruned: it cannot pay there (default 2; 0: never skip)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's logs")
    _add_output_controls(p)


def _add_output_controls(p: argparse.ArgumentParser) -> None:
    """Stop strings, repetition penalties and grammars: llama.cpp's flags, defaults and ranges."""
    o = p.add_argument_group("output controls (llama.cpp's flags)")
    o.add_argument(
        "--stop",
        "-r",
        "--reverse-prompt",
        dest="stop",
        action="append",
        default=[],
        metavar="STR",
        help="end the text where STR appears (STR not shown); repeat for several",
    )
    o.add_argument(
        "--repeat-penalty",
        type=_float_in(0, lo_open=True),
        default=SAMPLING.repeat_penalty,
        metavar="N",
        help=f"penalize tokens seen in the last --repeat-last-n (default {SAMPLING.repeat_penalty:g}: off)",
    )
    o.add_argument(
        "--repeat-last-n",
        type=_int_in(0),
        default=SAMPLING.repeat_last_n,
        metavar="N",
        help=f"tokens the penalties look back on, prompt included (default {SAMPLING.repeat_last_n}; 0: off)",
    )
    o.add_argument(
        "--presence-penalty",
        type=_float_in(),
        default=SAMPLING.presence_penalty,
        metavar="N",
        help=f"subtract N from a token seen (default {SAMPLING.presence_penalty:g}: off)",
    )
    o.add_argument(
        "--frequency-penalty",
        type=_float_in(),
        default=SAMPLING.frequency_penalty,
        metavar="N",
        help=f"subtract N per time a token was seen (default {SAMPLING.frequency_penalty:g}: off)",
    )
    g = o.add_mutually_exclusive_group()
    g.add_argument("--grammar", default=None, metavar="GBNF", help="constrain the text to a GBNF grammar")
    g.add_argument("--grammar-file", default=None, metavar="FILE", help="the GBNF grammar in FILE")
    g.add_argument(
        "-j",
        "--json-schema",
        default=None,
        metavar="SCHEMA",
        help='constrain the text to JSON that follows SCHEMA, e.g. \'{"type": "object"}\'',
    )
    g.add_argument("-jf", "--json-schema-file", default=None, metavar="FILE", help="the JSON schema in FILE")


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def process_escapes(s: str) -> str:
    """llama.cpp's prompt escapes: \\n \\r \\t \\' \\" \\\\ (anything else is kept as typed)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in _ESCAPES:
            out.append(_ESCAPES[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def visionpulse_from_args(a: argparse.Namespace):
    from .visionpulse import VisionPulse

    vp = VisionPulse.parse(a.visionpulse, mode=a.mode)
    if vp is None and a.mode is not None:
        vp = VisionPulse(mode=a.mode)
    if vp is not None:
        vp.tau, vp.budget_min, vp.budget_max = a.vp_tau, a.vp_budget_min, a.vp_budget_max
        vp.ratio, vp.anchor_layer, vp.seed = a.vp_ratio, a.vp_anchor, a.vp_seed
        vp.attn, vp.lagged = a.vp_attn, a.vp_lagged
        vp.prune_anchor = True if a.vp_prune_anchor else None
        vp.min_pruned_layers = a.vp_min_pruned_layers
        vp.quest_budget_min, vp.quest_budget_max = a.vp_quest_min, a.vp_quest_max
        vp.check()
    return vp


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def _add_template_args(p: argparse.ArgumentParser, raw: bool = True, system: bool = True) -> None:
    """The chat template flags (llama.cpp's names); the template applies unless --raw."""
    t = p.add_argument_group("chat template (default: the model's own; chatml if it has none)")
    t.add_argument(
        "--chat-template",
        nargs="?",
        const="",
        default=None,
        metavar="NAME|FILE",
        help="one of llama.cpp's template names (chatml, gemma, llama3, ...) or a Jinja file",
    )
    if raw:
        t.add_argument("--raw", action="store_true", help="send the prompt as written, in no chat template")
    if system:
        t.add_argument("-sys", "--system-prompt", default=None, help="system message")


def templated_prompt(model: Any, a: argparse.Namespace, n_media: int) -> str:
    """-p as the model gets it: the media markers placed (all in front if it has none) and, unless
    --raw, the system message and the prompt in the chat template."""
    from .prompt import place_markers

    text = place_markers(model, process_escapes(a.prompt) if a.escape else a.prompt, n_media)
    if a.raw:
        if a.system_prompt is not None:
            raise UsageError("-sys goes in the chat template: drop --raw, or write it into the prompt")
        return text
    system = [{"role": "system", "content": a.system_prompt}] if a.system_prompt is not None else []
    return str(model.apply_chat_template([*system, {"role": "user", "content": text}]))


def _template_choice(a: argparse.Namespace) -> str | None:
    """--chat-template's value, refused before the model loads if it names nothing."""
    spec = getattr(a, "chat_template", None) or None
    if spec is not None:
        from .templates import builtin_names, names_a_template

        if not names_a_template(spec):
            raise UsageError(
                f"--chat-template {spec}: not a file, nor one of llama.cpp's names: {', '.join(builtin_names())}"
            )
    return spec


def _open(a: argparse.Namespace):
    """(model, sampling, VisionPulse) from the shared flags."""
    from .model import ModelParams, VisionModel

    try:
        vp = visionpulse_from_args(a)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.hf:
        if a.model or a.mmproj:
            raise UsageError("give either --hf or -m/--mmproj")
        from .fetch import fetch

        m = fetch(a.hf)
        a.model, a.mmproj = str(m.model_path), str(m.mmproj_path)
    elif not (a.model and a.mmproj):
        raise UsageError("-m MODEL and --mmproj MMPROJ are required (or --hf REPO[:QUANT])")
    params = ModelParams(
        n_ctx=a.ctx_size,
        n_batch=a.batch_size,
        n_threads=a.threads,
        n_gpu_layers=a.n_gpu_layers,
        rpc=a.rpc,
        repack=a.repack,
        flash_attn=a.flash_attn,
        verbose=a.verbose,
        swa_full=a.swa_full,
        chat_template=_template_choice(a),
    )
    sampling = _sampling_from_args(a)
    return VisionModel(a.model, a.mmproj, params), sampling, vp


def _sampling_from_args(a: argparse.Namespace) -> SamplingParams:
    """The sampling flags; a grammar or schema file is read here, before the model loads."""
    from pathlib import Path

    def read(path: str | None) -> str | None:
        return Path(path).expanduser().read_text(encoding="utf-8") if path else None

    sampling = SamplingParams(
        temperature=a.temp,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        seed=a.seed,
        repeat_penalty=a.repeat_penalty,
        repeat_last_n=a.repeat_last_n,
        presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        grammar=a.grammar if a.grammar is not None else read(a.grammar_file),
        json_schema=a.json_schema if a.json_schema is not None else read(a.json_schema_file),
    )
    try:
        sampling.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return sampling


def _vp_line(res) -> str | None:
    if res is None or res.visionpulse is None or not res.visionpulse.steps:
        return None
    from .viz_stats import report_setting

    sm = res.visionpulse.summary()
    return (
        f"[{report_setting(res.visionpulse).label()}, anchor layer {res.visionpulse.anchor_layer}: "
        f"kept {100 * sm['retention_mean']:.1f}% of visual tokens per step "
        f"(min {100 * sm['retention_min']:.1f}%, max {100 * sm['retention_max']:.1f}%), "
        f"visual mass {sm['mass_mean']:.3f}]"
    )


def videos_from_args(a: argparse.Namespace, paths: Sequence[str] | None = None) -> list[Video]:
    """The --video files (or ``paths``) with the --video-* sampling flags."""
    return [
        Video(
            p,
            fps=a.video_fps,
            max_frames=a.video_max_frames,
            timestamp_ms=a.video_timestamp_interval,
            ffmpeg_dir=a.video_ffmpeg_dir,
        )
        for p in (a.video if paths is None else paths)
    ]


TRACEBACK_ENV = "VP_GGUF_TRACEBACK"  # set (to anything but 0) to see the traceback of any error


def _one_line(e: BaseException) -> str:
    """An exception as one line: what it says, its lines joined (an OSError: the file and the reason)."""
    if isinstance(e, OSError) and e.strerror:
        msg = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        msg = str(e) or e.__class__.__name__
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _report(e: BaseException, verbose: bool, expected: bool = True) -> None:
    """Print ``vp-gguf: error: ...`` on stderr; the traceback only with -v or $VP_GGUF_TRACEBACK."""
    import traceback

    show = verbose or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0")
    if show:
        traceback.print_exception(e)
    what = _one_line(e) if expected else f"{e.__class__.__name__}: {_one_line(e)}"
    hint = "" if expected or show else f" (run with -v or {TRACEBACK_ENV}=1 for the traceback)"
    print(f"vp-gguf: error: {what}{hint}", file=sys.stderr)
