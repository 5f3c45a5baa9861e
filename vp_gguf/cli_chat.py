"""`vp-gguf chat`: a conversation about images and videos, turn by turn, on a terminal or a pipe.

On a terminal: readline's line editing and history, Ctrl-C stops a reply and keeps the conversation,
Ctrl-D quits. From a pipe: one line per message or command, Ctrl-C ends the session (a script
has no one to type the next line).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from .cli_common import (
    EXAMPLE,
    _add_model_args,
    _add_template_args,
    _open,
    _report,
    _vp_line,
    process_escapes,
    videos_from_args,
)
from .errors import VPGGUFError

CHAT_HELP = """commands: /image PATH, /video PATH (attach to your next message), /reset or /clear (new conversation),
          /stats (VisionPulse of the last reply), /help, /quit or /exit; anything else is your message"""
CHAT_KEYS = """keys on a terminal: Ctrl-C stops a reply and keeps what it said so far (pressed again: quits),
          or clears the line you are typing, or quits on an empty line; Ctrl-D on an empty line quits;
          the arrows edit the line and recall earlier ones (kept in chat_history in vp-gguf's cache folder),
          Tab completes the path after /image and /video"""
HISTORY_LINES = 1000  # the history file keeps the last this many lines


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="talk with the model about images, turn by turn (/image PATH)",
        epilog=f"{EXAMPLE}\n{CHAT_HELP}\n{CHAT_KEYS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image(s) for the first message")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="video(s) for the first message")
    _add_template_args(p, raw=False)
    _add_model_args(p)


def cmd_chat(a: argparse.Namespace) -> int:
    from .chat import Chat

    model, sampling, vp = _open(a)
    interactive = sys.stdin.isatty()
    # input() edits with readline only when both ends are the terminal; with the replies redirected, the
    # prompt must stay off stdout, so the line is read plainly (no editing) and the prompt goes to stderr
    save_history = _line_editing() if interactive and sys.stdout.isatty() else None
    editing = save_history is not None
    try:
        with model:
            model.check_sampling(sampling)  # a grammar that does not parse ends the session before it starts
            chat = Chat(
                model, system=a.system_prompt, sampling=sampling, visionpulse=vp, max_tokens=a.n_predict, stop=a.stop
            )
            for path in a.image:
                chat.attach(path)
            for video in videos_from_args(a):
                chat.attach_video(video)
            if interactive:
                print(f"vp-gguf chat with {model.model_path.name}. {CHAT_HELP}", file=sys.stderr)
            lines = _terminal_lines(editing) if interactive else iter(sys.stdin.readline, "")
            for line in lines:
                if not _command_or_message(chat, a, line.rstrip("\n"), interactive, editing):
                    break
    finally:
        if save_history is not None:
            save_history()
    return 0


def _command_or_message(chat: Any, a: argparse.Namespace, line: str, interactive: bool, editing: bool) -> bool:
    """Run one line; False when it asks to quit. An error is one line and the session goes on."""
    cmd, _, arg = line.strip().partition(" ")
    try:
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/image":
            chat.attach(arg.strip())
            print(f"[image attached: {arg.strip()}]", file=sys.stderr)
        elif cmd == "/video":
            chat.attach_video(videos_from_args(a, [arg.strip()])[0])
            print(f"[video attached: {arg.strip()}]", file=sys.stderr)
        elif cmd in ("/reset", "/clear"):  # /clear: llama-mtmd-cli's name for it
            chat.reset()
            print("[new conversation]", file=sys.stderr)
        elif cmd == "/stats":
            print(_vp_line(chat.last_result) or "[no VisionPulse steps in the last reply]", file=sys.stderr)
        elif cmd == "/help":
            where = f"\n          history file: {_history_file()}" if editing else ""
            print(f"{CHAT_HELP}\n{CHAT_KEYS}{where}", file=sys.stderr)
        elif cmd.startswith("/"):
            print(f"[unknown command {cmd}: /help lists the commands]", file=sys.stderr)
        elif line.strip():
            text = process_escapes(line) if a.escape else line
            if interactive:
                with _ctrl_c_stops_the_reply() as stopped:
                    _chat_turn(chat, text, stopped)
            else:
                _chat_turn(chat, text)
    except (VPGGUFError, ValueError, OSError) as e:  # a bad image or video, a full context
        _report(e, a.verbose)
    except Exception as e:  # noqa: BLE001 - unexpected, yet the model is intact: keep the session
        _report(e, a.verbose, expected=False)
    return True


def _chat_turn(chat: Any, text: str, stopped: Callable[[], bool] = lambda: False) -> None:
    """One message and its streamed reply, cut short once ``stopped()`` says so (Chat.say then keeps
    what was shown); a failed turn says what it dropped (Chat.say drops it)."""
    n_media, wrote, cut = len(chat.pending), False, False
    reply = chat.say(text)
    try:
        for piece in reply:
            sys.stdout.write(piece)  # shown before the check: the history keeps exactly what was shown
            sys.stdout.flush()
            wrote = True
            if stopped():
                cut = True
                break
    except KeyboardInterrupt:  # Ctrl-C pressed twice: the session ends (main says 130), on a new line
        sys.stdout.write("\n")
        raise
    except Exception:
        if wrote:
            sys.stdout.write("\n")
        if n_media:
            print(f"[turn dropped with its {n_media} attachment(s): attach again to retry]", file=sys.stderr)
        raise
    finally:
        reply.close()  # ends the generation now, wherever the loop left it
    sys.stdout.write("\n")
    sys.stdout.flush()
    if cut:
        print("[reply stopped]", file=sys.stderr)


@contextlib.contextmanager
def _ctrl_c_stops_the_reply() -> Iterator[Callable[[], bool]]:
    """While a reply streams, Ctrl-C asks it to stop at its next piece, as llama-mtmd-cli's does,
    instead of raising KeyboardInterrupt: that one can land between any two steps of the model's
    bookkeeping (a lock held, a buffer not yet freed, the record of the KV cache one token behind),
    while a reply stopped at a piece closes its generation the ordinary way. Pressed again, it
    quits at once: a long prefill (a large image on a CPU) gives no piece to stop at."""
    presses = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: presses > 0
    finally:
        signal.signal(signal.SIGINT, previous)


def _terminal_lines(editing: bool) -> Iterator[str]:
    """The user's lines at a "> " prompt, until Ctrl-D on an empty line (or Ctrl-C on one).

    Ctrl-C discards the line being typed, as a shell does, and on an empty line quits, as
    llama-mtmd-cli's Ctrl-C at its prompt does; without line editing the typed text is the
    terminal's, out of our sight, so there Ctrl-C quits. Leaving prints a newline, so that
    the shell's prompt starts on a line of its own."""
    prompt_to = sys.stdout if editing else sys.stderr  # readline writes input()'s prompt to stdout
    while True:
        try:
            if editing:
                line = input("> ")
            else:
                sys.stderr.write("> ")
                sys.stderr.flush()
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            prompt_to.write("\n")
            return
        except KeyboardInterrupt:
            prompt_to.write("\n")
            if editing and _typed_text():
                continue
            return
        yield line


def _typed_text() -> str:
    """What was on the line when Ctrl-C came (readline keeps it until the next input())."""
    import readline

    return readline.get_line_buffer()


def _history_file() -> Path:
    from .fetch import cache_dir

    return cache_dir() / "chat_history"


def _line_editing() -> Callable[[], None] | None:
    """Turn readline on for input() (editing, arrows, the history of earlier sessions, Tab completing
    the path after /image and /video); returns what saves this session's lines at the end, or None
    where Python has no readline (Windows).

    The history outlives the session, in a file in vp-gguf's cache, as Ollama's, the Python REPL's
    and a shell's do: up-arrow brings back yesterday's question or image path. It is created private
    (0600), since the lines are the user's prompts; deleting the cache forgets them."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_completer(_complete_path)
    readline.set_completer_delims(" \t\n")  # a path is one word, its slashes included
    # macOS's Python links libedit, whose configuration language is not readline's
    readline.parse_and_bind("bind ^I rl_complete" if "libedit" in (readline.__doc__ or "") else "tab: complete")
    path = _history_file()
    readline.set_history_length(HISTORY_LINES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # readline only appends to a file that exists
        readline.read_history_file(path)
    except OSError as e:
        print(f"[no chat history file: {e}]", file=sys.stderr)
        return lambda: None  # editing still works, for this session only
    n_before = readline.get_current_history_length()

    def save() -> None:
        try:  # appended, so that two sessions at once both keep their lines
            readline.append_history_file(readline.get_current_history_length() - n_before, path)
        except OSError as e:
            print(f"[chat history not saved: {e}]", file=sys.stderr)

    return save


def _complete_path(text: str, state: int) -> str | None:
    """readline's completer (asked for match 0, 1, ... until None): the files and folders that
    complete ``text`` when it follows /image or /video; nothing elsewhere (a message is free text)."""
    import readline

    if readline.get_line_buffer()[: readline.get_begidx()].split() not in (["/image"], ["/video"]):
        return None
    found = sorted(glob.glob(glob.escape(os.path.expanduser(text)) + "*"))
    matches = [f + os.sep if os.path.isdir(f) else f for f in found]
    return matches[state] if state < len(matches) else None
