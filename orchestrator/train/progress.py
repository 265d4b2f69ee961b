"""The driver's view of a running fit: a progress bar per epoch on a terminal, a log line per epoch, and
MLflow logging of committed epochs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from simreg.models.errors import first_line
from simreg.orchestrator import console
from simreg.orchestrator.tracking.base import RunTracker
from simreg.orchestrator.tracking.redact import redact_text

log = logging.getLogger("simreg")
RETRY_MIN_S, RETRY_MAX_S = 2.0, 10.0  # waits between tries while the tracker fails


class Progress:
    """Driver-side thread: a progress bar per epoch when stderr is a terminal (redrawn in place, closed before
    the epoch's line is printed; none in a log file), a log line per epoch as it lands, and MLflow logging of
    each epoch's metrics once Ray Train has committed that epoch's checkpoint (``committed``): an epoch a
    failure makes the run redo is then logged once, by the attempt whose checkpoint the run continues from."""

    def __init__(self, state: Any, tracker: RunTracker, images_per_epoch: int, epochs: int, committed: Any) -> None:
        self.state, self.tracker, self.total, self.epochs = state, tracker, images_per_epoch, epochs
        self.committed = committed  # () -> set of epochs whose checkpoints Ray Train has registered
        self.history: list[dict[str, float]] = []  # the latest report of each epoch, in order of arrival
        self.placements: list[str] = []
        self._seen = 0  # RunState reports consumed
        self._logged: set[int] = set()  # epochs written to MLflow
        self._tracker_error: str | None = None  # the tracker's last error while it keeps failing
        self._retry_at = 0.0  # monotonic time of the next try while the tracker fails (backoff up to RETRY_MAX_S)
        self._retry_s = RETRY_MIN_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        # the tracker's HTTP retries are its own business: this thread says once that the server is away
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():  # still in a tracker call (a server's own retries): the run's end logs what is missing
            return
        try:
            lines = self._drain()[2]  # the reports since the thread's last poll, in this thread alone
        except Exception:  # noqa: BLE001  (the state actor is gone with a failed fit: that error is the one to raise)
            if exc[0] is None:
                raise
            return
        for line in lines:
            log.info(line)

    def _drain(self) -> tuple[int, int, list[str]]:
        """(epoch, images done in it, lines to print) after taking in what the run reported since the last call."""
        import ray

        epoch, done, new, placed = ray.get(self.state.poll.remote(self._seen, len(self.placements)))
        self._seen += len(new)
        lines = []
        for p in placed:
            self.placements.append(p)
            lines.append(p)
        for m in new:
            self.history = [h for h in self.history if h["epoch"] != m["epoch"]] + [m]  # a redone epoch: its new report
            val = f", val 20-NN {m['val/top1_20nn']:.2f}" if "val/top1_20nn" in m else ""
            lines.append(
                f"epoch {int(m['epoch']) + 1}/{self.epochs}: loss {m['train/loss']:.4f}, {m['train/images_per_s']:.0f} images/s, "
                f"{m['train/epoch_s']:.1f} s ({m.get('train/data_wait_s', 0.0):.1f} s waiting for data, "
                f"{m.get('train/first_batch_wait_s', 0.0):.1f} of it for the first batch){val}"
            )
        pending = [m for m in self.history if int(m["epoch"]) not in self._logged]
        if pending:
            ready = self.committed()
            lines.extend(self._log(m for m in pending if int(m["epoch"]) in ready))
        return epoch, done, lines

    def _log(self, metrics: Iterable[dict[str, float]]) -> list[str]:
        """Each epoch's metrics to the tracker; while it fails (a tracking server down), one warning, and the epochs
        stay pending: the next poll retries them, in order, and the run's end logs whatever is still missing."""
        lines: list[str] = []
        if time.monotonic() < self._retry_at:
            return lines
        for m in metrics:
            try:
                self.tracker.log_metrics(m, step=int(m["epoch"]))
            except Exception as e:  # noqa: BLE001  (the tracking store's errors: connection refused, 5xx, a locked sqlite)
                if self._tracker_error is None:
                    lines.append(f"warning: MLflow did not take epoch {int(m['epoch']) + 1}'s metrics ({redact_text(first_line(e, 200))}); "
                                 "training goes on and they are sent when it answers again")
                else:
                    self._retry_s = min(2 * self._retry_s, RETRY_MAX_S)
                self._tracker_error = str(e)
                self._retry_at = time.monotonic() + self._retry_s
                return lines
            self._logged.add(int(m["epoch"]))
            if self._tracker_error is not None:
                lines.append(f"MLflow answers again: epoch {int(m['epoch']) + 1}'s metrics sent")
                self._tracker_error, self._retry_at, self._retry_s = None, 0.0, RETRY_MIN_S
        return lines

    def _run(self) -> None:
        from tqdm import tqdm

        bars = console.interactive()
        bar, bar_epoch = None, -1
        while not self._stop.wait(0.5):
            try:
                epoch, done, lines = self._drain()
            except Exception:  # noqa: BLE001  (the state actor is gone: the run is ending; tracker errors are handled in _log)
                break
            finished = {int(m["epoch"]) for m in self.history}
            if bar is not None and (bar_epoch in finished or lines):
                if bar_epoch in finished:
                    bar.n = bar.total
                    bar.refresh()
                bar.close()  # a line printed under a live bar would break it: close first
                bar = None
            for line in lines:
                log.info(line)
            if bars and bar is None and epoch >= 0 and epoch not in finished:
                bar = tqdm(total=self.total, desc=f"epoch {epoch + 1}/{self.epochs}", unit="img", leave=False, dynamic_ncols=True)
                bar_epoch = epoch
            if bar is not None:
                bar.n = min(done, self.total)
                bar.refresh()
        if bar is not None:
            bar.close()
