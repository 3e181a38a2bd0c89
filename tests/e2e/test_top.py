"""``warmserve top`` as an operator sees it: run under a pseudo-terminal of a fixed size, its output fed to a
terminal emulator (pyte), keys typed into it, against a local cluster of sim workers with real demand."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pyte
import pytest
from openai import OpenAI

from tests.e2e.conftest import ROOT, start_cluster
from tooling.localcluster.processes import die_with_parent, free_port

pytestmark = pytest.mark.e2e

COLS, ROWS = 150, 40


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _own_terminal() -> None:
    """In the child: a session of its own with the pseudo-terminal (its stdin) as controlling terminal, so a
    size change reaches it as SIGWINCH, as in a real terminal; and SIGTERM should the test process die."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    die_with_parent()


class Terminal:
    """``warmserve top ARGS`` in a pseudo-terminal of ``ROWS`` x ``COLS``, rendered by pyte."""

    def __init__(self, env: dict[str, str], *args: str):
        self.master, slave = os.openpty()
        _set_size(slave, ROWS, COLS)
        env = {k: v for k, v in env.items() if k not in ("LINES", "COLUMNS")}  # the size is the terminal's
        self.proc = subprocess.Popen([sys.executable, "-m", "tooling.cli.main", "top", "--interval", "0.5", *args],
                                     stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True,
                                     env=dict(env, TERM="xterm-256color"), preexec_fn=_own_terminal)
        os.close(slave)
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)

    def pump(self, timeout: float = 0.2) -> None:
        """Feed whatever the program wrote within ``timeout`` into the emulator."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the program has exited and closed the terminal
                return
            self.stream.feed(data)

    @property
    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def wait_for(self, check, what: str, timeout: float = 60.0):
        """Read the screen until ``check(lines)`` is true (returns its value); fails with the screen otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            value = check(self.lines)
            if value:
                return value
            assert self.proc.poll() is None, f"top exited ({self.proc.returncode}):\n" + "\n".join(self.lines)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the screen:\n"
                             + "\n".join(self.lines))

    def press(self, key: str) -> None:
        os.write(self.master, key.encode())

    def resize(self, rows: int, cols: int) -> None:
        self.screen.resize(rows, cols)
        _set_size(self.master, rows, cols)

    def exit_status(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        return self.proc.poll()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def row(lines: list[str], first: str) -> list[str] | None:
    return next((line.split() for line in lines if line.split()[:1] == [first]), None)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    up = start_cluster(tmp_path_factory.mktemp("top"), "--engine", "sim", "--workers", "2", "--no-smoke",
                       timeout_s=180)
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def terminal():
    made: list[Terminal] = []
    yield lambda env, *args: made.append(Terminal(env, *args)) or made[-1]
    for t in made:
        t.close()


def test_top_shows_workers_and_models_and_answers_keys(cluster, terminal):
    client = OpenAI(base_url=f"http://127.0.0.1:{cluster.port}/v1", api_key=cluster.info["api_key"], max_retries=0,
                    timeout=60)
    for i in range(4):  # demand: top reads the last minute of it from the stream when it starts
        resp = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": f"hi {i}"}],
                                              max_tokens=4)
        assert resp.choices[0].message.content is not None

    top = terminal(cluster.env)
    memory = r"\d+(\.\d)? (MiB|GiB)"

    def workers_shown(lines):
        text = "\n".join(lines)
        return all(re.search(rf"^{w}\s+\S+\s+{memory}\s+{memory}\s+{memory}\s+{memory} \[[#=.]+\]", text, re.M)
                   for w in ("worker-0", "worker-1")) and "tiny-llama" in text
    top.wait_for(workers_shown, "both workers with memory figures and the tiny-llama copy")
    header = top.lines[0]
    assert "view: workers" in header and "sort: name" in header and re.search(r"refreshed \d\d:\d\d:\d\d", header)
    assert "cluster nats://127.0.0.1:" in header and "operator" not in header  # no credentials on screen
    assert top.lines[-1].startswith("q quit")

    top.press("m")
    rate = top.wait_for(lambda ls: "view: models" in ls[0] and (r := row(ls, "tiny-llama")) and float(r[5]) > 0
                        and float(r[5]), "the models view with tiny-llama's arrival rate")
    assert rate == pytest.approx(4 / 60, abs=0.02)  # 4 requests in the last minute
    assert "RATE/s" in "\n".join(top.lines) and "sort: name" in top.lines[0]

    top.press("s")
    top.wait_for(lambda ls: "sort: rate" in ls[0], "the sort label to change")
    top.press("\t")
    top.wait_for(lambda ls: "view: workers" in ls[0] and "sort: name" in ls[0], "Tab back to the workers view")

    top.resize(10, 60)  # smaller than a line: cut, never wrapped, and the footer stays on the last line
    top.wait_for(lambda ls: len(ls) == 10 and ls[0].startswith("warmserve top") and ls[-1].startswith("q quit")
                 and ls[2].startswith("worker-0"), "the view redrawn for a 60x10 terminal")

    top.press("q")
    assert top.exit_status(5.0) == 0, "\n".join(top.lines)


def test_an_unreachable_nats_is_said_on_screen_and_retried(tmp_path, terminal):
    port = free_port()  # nothing listens there
    env = dict(os.environ, WARMSERVE_STATE_DIR=str(tmp_path),
               WARMSERVE_OPERATOR_NATS_URL=f"nats://operator:s3cret@127.0.0.1:{port}")
    top = terminal(env, "--no-gateway")
    top.wait_for(lambda ls: any("NATS unreachable" in line for line in ls), "the NATS error on screen", timeout=30)
    text = "\n".join(top.lines)
    assert f"cluster nats://127.0.0.1:{port}" in top.lines[0] and "s3cret" not in text
    assert "refreshed never" in top.lines[0] and "no workers" in text
    top.press("q")
    assert top.exit_status(5.0) == 0, "\n".join(top.lines)
