"""Guards of the training side without Ray: the finite-loss check of the epoch loop, the fallback to an earlier
checkpoint when the latest is damaged, the progress thread's retries of a failing tracker, the teacher-failure line."""
from __future__ import annotations

import os

import pytest
import torch

from simreg.models.errors import SimRegError
from simreg.orchestrator.config import load_config
from simreg.orchestrator.train.epoch import NonFiniteLoss, train_epoch


def _setup(lr: float, steps: int = 10):
    from simreg.orchestrator.train.builders import build_objective, build_optimizer

    cfg = load_config(None, ["heads.depth=1", f"optim.lr={lr}"])
    torch.manual_seed(0)
    obj = build_objective(cfg, {"t": 512})
    opt, sched = build_optimizer(cfg, obj, steps)
    return obj, opt, sched


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"view": torch.rand(32, 1, 32, 32, generator=g), "target_t": torch.randn(32, 512, generator=g)} for _ in range(n)]


def test_a_diverging_lr_stops_at_the_first_non_finite_loss_before_its_update():
    obj, opt, sched = _setup(lr=1e6)
    before: list[dict[str, torch.Tensor]] = []

    def keep(n: int, _: dict[str, float]) -> None:  # the weights after each step that ran
        before[:] = [{k: v.detach().clone() for k, v in obj.named_parameters()}]

    with pytest.raises(NonFiniteLoss) as e:
        train_epoch(obj, _batches(30), opt, sched, ["t"], torch.device("cpu"), keep)
    assert e.value.step > 1 and not torch.isfinite(torch.tensor(e.value.value))
    assert sched.last_epoch == e.value.step - 1  # steps before it ran, that one did not
    after = dict(obj.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in before[0].items())  # no update from the non-finite step
    assert all(bool(torch.isfinite(v).all()) for v in after.values())


def test_the_check_is_the_callers_so_ranks_stop_together():
    obj, opt, sched = _setup(lr=0.1)
    calls: list[float] = []

    def any_rank_bad(loss: torch.Tensor) -> bool:  # as if another rank's loss were NaN at the third step
        calls.append(float(loss))
        return len(calls) < 3

    with pytest.raises(NonFiniteLoss, match="at step 3"):
        train_epoch(obj, _batches(5), opt, sched, ["t"], torch.device("cpu"), finite=any_rank_bad)
    assert len(calls) == 3 and sched.last_epoch == 2


def _two_checkpoints(root):
    from simreg.orchestrator.train.checkpoint import save_checkpoint

    obj, opt, sched = _setup(lr=0.1)
    for epoch in (0, 1):
        save_checkpoint(root / f"epoch_{epoch:04d}", obj, opt, sched, epoch, {"epoch": float(epoch)})
    return root / "epoch_0001"


