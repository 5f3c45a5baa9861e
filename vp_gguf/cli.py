"""The `vp-gguf` command line. Flag names follow llama.cpp's tools where they overlap."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import VPGGUFError
from .sampling import DEFAULTS as SAMPLING
from .sampling import SamplingParams
from .video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_TIMESTAMP_MS, Video

EXAMPLE = """example:
  vp-gguf run -m model.gguf --mmproj mmproj.gguf --image photo.png -p "Describe the image." -n 64
  vp-gguf run -m model.gguf --mmproj mmproj.gguf --image photo.png -p "Describe it." --visionpulse 5 --json
  vp-gguf run -m model.gguf --mmproj mmproj.gguf --image a.png --image b.png \\
      -p "What differs between <__media__> and <__media__>?" --json
  vp-gguf run --hf qwen2.5-vl-3b --image photo.png -p "Describe it." --chat-template --visionpulse 5
  vp-gguf fetch ggml-org/gemma-3-4b-it-GGUF:Q8_0
  vp-gguf models
  vp-gguf demo                      # offline: Gemma 3 270M reads an image of 40 digits
  vp-gguf viz -m model.gguf --mmproj mmproj.gguf --image photo.png -p "Describe it." --visionpulse 5 -o out/
"""


INT32_MAX = 2**31 - 1  # llama.cpp takes int32: a larger count would wrap silently in C
UINT32_MAX = 2**32 - 1  # seeds are uint32
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
        "--n-gpu-layers",
        type=_int_in(-1),
        default=0,
        help="layers to offload to the GPU (default 0; -1 for all)",
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
        metavar="5|10|off",
        help="preset: 5 (keep <=5%% of visual tokens per step), 10, or off (default)",
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


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="generate text from images and a prompt",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="image file; repeat for several images (in the order of the markers)",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help="video file; repeat for several (their markers follow the images')",
    )
    p.add_argument(
        "-p",
        "--prompt",
        required=True,
        help="prompt; images go where the marker <__media__> is, else before the prompt",
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt in the model's chat template (default: raw prompt)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of the text (with per-step VisionPulse stats)",
    )
    _add_model_args(p)


CHAT_HELP = """commands: /image PATH, /video PATH (attach to your next message), /reset (new conversation),
          /stats (VisionPulse of the last reply), /quit; anything else is your message"""


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="talk with the model about images, turn by turn (/image PATH)",
        epilog=EXAMPLE + "\n" + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image(s) for the first message")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="video(s) for the first message")
    p.add_argument("-sys", "--system-prompt", default=None, help="system message")
    _add_model_args(p)


def _add_viz(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz",
        help="draw what VisionPulse keeps at each step (PNG strip, GIF, stats plot)",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image file(s)")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="video file(s), after the images")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("-o", "--out", default="vp-viz", help="output folder (default ./vp-viz)")
    p.add_argument("--frames", type=_int_in(1), default=8, help="frames in the strip, early to late (default 8)")
    p.add_argument("--every", type=_int_in(1), default=None, help="a frame every k steps instead (strip and GIF)")
    p.add_argument("--no-gif", dest="gif", action="store_false", help="skip the animated GIF")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the mass/budget/K plot")
    p.add_argument("--crop-blank", action="store_true", help="cut empty rows at the bottom of the images")
    _add_model_args(p)


def cmd_viz(a: argparse.Namespace) -> int:
    from .viz import visualize

    if a.visionpulse == "off" and a.mode is None:
        raise UsageError("viz draws VisionPulse's choices: pass --visionpulse 5 (or 10, or --mode ...)")
    model, sampling, vp = _open(a)
    if a.escape:
        a.prompt = process_escapes(a.prompt)
    with model:
        res = model.generate(
            a.prompt,
            images=a.image,
            videos=videos_from_args(a),
            max_tokens=a.n_predict,
            sampling=sampling,
            chat_template=a.chat_template,
            visionpulse=vp,
        )
        print(res.text)
        paths = visualize(
            model,
            res,
            a.image,
            a.out,
            videos=videos_from_args(a),
            n_frames=a.frames,
            every=a.every,
            gif=a.gif,
            plot=a.plot,
            crop_blank=a.crop_blank,
        )
    if _vp_line(res):
        print(_vp_line(res), file=sys.stderr)
    for k, v in paths.items():
        print(f"{k}: {v}", file=sys.stderr)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server (/v1/chat/completions, /v1/models)",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=_int_in(1, 65535), default=8080)
    p.add_argument("-a", "--alias", default=None, help="model name the API reports (default: the file name)")
    p.add_argument("--max-queue", type=_int_in(1), default=16, help="requests that may wait for the model (default 16)")
    s = p.add_argument_group("access (who may call, what file:// URLs may read)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("VP_GGUF_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' (default: $VP_GGUF_API_KEY; none)",
    )
    s.add_argument(
        "--media-path",
        default=None,
        metavar="DIR",
        help="file:// URLs may read files below DIR (default: file:// refused)",
    )
    s.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    from .server_policy import ServerLimits

    d = ServerLimits()
    lim = p.add_argument_group("limits of one request (each a 400 or 413 naming it)")
    lim.add_argument(
        "--max-body-mb", type=_float_in(0, lo_open=True), default=d.max_body_mb, help=f"(default {d.max_body_mb:g})"
    )
    lim.add_argument(
        "--max-messages", type=_int_in(1, None), default=d.max_messages, help=f"(default {d.max_messages})"
    )
    lim.add_argument(
        "--max-media", type=_int_in(1, None), default=d.max_media, help=f"images and videos (default {d.max_media})"
    )
    lim.add_argument(
        "--max-image-pixels",
        type=_int_in(1, None),
        default=d.max_image_pixels,
        help=f"one image (default {d.max_image_pixels:,})",
    )
    lim.add_argument(
        "--max-pixels",
        type=_int_in(1, None),
        default=d.max_pixels,
        help=f"images and video frames (default {d.max_pixels:,})",
    )
    lim.add_argument(
        "--max-image-mb", type=_float_in(0, lo_open=True), default=d.max_image_mb, help=f"(default {d.max_image_mb:g})"
    )
    lim.add_argument(
        "--max-video-mb", type=_float_in(0, lo_open=True), default=d.max_video_mb, help=f"(default {d.max_video_mb:g})"
    )
    _add_model_args(p)


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server import Access, create_app, is_loopback
        from .server_policy import ServerLimits, media_root
    except ImportError:
        raise UsageError("the server needs FastAPI and uvicorn: pip install 'vp-gguf[server]'") from None
    try:
        limits = ServerLimits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ServerLimits)})
        limits.check()
        if a.media_path:
            media_root(a.media_path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not is_loopback(a.host) and not a.api_key:
        print(
            f"vp-gguf serve: WARNING: listening on {a.host} without --api-key: anyone who can reach "
            "this address can use the model" + (" and read --media-path" if a.media_path else ""),
            file=sys.stderr,
        )
    model, sampling, vp = _open(a)
    with model:
        video = videos_from_args(a, ["-"])[0]  # the settings of every request's videos
        access = Access(api_key=a.api_key, bind_host=a.host, media_path=a.media_path, docs=a.docs)
        name = a.alias or model.model_path.stem
        app = create_app(
            model,
            name,
            vp,
            a.max_queue,
            video,
            sampling=sampling,
            max_tokens=a.n_predict if a.n_predict > 0 else model.n_ctx,
            limits=limits,
            access=access,
        )
        print(
            f"vp-gguf serve: http://{a.host}:{a.port}/v1 (model {name}, visionpulse {a.visionpulse})", file=sys.stderr
        )
        # a generation stops at its next token on shutdown; SIGTERM never waits on a slow client
        uvicorn.run(
            app,
            host=a.host,
            port=a.port,
            log_level="warning" if not a.verbose else "info",
            timeout_graceful_shutdown=3,
        )
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a JSONL of items in several selection modes, side by side",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("items", help="JSONL: images, question (or prompt), answer, optional choices")
    p.add_argument(
        "--modes",
        default="dense,visionpulse-5,visionpulse-10,static-5%,random-5",
        help="comma list (default: dense, visionpulse-5/10, static-5%%, random-5)",
    )
    p.add_argument("-o", "--out", default="vp-eval", help="output folder: results.jsonl, RESULTS.md, summary.json")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only items whose field KEY equals VALUE (e.g. grid=16)",
    )
    p.add_argument("--limit", type=_int_in(1), default=None, help="the first N items")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over instead of resuming")
    _add_model_args(p)


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import check_modes, markdown, read_items, run_eval, summarize
    from .runs import lock_folder

    try:
        where = dict(w.split("=", 1) for w in a.where)
    except ValueError:
        raise UsageError("--where takes KEY=VALUE") from None
    try:
        items = read_items(a.items, where)[: a.limit]
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if not items:
        raise UsageError(f"no items in {a.items}" + (f" with {a.where}" if a.where else ""))
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    try:
        check_modes(modes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with lock_folder(a.out, "eval") as out:  # before the model loads: a busy folder fails at once
        model, _sampling, _vp = _open(a)
        with model:
            rows = run_eval(model, items, modes, out, resume=a.resume)
        table = summarize(rows, modes, {it.id for it in items})
        title = f"{Path(a.items).name} on {Path(a.model).name}: {len(items)} items"
        cmd = "vp-gguf " + " ".join(_portable_arg(x) for x in sys.argv[1:])
        (out / "RESULTS.md").write_text(
            markdown(table, title) + f"\nWritten by `{cmd}`; per-item rows in results.jsonl.\n"
        )
        (out / "summary.json").write_text(json.dumps(table, indent=1))
    print(markdown(table, title))
    return 0


def _portable_arg(arg: str) -> str:
    """A command-line word for a results file: no machine's home folder in it (written as ~)."""
    import shlex

    home = str(Path.home())
    if arg == home or arg.startswith(home + os.sep):
        return "~" + shlex.quote(arg[len(home) :]) if arg != home else "~"
    return shlex.quote(arg)


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch",
        help="download a model and its mmproj from the Hugging Face hub",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="catalog name (see `vp-gguf models`) or owner/repo[:QUANT]")
    p.add_argument("-q", "--quant", default=None, help="quantization, e.g. Q4_K_M, Q8_0, F16")
    p.add_argument("--revision", default="main")
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    m = sub.add_parser("models", help="the catalog of known-good models, and what is cached here")
    m.add_argument("--online", action="store_true", help="also ask the hub for each default pair's files and sizes")
    m.add_argument("--json", action="store_true")


