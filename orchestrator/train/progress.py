"""The driver's view of a running fit: a progress bar per epoch on a terminal, a log line per epoch, and
MLflow logging of committed epochs.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from simreg.orchestrator import console
from simreg.orchestrator.tracking.base import RunTracker

log = logging.getLogger("simreg")


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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for line in self._drain()[2]:
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
            for m in pending:
                if int(m["epoch"]) in ready:
                    self.tracker.log_metrics(m, step=int(m["epoch"]))
                    self._logged.add(int(m["epoch"]))
        return epoch, done, lines

    def _run(self) -> None:
        from tqdm import tqdm

        bars = console.interactive()
        bar, bar_epoch = None, -1
        while not self._stop.wait(0.5):
            try:
                epoch, done, lines = self._drain()
            except Exception:  # the state actor is gone: the run is ending
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
