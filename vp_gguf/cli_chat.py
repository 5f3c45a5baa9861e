"""`vp-gguf chat`: a conversation about images and videos, turn by turn, on a terminal or a pipe."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_common import EXAMPLE, _add_model_args, _open, _report, _vp_line, process_escapes, videos_from_args
from .errors import VPGGUFError

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
