"""A driver's stop, decided once, and the check every write of the driver makes against it.

A driver (``simreg distill`` / ``sweep``) stops before its end for three reasons: Ctrl-C (SIGINT), SIGTERM,
and a lost folder lease (another driver took its run folder over, or the lease could not be renewed in
time). Whatever the reason:

- the stop is *decided* once (``decide``), first reason wins, and the main thread unwinds with ``Stopped``
  (a ``KeyboardInterrupt``: the ``except (KeyboardInterrupt, SystemExit)`` paths end the runs KILLED);
- every write the driver makes to its run folder afterwards raises ``Stopped`` instead (``check``, called by
  ``storage.Store`` for each write): no summary, comparison, child-run record or config after the decision;
- tracking writes are dropped (``tracking_allowed``); the runs are ended KILLED on a signal, and left to the
  driver that took the folder over on a lost lease (the run is its run now);
- the command exits 130 (a signal) or 1 (a lost lease), never 0.

A held lease is checked on its own clock too (``Lease.valid``): a driver frozen past its lease (SIGSTOP, a
suspended host) is stopped by its first write after it wakes, before its renewal thread has even run.

Ray Tune and Ray Train install their own SIGINT handlers (Tune's ends the sweep "gracefully" and lets it go
on to its results; Train V2's calls ``sys.exit(0)``): ``quiet_ray_handlers`` keeps ours in place.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Protocol

log = logging.getLogger("simreg")

EXIT_SIGNAL = 130  # as a shell reports a process ended by Ctrl-C
EXIT_LOST = 1


class Stopped(KeyboardInterrupt):
    """The driver stopped before its end: ``reason`` says why, ``exit_code`` is the command's status, ``owned``
    says whether the run is still this driver's to end (False after a lost lease)."""

    def __init__(self, reason: str, exit_code: int = EXIT_SIGNAL, owned: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.exit_code, self.owned = reason, exit_code, owned


class Lease(Protocol):
    def valid(self) -> bool: ...

    def describe_loss(self) -> str: ...


_lock = threading.RLock()  # re-entrant: a signal handler may run while the main thread holds it
_decided: Stopped | None = None
_leases: list[Lease] = []
_raised = 0  # how many times the main thread was sent a Stopped (or a signal asked for one)
_handlers = False  # the command line installed simreg's signal handlers (Ray's init replaces them: reinstalled)
_hard: threading.Timer | None = None


def decide(reason: str, exit_code: int = EXIT_SIGNAL, owned: bool = True) -> Stopped:
    """Record that this driver stops (the first decision stands) and return the decision."""
    return _decide(reason, exit_code, owned)[0]


def _decide(reason: str, exit_code: int, owned: bool) -> tuple[Stopped, bool]:
    global _decided
    with _lock:
        if _decided is not None:
            return _decided, False
        _decided = Stopped(reason, exit_code, owned)
    if not owned:  # a signal is reported by the command itself ("interrupted")
        log.error("%s", reason)
    return _decided, True


def decided() -> Stopped | None:
    """The stop decided so far, checking the leases held on their own clock first: a lease that ran out decides
    the stop here (and, from another thread, interrupts the main thread)."""
    if _decided is None:
        for lease in list(_leases):
            if not lease.valid():
                if threading.current_thread() is threading.main_thread():
                    decide(lease.describe_loss(), EXIT_LOST, owned=False)
                else:
                    interrupt_main(lease.describe_loss())
                break
    return _decided


def check(what: str = "") -> None:
    """Raise ``Stopped`` when this driver's stop was decided (or a lease it holds ran out): called before every
    write of the driver, so nothing is written after the decision."""
    global _raised
    stop = decided()
    if stop is not None:
        if what:
            log.debug("not writing %s: %s", what, stop.reason)
        if threading.current_thread() is threading.main_thread():
            _raised += 1
        raise Stopped(stop.reason, stop.exit_code, stop.owned)


def tracking_allowed(ending: bool = False) -> bool:
    """Whether a tracking write may go out: none after a stop, except ending this driver's own runs KILLED
    (``ending``) after a signal. After a lost lease the runs belong to the driver that took the folder over."""
    stop = decided()
    return stop is None or (ending and stop.owned)


def hold(lease: Lease) -> None:
    with _lock:
        _leases.append(lease)


def let_go(lease: Lease) -> None:
    with _lock:
        if lease in _leases:
            _leases.remove(lease)


def reset() -> None:
    """Forget a decision, held leases and a pending hard exit (a new driver in this process: the Python API,
    tests)."""
    global _decided, _raised, _hard
    with _lock:
        _decided, _raised = None, 0
        _leases.clear()
        if _hard is not None:
            _hard.cancel()
            _hard = None


def interrupt_main(reason: str, exit_code: int = EXIT_LOST, owned: bool = False, hard_after_s: float = 0.0) -> None:
    """From another thread: decide the stop and interrupt the main thread (its SIGINT handler raises
    ``Stopped``). Under the command line, a main thread that has not ended the process ``hard_after_s`` later
    (stuck in a call that does not return) is ended with ``os._exit``: a stop that stops; the reaper ends its
    runs KILLED. Never in a notebook or another program calling the Python API: that is its process."""
    import _thread

    global _hard
    if not _decide(reason, exit_code, owned)[1]:  # decided already: the main thread is unwinding
        return
    _thread.interrupt_main()
    if hard_after_s > 0 and _handlers:
        def _exit() -> None:
            log.error("the driver did not stop within %.0f s of: %s; ending it now", hard_after_s, reason)
            logging.shutdown()
            os._exit(exit_code)

        with _lock:
            _hard = threading.Timer(hard_after_s, _exit)
            _hard.daemon = True
            _hard.start()


def _handler(signum: int, frame: Any) -> None:
    """The first signal (or the lease thread's interrupt) raises ``Stopped`` in the main thread. A second one
    lets the clean-up under way finish (the runs ended KILLED, the lease released): it only says so; a third
    ends the process at once."""
    global _raised
    name = signal.Signals(signum).name
    stop = decide(f"interrupted ({name})", EXIT_SIGNAL, owned=True)
    _raised += 1
    if _raised == 1:
        raise Stopped(stop.reason, stop.exit_code, stop.owned)
    if _raised == 2:
        log.warning("stopping already (%s): its clean-up goes on; %s again ends it at once", stop.reason, name)
        return
    logging.shutdown()
    os._exit(stop.exit_code)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM stop the driver (``Stopped`` in the main thread). Only in the main thread, where
    Python delivers signals. ``ray.init`` installs its own SIGTERM handler (``sys.exit``): ``reinstall`` after it."""
    global _handlers
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    _handlers = True


def reinstall() -> None:
    """simreg's handlers back in place after Ray installed its own, where the command line had installed them."""
    if _handlers:
        install_signal_handlers()


def quiet_ray_handlers() -> None:
    """Keep Ray Tune's SIGINT handler out (it turns Ctrl-C into a sweep that ends ENDED and carries on);
    Ray Train's is kept out per trainer by ``ray_compat.keep_sigint_handler``."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