def cmd_fetch(a: argparse.Namespace) -> int:
    from .fetch import fetch

    m = fetch(a.name, a.quant, a.revision)
    if a.json:
        print(json.dumps({"repo": m.repo, "quant": m.quant, "model": str(m.model_path), "mmproj": str(m.mmproj_path)}))
    else:
        print(f"{m.repo} ({m.quant})\n  model:  {m.model_path}\n  mmproj: {m.mmproj_path}")
        print(
            f"run it: vp-gguf run -m {m.model_path} --mmproj {m.mmproj_path} --image IMAGE -p PROMPT", file=sys.stderr
        )
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .catalog import CATALOG
    from .fetch import FetchError, cached, choose_files, remote_files

    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "repo": e.repo,
            "family": e.family,
            "quants": list(e.quants),
            "default": e.default_quant,
            "cached": cached(e),
            "note": e.note,
        }
        for e in CATALOG
    ]
    if a.online:
        for r in rows:
            try:
                files = remote_files(r["repo"])
                mf, mm, _ = choose_files(list(files), r["default"])
                r["files"] = {"model": mf, "mmproj": mm}
                r["size_bytes"] = (files[mf].size or 0) + (files[mm].size or 0)
            except FetchError as e:
                r["error"] = str(e)
    if a.json:
        print(json.dumps(rows))
        return 0
    print(
        f"{'name':<22} {'repo':<44} {'quants (default first)':<24} {'cached':<8}"
        + ("  size  files" if a.online else "")
    )
    for r in rows:
        qs = [r["default"]] + [q for q in r["quants"] if q != r["default"]]
        line = f"{r['name']:<22} {r['repo']:<44} {','.join(qs):<24} {','.join(r['cached']) or '-':<8}"
        if a.online:
            line += (
                f"  {r['size_bytes'] / 1e9:.2f} GB  {r['files']['model']} + {r['files']['mmproj']}"
                if "files" in r
                else f"  ({r['error'][:60]})"
            )
        print(line)
    print(
        "\nvp-gguf fetch NAME [--quant Q] downloads one (sizes and files come from the hub); "
        "any other repo works as owner/repo[:QUANT].",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="vp-gguf",
        description="Run GGUF vision-language models locally with VisionPulse. An error is one line on "
        f"stderr (exit 1; 2 for bad usage); -v or {TRACEBACK_ENV}=1 adds its traceback.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_chat(sub)
    _add_viz(sub)
    _add_serve(sub)
    _add_eval(sub)
    _add_fetch(sub)
    from .demo import add_parser as add_demo

    add_demo(sub)
    return ap


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
        vp.check()
    return vp


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


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
        flash_attn=a.flash_attn,
        verbose=a.verbose,
        swa_full=a.swa_full,
    )
    sampling = SamplingParams(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, seed=a.seed)
    return VisionModel(a.model, a.mmproj, params), sampling, vp


