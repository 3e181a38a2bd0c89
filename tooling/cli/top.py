"""``warmserve top``: a live full-screen view of the cluster (workers and their memory, models and their load).

This module is only the curses shell: keys in, lines out, one asyncio loop shared with the reader
(``top_feed``, NATS and the gateway) so the screen never waits on the network. What is drawn is decided
by ``top_screen.render``, which is pure and unit-tested.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from contextlib import suppress

from shared.tasks import cancel_and_wait
from tooling.cli.top_screen import Ui, press, render

POLL_S = 0.05  # how often keys are read: short enough that a key feels instant


def _draw(scr, lines: list[str]) -> None:
    import curses

    scr.erase()
    height, width = scr.getmaxyx()
    for y, line in enumerate(lines[:height]):
        try:  # writing the bottom-right cell moves the cursor off the screen, which curses reports
            scr.addstr(y, 0, line[:width], curses.A_BOLD if y == 0 else curses.A_NORMAL)
        except curses.error:
            pass
    scr.refresh()


async def _shell(scr, feed, interval_s: float) -> None:
    """Redraw every ``interval_s`` with a fresh snapshot, and at once on a key or a resize."""
    import curses

    tab = {9: "\t", curses.KEY_BTAB: "\t"}  # Tab and Shift-Tab; other keys by their character
    with suppress(curses.error):  # a terminal without an invisible cursor keeps its cursor
        curses.curs_set(0)
    scr.nodelay(True)
    scr.keypad(True)
    reader = asyncio.create_task(feed.run())
    ui, snap, next_at = Ui(), None, 0.0
    try:
        while True:
            dirty = False
            if time.monotonic() >= next_at:
                snap, next_at, dirty = feed.snapshot(), time.monotonic() + interval_s, True
            while (key := scr.getch()) != -1:
                dirty = True
                if key != curses.KEY_RESIZE and 0 <= key < 0x110000:
                    ui = press(ui, tab.get(key, chr(key)))
                    if ui.quit:
                        return
            if dirty:
                height, width = scr.getmaxyx()
                _draw(scr, render(snap, ui, width, height))
            if reader.done() and reader.exception() is not None:  # a bug, not an outage: say it, do not hang
                raise reader.exception()
            await asyncio.sleep(POLL_S)
    finally:
        await cancel_and_wait([reader], timeout_s=3.0)  # nats-py can swallow one cancel: quitting must not hang


def cmd_top(a) -> int:
    import curses  # here, not at import: the rest of the CLI works where Python has no curses

    from tooling.cli.client import _gateway_url, _nats_url
    from tooling.cli.top_feed import Feed
    from tooling.localcluster.nats_auth import without_user

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        sys.exit("error: warmserve top needs a terminal (for a listing: warmserve workers, warmserve forecast status)")
    url = _nats_url()
    cluster = ",".join(without_user(u.strip()) for u in url.split(","))
    gateway = None if a.no_gateway else (a.gateway_url or _gateway_url()).rstrip("/")
    # log records would be written over the screen: the screen says what matters (its error lines)
    logging.getLogger().addHandler(logging.NullHandler())
    feed = Feed(url, gateway, cluster)
    curses.wrapper(lambda scr: asyncio.run(_shell(scr, feed, a.interval)))
    return 0


def _positive(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return seconds


def add_parser(sub) -> None:
    top = sub.add_parser("top", help="a live full-screen view of workers and models (q quits)")
    top.add_argument("--interval", type=_positive, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--gateway-url", help="the gateway whose /metrics give queued requests (default: the "
                                           "running local cluster's, or WARMSERVE_GATEWAY_URL)")
    top.add_argument("--no-gateway", action="store_true", help="read NATS only (queued requests shown as -)")
    top.set_defaults(func=cmd_top)
