"""The `vp-gguf` command line. Flag names follow llama.cpp's tools where they overlap."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from . import cli_rpc
from .cli_chat import _add_chat, cmd_chat
from .cli_common import (
    EXAMPLE,
    TRACEBACK_ENV,
    UsageError,
    _add_model_args,
    _add_template_args,
    _float_in,
    _int_in,
    _open,
    _Parser,
    _report,
    _vp_line,
    templated_prompt,
    videos_from_args,
)
from .cli_models import _add_fetch, cmd_fetch, cmd_models
from .errors import VPGGUFError

__all__ = ["build_parser", "main"]


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
        "--json",
        action="store_true",
        help="print one JSON object instead of the text (with per-step VisionPulse stats)",
    )
    _add_template_args(p)
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
    p.add_argument("-o", "--out", default="vp-viz", help="output folder (default ./vp-viz)")
    p.add_argument("--frames", type=_int_in(1), default=8, help="frames in the strip, early to late (default 8)")
    p.add_argument("--every", type=_int_in(1), default=None, help="a frame every k steps instead (strip and GIF)")
    p.add_argument("--no-gif", dest="gif", action="store_false", help="skip the animated GIF")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the mass/budget/K plot")
    p.add_argument(
        "--no-crop",
        dest="crop_blank",
        action="store_false",
        help="draw the whole images (default: blank rows and columns at their bottom and right are cut)",
    )
    # cutting became the default: the old opt-in stays accepted so that scripts keep working
    p.add_argument("--crop-blank", dest="crop_blank", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(crop_blank=True)
    _add_template_args(p)
    _add_model_args(p)


def cmd_viz(a: argparse.Namespace) -> int:
    from .viz import plot_missing, visualize

    if a.visionpulse == "off" and a.mode is None:
        raise UsageError("viz draws VisionPulse's choices: pass --visionpulse 5 (or 10, or --mode ...)")
    model, sampling, vp = _open(a)
    missing = plot_missing() if a.plot else None  # the pictures are still worth drawing without the plot
    videos = videos_from_args(a)
    with model:
        res = model.generate(
            templated_prompt(model, a, len(a.image) + len(videos)),
            images=a.image,
            videos=videos,
            max_tokens=a.n_predict,
            sampling=sampling,
            visionpulse=vp,
            stop=a.stop,
        )
        print(res.text)
        paths = visualize(
            model,
            res,
            a.image,
            a.out,
            videos=videos,
            n_frames=a.frames,
            every=a.every,
            gif=a.gif,
            plot=a.plot and missing is None,
            crop_blank=a.crop_blank,
            setting=vp,
        )
    if _vp_line(res):
        print(_vp_line(res), file=sys.stderr)
    for k, v in paths.items():
        print(f"{k}: {v}", file=sys.stderr)
    if missing:
        print(f"stats.png skipped: {missing}", file=sys.stderr)
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
    s.add_argument(
        "--metrics",
        action="store_true",
        help="serve /metrics (Prometheus text: requests, queue, tokens, seconds, VisionPulse retention; "
        "it asks for the API key when one is set)",
    )
    _add_template_args(p, raw=False, system=False)
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
        from .server_loading import answering_loading
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
    with answering_loading(a.host, a.port):  # the port answers "loading" (a taken port fails here, at once)
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
            stop=a.stop,
            metrics=a.metrics,
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
    # without -n each item keeps its own max_tokens (its "max_tokens", else 16 for choices, 64 otherwise)
    p.set_defaults(n_predict=None)
    p._option_string_actions["-n"].help = "tokens to generate per item, >= 0 (default: each item's max_tokens)"


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
    if a.n_predict is not None:  # given on the command line: it wins over the items' own
        items = [dataclasses.replace(it, max_tokens=a.n_predict) for it in items]
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


def _version_text() -> str:
    """vp-gguf's version and the llama.cpp its native libraries were built from (read, not loaded)."""
    from . import __version__
    from ._build_info import read
    from ._libdir import lib_dir

    try:
        d = lib_dir()
    except ImportError:
        return f"vp-gguf {__version__}\nllama.cpp: native libraries not found (build them with `make install`)"
    info = read(d) or {}
    build = (
        f"llama.cpp {info['llama_cpp_commit']} (vendored in llama-cpp-python {info['llama_cpp_python']})"
        if "llama_cpp_commit" in info
        else "llama.cpp: unknown build (no build info beside the libraries)"
    )
    return f"vp-gguf {__version__}\n{build}, libraries in {d}"


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="vp-gguf",
        description="Run GGUF vision-language models locally with VisionPulse. An error is one line on "
        f"stderr (exit 1; 2 for bad usage); -v or {TRACEBACK_ENV}=1 adds its traceback.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=_version_text())
    sub = ap.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_chat(sub)
    _add_viz(sub)
    _add_serve(sub)
    _add_eval(sub)
    _add_fetch(sub)
    from .demo import add_parser as add_demo

    add_demo(sub)
    cli_rpc.add_parser(sub)
    return ap


def cmd_run(a: argparse.Namespace) -> int:
    model, sampling, vp = _open(a)
    videos = videos_from_args(a)  # a bad --video-* value is refused before the model loads
    with model:
        prompt = templated_prompt(model, a, len(a.image) + len(videos))
        if a.json:
            res = model.generate(
                prompt,
                images=a.image,
                videos=videos,
                max_tokens=a.n_predict,
                sampling=sampling,
                visionpulse=vp,
                stop=a.stop,
            )
            json.dump(res.to_dict(), sys.stdout)
            sys.stdout.write("\n")
        else:
            for piece in model.stream(
                prompt,
                images=a.image,
                videos=videos,
                max_tokens=a.n_predict,
                sampling=sampling,
                visionpulse=vp,
                stop=a.stop,
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
    "rpc-server": cli_rpc.cmd,
}


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the command line says things: one line, no source location."""
    return f"vp-gguf: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: 0 done, 1 an error (one line on stderr), 2 bad usage, 130 interrupted."""
    a = build_parser().parse_args(argv)
    warnings.formatwarning = _warning_line
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
