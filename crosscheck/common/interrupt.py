"""Ctrl-C and SIGTERM that always stop a run: one handler, a flag checked at safe points, one line at the end.

Python raises ``KeyboardInterrupt`` wherever the interpreter happens to be
when SIGINT arrives.  Inside a garbage-collection callback (JAX registers
one) or a ``__del__``, Python prints "Exception ignored" and goes on: the
interrupt is lost, and the run finishes and replaces the previous report.
Inside the initialisation of torch's or JAX's extension modules it becomes an
``ImportError``, or a segmentation fault (both seen).  So:

* from the first line of ``python -m crosscheck`` until the CLI's main
  function runs (:func:`install` with ``at_once``; and again once it has
  returned, :func:`finish`), a signal prints its one line and ends the
  process at once with status 130: nothing has been written yet (or all is),
  and an exception inside torch's or JAX's imports could crash them;
* under :func:`handling` (the run itself) SIGINT and SIGTERM raise
  :class:`Interrupted`, a ``KeyboardInterrupt``, so that ``finally`` blocks
  remove temporary files; one that Python drops reaches ``sys.unraisablehook``,
  which prints nothing and delivers the signal again a moment later.
  :func:`check`, called once per step by the long loops and before a report is
  renamed into place, raises for a signal recorded earlier.  Once one has been
  raised, further signals are recorded only, so that the clean-up runs to its
  end; inside :func:`held` (the renames) they wait for the block's end.

:func:`say` writes the one line; the CLI exits with status 130.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVERY_S = 0.01  # after Python dropped an Interrupted: time to leave the gc callback or __del__

_installed: dict[int, object] | None = None  # signal -> the handler before ours, while ours is installed
_generation = 0  # one per install(): a late re-delivery from an earlier run does nothing
_previous_hook = None
_at_once = False  # a signal ends the process now (before and after the run)
_pending: int | None = None  # the first signal recorded
_raised = False  # an Interrupted is on its way up: later signals are recorded only
_holding = 0  # inside held(): signals are recorded, and raised at its end
_in_hook = False
_said = False
_written: list[str] = []  # reports renamed into place by this run (complete: a later signal cannot undo them)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM; a ``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` handles both."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, frame) -> None:
    global _pending, _raised
    if _pending is None:
        _pending = signum
    if _at_once:
        _exit_now(signum)
    if _in_hook:  # raising here would be dropped too (and printed): try again a moment later
        _redeliver(signum)
        return
    if not _raised and not _holding:
        _raised = True
        raise Interrupted(signum)


def _exit_now(signum: int) -> None:
    """The one line, written straight to the descriptor (no print: it may be inside another write), then exit 130."""
    global _said
    if not _said:
        _said = True
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.write(2, (message(Interrupted(signum)) + "\n").encode())
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(130)


def _redeliver(signum: int) -> None:
    import threading

    generation = _generation

    def later():
        import time

        time.sleep(REDELIVERY_S)
        if generation == _generation and _installed is not None and not _raised:  # not handled meanwhile
            _thread.interrupt_main(signum)

    threading.Thread(target=later, name="crosscheck-redeliver", daemon=True).start()


def _unraisable(unraisable) -> None:
    global _raised, _in_hook
    if isinstance(unraisable.exc_value, Interrupted):
        # Python dropped it (a gc callback, a __del__): say nothing, and raise it again outside.
        _in_hook = True
        try:
            _raised = False
            _redeliver(unraisable.exc_value.signum)
        finally:
            _in_hook = False
        return
    (_previous_hook or sys.__unraisablehook__)(unraisable)


def install(at_once: bool = False) -> bool:
    """Install the handler for SIGINT and SIGTERM, forgetting earlier signals; False off the main thread.

    ``at_once``: a signal ends the process (130, its line) instead of raising,
    until :func:`handling`.  A second call keeps the handler and what it recorded.
    """
    global _installed, _previous_hook, _pending, _raised, _said, _at_once, _generation
    if _installed is not None:
        return True
    previous = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, _handler)
    except ValueError:  # not the main thread: signals are the main thread's business
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        return False
    _installed, _at_once = previous, at_once
    _generation += 1
    _pending, _raised, _said = None, False, False
    _written.clear()
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    return True


def uninstall() -> None:
    """Put back the handlers and the unraisable hook that :func:`install` replaced."""
    global _installed, _previous_hook, _pending, _raised
    if _installed is None:
        return
    for signum, handler in _installed.items():
        signal.signal(signum, handler)
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = _previous_hook
    _installed, _previous_hook, _pending, _raised = None, None, None, False


def check() -> None:
    """Raise :class:`Interrupted` if SIGINT or SIGTERM arrived under :func:`handling` (even if it was dropped)."""
    global _raised
    if _installed is not None and _pending is not None:
        _raised = True
        raise Interrupted(_pending)


def acknowledge() -> None:
    """The interrupt is handled (``gpu`` writes the report so far): :func:`check` passes until the next signal."""
    global _pending
    _pending = None


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside (main thread only; elsewhere a no-op).

    Inside ``python -m crosscheck`` the handler is installed already: it
    raises inside, instead of ending the process.
    """
    global _at_once
    if _installed is None:
        if not install():
            yield
            return
        try:
            yield
        finally:
            uninstall()
        return
    previous, _at_once = _at_once, False
    try:
        yield
    finally:
        _at_once = previous


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the end of the block: for renames and clean-ups that must finish.

    The handler only records a signal inside (another thread may receive it
    and pass it on to the main thread's handler, which a blocked mask alone
    would not stop); the block's end raises it.  The mask keeps a signal with
    its default action (no handler installed) from ending the process inside.
    """
    global _holding
    blocked = hasattr(signal, "pthread_sigmask")
    if blocked:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if not _holding and _installed is not None and not _raised:
            check()


def wrote(paths) -> None:
    """Note report files renamed into place, for the line an interrupt after them prints."""
    _written.extend(str(p) for p in paths)


def message(err: BaseException | None = None) -> str:
    """``interrupted (no report written)``, naming SIGTERM, and a report written before the signal."""
    signum = getattr(err, "signum", None) or _pending or signal.SIGINT
    what = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
    if not _written:
        return f"{what} (no report written)"
    folders = list(dict.fromkeys(os.path.dirname(p) or "." for p in _written))
    return f"{what} (after the report in {', '.join(folders)} was written)"


def say(err: BaseException | None = None) -> None:
    """Print :func:`message` on stderr, once per run."""
    global _said
    if not _said:
        _said = True
        print(message(err), file=sys.stderr, flush=True)


def finish(code) -> None:
    """End ``python -m crosscheck`` with ``code`` (``sys.exit``'s meaning) now, without the interpreter's teardown.

    The teardown of torch and JAX takes a while and puts the default handlers
    back: a Ctrl-C during it killed the process without its line (status -2).
    Everything the CLI wrote is closed by then; a signal before the end exits 130.
    """
    global _at_once
    _at_once = True
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
