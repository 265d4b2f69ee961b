"""A driver's stop (orchestrator/fence.py), in this process: a lost lease interrupts the main thread with exit
status 1 and leaves the run to the next driver; a second signal lets the clean-up finish; a new driver in the
same process (a notebook) starts with no stop decided and no pending hard exit."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from simreg.orchestrator import fence


@pytest.fixture
def handlers():
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    fence.reset()
    fence.install_signal_handlers()
    yield
    signal.signal(signal.SIGINT, old[0])
    signal.signal(signal.SIGTERM, old[1])
    fence._handlers = False
    fence.reset()


def test_a_lost_lease_stops_the_main_thread_and_a_new_driver_cancels_the_hard_exit(handlers):
    with pytest.raises(fence.Stopped) as e:
        t = threading.Thread(target=fence.interrupt_main, args=("lost the lease of s3://b/run",), kwargs={"hard_after_s": 0.5})
        t.start()
        t.join()
        time.sleep(5)
    assert e.value.exit_code == 1 and not e.value.owned and e.value.reason == "lost the lease of s3://b/run"
    assert not fence.tracking_allowed(ending=True)  # the run is the next driver's: not even ended KILLED
    with pytest.raises(fence.Stopped):
        fence.check("summary.json")
    fence.reset()  # a new driver in this process
    time.sleep(1.0)  # still alive: the hard exit (os._exit) was cancelled with the old driver's stop
    assert fence.decided() is None and fence.tracking_allowed()
    fence.check("summary.json")


def test_a_second_signal_lets_the_clean_up_finish(handlers, caplog):
    cleaned = False
    with pytest.raises(fence.Stopped) as e:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        finally:  # the clean-up of a stopping driver: a second Ctrl-C does not cut it short
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            cleaned = True
    assert cleaned and e.value.exit_code == 130 and e.value.owned and fence.tracking_allowed(ending=True)
    assert "stopping already (interrupted (SIGINT)): its clean-up goes on; SIGTERM again ends it at once" in caplog.text


def test_no_hard_exit_outside_the_command_line():
    """The Python API in a notebook: a lost lease interrupts the main thread, but never ends the process."""
    fence.reset()
    try:
        with pytest.raises(KeyboardInterrupt):
            fence.interrupt_main("lost the lease of s3://b/run", hard_after_s=0.2)
            time.sleep(5)
        assert fence._hard is None and fence.decided() is not None
    finally:
        fence.reset()