def _vp_line(res) -> str | None:
    if res is None or res.visionpulse is None or not res.visionpulse.steps:
        return None
    sm = res.visionpulse.summary()
    return (
        f"[visionpulse {res.visionpulse.mode}, anchor layer {res.visionpulse.anchor_layer}: "
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


def cmd_run(a: argparse.Namespace) -> int:
    model, sampling, vp = _open(a)
    videos = videos_from_args(a)  # a bad --video-* value is refused before the model loads
    if a.escape:
        a.prompt = process_escapes(a.prompt)
    with model:
        if a.json:
            res = model.generate(
                a.prompt,
                images=a.image,
                videos=videos,
                max_tokens=a.n_predict,
                sampling=sampling,
                chat_template=a.chat_template,
                visionpulse=vp,
            )
            json.dump(res.to_dict(), sys.stdout)
            sys.stdout.write("\n")
        else:
            for piece in model.stream(
                a.prompt,
                images=a.image,
                videos=videos,
                max_tokens=a.n_predict,
                sampling=sampling,
                chat_template=a.chat_template,
                visionpulse=vp,
            ):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            res = model.last_result
            if res is not None:
                t = res.timings
                print(
                    f"[{res.n_prompt_tokens} prompt tokens ({res.n_image_tokens} image), "
                    f"{res.n_generated} generated; encode {t.image_encode_ms:.0f} ms, "
                    f"prefill {t.prefill_tok_s:.1f} tok/s, decode {t.decode_tok_s:.1f} tok/s]",
                    file=sys.stderr,
                )
                if _vp_line(res):
                    print(_vp_line(res), file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from .chat import Chat

    model, sampling, vp = _open(a)
    interactive = sys.stdin.isatty()
    with model:
        chat = Chat(model, system=a.system_prompt, sampling=sampling, visionpulse=vp, max_tokens=a.n_predict)
        for path in a.image:
            chat.attach(path)
        for video in videos_from_args(a):
            chat.attach_video(video)
        if interactive:
            print(f"vp-gguf chat with {model.model_path.name}. {CHAT_HELP}", file=sys.stderr)
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            cmd, _, arg = line.strip().partition(" ")
            try:
                if cmd in ("/quit", "/exit"):
                    break
                if cmd == "/image":
                    chat.attach(arg.strip())
                    print(f"[image attached: {arg.strip()}]", file=sys.stderr)
                elif cmd == "/video":
                    chat.attach_video(videos_from_args(a, [arg.strip()])[0])
                    print(f"[video attached: {arg.strip()}]", file=sys.stderr)
                elif cmd == "/reset":
                    chat.reset()
                    print("[new conversation]", file=sys.stderr)
                elif cmd == "/stats":
                    print(_vp_line(chat.last_result) or "[no VisionPulse steps in the last reply]", file=sys.stderr)
                elif cmd.startswith("/"):
                    print(f"[unknown command {cmd}] {CHAT_HELP}", file=sys.stderr)
                elif line.strip():
                    _chat_turn(chat, process_escapes(line) if a.escape else line)
            except (VPGGUFError, ValueError, OSError) as e:  # a bad image or video, a full context
                _report(e, a.verbose)
            except Exception as e:  # noqa: BLE001 - unexpected, yet the model is intact: keep the session
                _report(e, a.verbose, expected=False)
    return 0


def _chat_turn(chat: Any, text: str) -> None:
    """One message and its streamed reply; a failed turn says what it dropped (Chat.say drops it)."""
    n_media, wrote = len(chat.pending), False
    try:
        for piece in chat.say(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
            wrote = True
    except Exception:
        if wrote:
            sys.stdout.write("\n")
        if n_media:
            print(f"[turn dropped with its {n_media} attachment(s): attach again to retry]", file=sys.stderr)
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()


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


def _demo(a: argparse.Namespace) -> int:
    from .demo import run

    return run(a)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "chat": cmd_chat,
    "viz": cmd_viz,
    "serve": cmd_serve,
    "eval": cmd_eval,
    "fetch": cmd_fetch,
    "models": cmd_models,
    "demo": _demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: 0 done, 1 an error (one line on stderr), 2 bad usage, 130 interrupted."""
    a = build_parser().parse_args(argv)
    verbose = bool(getattr(a, "verbose", False))
    try:
        return COMMANDS[a.command](a)
    except UsageError as e:
        _report(e, verbose)
        return 2
    except KeyboardInterrupt:
        return 130
    except (VPGGUFError, ValueError, OSError) as e:  # bad input or a file: the message says what to do
        _report(e, verbose)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback on request
        _report(e, verbose, expected=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
