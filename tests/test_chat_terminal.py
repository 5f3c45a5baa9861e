"""`vp-gguf chat` on a real terminal (a pseudo-terminal that is the session's controlling tty, so that
Ctrl-C is a SIGINT from the line discipline, as a user's is): line editing and history, Ctrl-C stopping
a reply and keeping the conversation, /help, Ctrl-D. Every wait is for a marker in the output, with a
deadline, so a test fails instead of hanging."""
from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from vp_gguf.chat import Chat

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = float(os.environ.get("CHAT_TERMINAL_DEADLINE", 180))  # seconds for any one marker: a loaded 2-core machine loads the model and prefills slowly
UP = b"\x1b[A"
CTRL_C, CTRL_D = b"\x03", b"\x04"


def _foreground_job() -> None:
    """In the child: take the pseudo-terminal as the controlling tty and SIGINT at its default, as a
    shell starts a foreground command. A test run started in the background of a script inherits
    SIGINT ignored (POSIX: a non-interactive shell's `&` ignores it), and a Python started that way
    keeps it ignored: Ctrl-C at the prompt would do nothing."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`vp-gguf chat` on a pseudo-terminal: send keys, wait for output."""

    def __init__(self, args: list[str], cache: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
        env = {**os.environ, "TERM": "xterm", "INPUTRC": os.devnull, "VP_GGUF_CACHE": str(cache)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vp_gguf.cli", "chat", *args], cwd=ROOT, env=env,
            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
            # a session of its own whose controlling tty is this one: Ctrl-C reaches it as SIGINT
            start_new_session=True, preexec_fn=_foreground_job)
        os.close(slave)
        self.master, self.out = master, b""

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def _read(self, until: float) -> bool:
        """Read what there is (until the deadline); False once the terminal is closed."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, min(0.2, until - time.monotonic())))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every process holding the other end has exited
            return False
        self.out += data
        return bool(data)

    def expect(self, marker: bytes, start: int = 0) -> int:
        """Wait for ``marker`` after output offset ``start``; returns the offset just past it."""
        until = time.monotonic() + DEADLINE
        while (i := self.out.find(marker, start)) < 0:
            if time.monotonic() > until or not self._read(until):
                pytest.fail(f"no {marker!r} in the output after offset {start}:\n{self.out[start:].decode(errors='replace')}")
        return i + len(marker)

    def expect_more(self, n: int, start: int) -> None:
        """Wait until ``n`` bytes have come after offset ``start`` (a reply is under way)."""
        until = time.monotonic() + DEADLINE
        while len(self.out) < start + n:
            if time.monotonic() > until or not self._read(until):
                pytest.fail(f"the reply did not come:\n{self.out[start:].decode(errors='replace')}")

    def idle(self) -> None:
        """Wait until the session sleeps: at a prompt, readline waits for a key in select(). A SIGINT
        that comes while readline is still redrawing is only acted on at the next signal (CPython's
        readline checks signals when select() is interrupted, not before it blocks): a person never
        presses Ctrl-C within microseconds of the redraw, a test would."""
        stat = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat")
        until = time.monotonic() + DEADLINE
        while stat.read_text().rpartition(")")[2].split()[0] != "S":
            if time.monotonic() > until:
                pytest.fail(f"the session never waited for a key:\n{self.out.decode(errors='replace')}")
            time.sleep(0.01)

    def wait(self) -> int:
        """The exit code, once the output has been read to its end."""
        until = time.monotonic() + DEADLINE
        while time.monotonic() < until and self._read(until):
            pass
        try:
            return self.proc.wait(timeout=max(1.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the session did not end:\n{self.out.decode(errors='replace')}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(tiny_paths, tmp_path):
    opened = []

    def start(*args: str) -> Terminal:
        model, mmproj = tiny_paths("llava")
        t = Terminal(["-m", str(model), "--mmproj", str(mmproj), "-c", "4096", "-t", "2", *args], tmp_path)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(terminal, tmp_path):
    t = terminal("-n", "2000")  # a reply far longer than the wait for it
    prompt = t.expect(b"> ", t.expect(b"vp-gguf chat with"))
    t.send(b"/help\r")
    shown = t.expect(b"> ", t.expect(b"Ctrl-D", t.expect(b"/clear", prompt)))

    t.send(b"Tell me a long story.\r")
    asked = t.expect(b"Tell me a long story.\r\n", shown)
    t.expect_more(40, asked)
    t.send(CTRL_C)
    stopped = t.expect(b"> ", t.expect(b"[reply stopped]", asked))
    assert t.proc.poll() is None  # the session goes on

    t.send(UP)  # the history: the message comes back on the line
    recalled = t.expect(b"Tell me a long story.", stopped)
    t.send(b"\r")
    t.expect_more(40, t.expect(b"\r\n", recalled))  # answered: the model was left free and in order
    t.send(CTRL_C)
    again = t.expect(b"> ", t.expect(b"[reply stopped]", recalled))

    t.send(b"/nonsense\r")
    again = t.expect(b"> ", t.expect(b"/help lists the commands", again))
    t.send(b"half a thought")
    t.expect(b"half a thought", again)
    t.idle()
    t.send(CTRL_C)  # clears the line, as a shell does
    cleared = t.expect(b"> ", again)
    t.send(CTRL_D)
    assert t.wait() == 0
    assert t.out[cleared:].endswith(b"\n"), t.out[cleared:]  # the shell's prompt starts on a new line
    assert "Traceback" not in t.out.decode(errors="replace")
    history = (tmp_path / "chat_history").read_text().splitlines()
    assert history[-2:] == ["Tell me a long story.", "/nonsense"] and "half a thought" not in history
    assert (tmp_path / "chat_history").stat().st_mode & 0o077 == 0  # the user's prompts: private


def test_history_of_an_earlier_session_tab_completion_and_ctrl_c_on_an_empty_line(terminal, tmp_path, images):
    (tmp_path / "chat_history").write_text("what did the first session ask?\n")
    t = terminal("-n", "4")
    prompt = t.expect(b"> ", t.expect(b"vp-gguf chat with"))
    t.send(UP)
    recalled = t.expect(b"what did the first session ask?", prompt)
    t.idle()
    t.send(CTRL_C)  # the line is cleared: the session goes on
    empty = t.expect(b"> ", recalled)
    assert t.proc.poll() is None

    typed = f"/image {images['a'].parent}{os.sep}a.p".encode()
    t.send(typed + b"\t")  # Tab completes the file's name
    t.expect(typed, empty)
    t.idle()
    t.send(b"\r")
    attached = t.expect(b"> ", t.expect(f"[image attached: {images['a']}]".encode(), empty))
    t.idle()
    t.send(CTRL_C)  # on an empty line: quits, as llama-mtmd-cli's Ctrl-C at its prompt does
    assert t.wait() == 0
    assert t.out[attached:].endswith(b"\n") and "Traceback" not in t.out.decode(errors="replace")


def test_ctrl_c_during_a_reply_asks_it_to_stop_and_pressed_again_quits():
    """In-process (pytest's main thread takes the signals): the handler a reply runs under."""
    from vp_gguf.cli_chat import _ctrl_c_stops_the_reply

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _ctrl_c_stops_the_reply() as stopped:
        assert not stopped()
        signal.raise_signal(signal.SIGINT)
        assert stopped()  # asked, and no KeyboardInterrupt: the reply stops at its next piece
        signal.raise_signal(signal.SIGINT)
        pytest.fail("a second Ctrl-C did not interrupt")
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stopped_reply_stays_in_the_conversation_and_its_cache(load_model, images):
    """Closing Chat.say mid-reply (what Ctrl-C does) keeps the turn with the text shown so far, frees
    the model at once, and leaves the KV cache's record true, so that the next turn reuses it."""
    from vp_gguf._libs import llama_cpp as L

    m = load_model("llava", n_ctx=4096)
    chat = Chat(m, max_tokens=500)
    chat.attach(images["a"])
    reply = chat.say("Describe it.")
    shown = "".join(next(reply) for _ in range(4))
    reply.close()
    assert chat.messages[-2]["content"][-1] == "Describe it."
    assert chat.messages[-1] == {"role": "assistant", "content": shown}
    assert chat.last_result is None and chat.images == [images["a"]] and chat.pending == []
    assert L.llama_memory_seq_pos_max(L.llama_get_memory(m._ctx), 0) == m._kv_units[-1][1]
    "".join(chat.say("Go on."))  # not ModelBusyError: the stopped generation has ended
    nxt = chat.last_result
    image = nxt.images[0]
    assert nxt.timings.image_encode_ms == 0 and nxt.n_cached_tokens > image.pos + image.n_tokens