@pytest.mark.parametrize("damage", ["truncate", "not_simreg"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
    import ray.train

    from simreg.orchestrator.train.checkpoint import STATE, load_kept

    latest = _two_checkpoints(tmp_path)
    f = latest / STATE
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: os.path.getsize(f) // 2])
    else:
        torch.save({"epoch": 1, "weights": torch.zeros(2)}, f)
    state, used, skipped = load_kept(ray.train.Checkpoint(str(latest)))
    assert used == "epoch_0000" and int(state["epoch"]) == 0
    assert len(skipped) == 1 and skipped[0].startswith(f"epoch_0001: checkpoint file {f}")
    assert ("cannot be read" if damage == "truncate" else "lacks backbone, heads") in skipped[0]


def test_no_readable_checkpoint_is_one_error_naming_each(tmp_path):
    import ray.train

    from simreg.orchestrator.train.checkpoint import STATE, load_kept

    latest = _two_checkpoints(tmp_path)
    for d in ("epoch_0000", "epoch_0001"):
        (tmp_path / d / STATE).write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(SimRegError, match=r"no checkpoint of the run in .* can be resumed from \(epoch_0001: .*; epoch_0000: .*\)"):
        load_kept(ray.train.Checkpoint(str(latest)))


class _Outage:
    """A tracker whose store refuses the first ``down`` calls (a tracking server that is down, then back)."""

    def __init__(self, down: int) -> None:
        self.down, self.logged = down, []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.down > 0:
            self.down -= 1
            raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): http://user:hunter2@127.0.0.1:5000 refused")
        self.logged.append(step)


def test_progress_keeps_epochs_pending_while_the_tracker_fails_then_sends_them_in_order():
    from simreg.orchestrator.train.progress import Progress

    tracker = _Outage(down=2)
    p = Progress(None, tracker, 100, 3, lambda: {0, 1, 2})
    epochs = [{"epoch": float(e), "train/loss": 1.0} for e in range(3)]
    lines = []
    for polled in (epochs[:1], epochs[:2], epochs[:2]):  # three polls; the server answers at the third
        p._retry_at = 0.0  # as if the backoff had passed
        lines += p._log(polled)
    assert tracker.logged == [0, 1] and p._logged == {0, 1}
    assert len([ln for ln in lines if ln.startswith("warning: MLflow did not take epoch 1")]) == 1  # once per outage
    assert "hunter2" not in " ".join(lines)
    assert lines[-1] == "MLflow answers again: epoch 1's metrics sent"
    assert p._retry_s == 2.0  # the backoff starts over
    p._log(epochs[2:])
    assert tracker.logged == [0, 1, 2]


def test_progress_backs_off_while_the_tracker_fails():
    from simreg.orchestrator.train.progress import RETRY_MAX_S, Progress

    tracker = _Outage(down=100)
    p = Progress(None, tracker, 100, 3, lambda: {0})
    assert len(p._log([{"epoch": 0.0}])) == 1 and tracker.down == 99
    assert p._log([{"epoch": 0.0}]) == [] and tracker.down == 99  # within the backoff: no call
    waits = []
    for _ in range(6):
        p._retry_at = 0.0
        p._log([{"epoch": 0.0}])
        waits.append(p._retry_s)
    assert waits == [4.0, 8.0, 10.0, 10.0, 10.0, 10.0] and RETRY_MAX_S == 10.0 and tracker.down == 93


def test_teacher_failure_lines_name_the_teacher_and_the_knob():
    from ray.exceptions import ActorDiedError, GetTimeoutError

    from simreg.orchestrator.pipeline.dataset import teacher_failure

    died = teacher_failure("simclr_r10t", ActorDiedError(), 2, 600)
    assert died.startswith("teacher simclr_r10t cannot serve targets: its actor died and was restarted teacher_pool.max_restarts=2 times")
    assert "\n" not in died
    late = teacher_failure("dino", GetTimeoutError("timed out"), 3, 30)
    assert late.startswith("teacher dino sent no targets for a block within teacher_pool.call_timeout_s=30 s")


def _rank(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: rank 1's third batch has a NaN target, rank 0's batches are all finite."""
    import json

    import torch.distributed as dist

    from simreg.orchestrator.train.worker import _AllFinite

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    obj, opt, sched = _setup(lr=0.1)
    batches = _batches(5)
    if rank == 1:
        batches[2]["target_t"][0, 0] = float("nan")
    finite = _AllFinite(torch.device("cpu"))
    try:
        train_epoch(obj, batches, opt, sched, ["t"], torch.device("cpu"), finite=finite)
        result = {"step": None}
    except NonFiniteLoss as e:
        result = {"step": e.step, "local": e.value, "worst": finite.worst}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_a_nan_on_one_rank_stops_both_ranks_at_that_step(tmp_path):
    """Two real gloo processes (no Ray): the SUM all-reduce of the check makes the rank whose own loss is finite stop
    at the same step, and both know the loss was NaN."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1)]
    assert [g["step"] for g in got] == [3, 3] and [g["worst"] for g in got] == ["nan", "nan"]
    assert got[0]["local"] == got[0]["local"]  # rank 0's own loss was finite: it stopped because rank 1's was not
    assert got[1]["local"] != got[1]["local"]  # NaN


def test_only_a_damaged_file_is_recorded_as_the_runs_end():
    from simreg.models.errors import DataError
    from simreg.orchestrator.pipeline.dataset import _caused_by_io

    def wrapped(cause: BaseException) -> DataError:
        try:
            try:
                raise cause
            except Exception as c:
                raise DataError("pack shard part-00002.parquet cannot be read") from c
        except DataError as e:
            return e

    assert _caused_by_io(wrapped(OSError("AWS Error NETWORK_CONNECTION during GetObject")))
    assert _caused_by_io(wrapped(TimeoutError("timed out")))
    assert not _caused_by_io(wrapped(ValueError("Couldn't deserialize thrift")))
    assert not _caused_by_io(DataError("it does not end in a plain Parquet footer"))
