"""Stop signals that come before the event loop can take them are held, not fatal.

Python dies of SIGTERM until something handles it, and the daemon's loop installs
its handlers only after the imports and the settings: a `systemctl stop` in that
first fraction of a second would end the process with -15 and no `daemon.stopped`
line. `hold_stop_signals` runs first thing in `iotflow`; the daemon then takes over
the held signal, and every other command gets the default behaviour back.

SIGHUP asks the daemon to reload; by default it would kill the process just the
same (exit 129), so it is held too: the daemon reloads once it can, and any other
command dies of it on release, as a command whose terminal hung up should.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_held: list[signal.Signals] = []


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signal.Signals(signum))


def _hold_reload(signum: int, frame: FrameType | None) -> None:
    _held_reloads.append(signal.Signals(signum))


_held_reloads: list[signal.Signals] = []


def _in_main_thread() -> bool:
    # Only the main thread may set handlers (the tests run commands in worker threads).
    return threading.current_thread() is threading.main_thread()


def hold_stop_signals() -> None:
    """Remember SIGTERM and SIGINT instead of dying of them."""
    if not _in_main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _hold)
    signal.signal(signal.SIGHUP, _hold_reload)


def held_stop_signal() -> signal.Signals | None:
    """The first stop signal held so far, if any."""
    return _held[0] if _held else None


def held_reload() -> bool:
    """Whether a SIGHUP came before the daemon took it over (then forgotten)."""
    held = bool(_held_reloads)
    _held_reloads.clear()
    return held


def release_stop_signals() -> None:
    """Back to Python's defaults; a signal held meanwhile takes effect now."""
    if not _in_main_thread():
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if _held:
        signal.raise_signal(_held.pop(0))
    if _held_reloads:
        signal.raise_signal(_held_reloads.pop(0))
