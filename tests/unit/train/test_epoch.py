"""The epoch loop (``train/epoch.py``) on a plain iterable of batches: no Ray, no DDP."""
from __future__ import annotations

import torch

from simreg.models import InputTransform, SimRegObjective, build_backbone
from simreg.orchestrator.train.epoch import train_epoch

DIMS = {"a": 8, "b": 4}


def _objective() -> SimRegObjective:
    torch.manual_seed(0)
    return SimRegObjective(build_backbone("resnet10t"), InputTransform(16, (0.5,) * 3, (0.25,) * 3), DIMS, depth=2, width_mult=1.0)


def _batches(sizes: list[int], key: str = "view") -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    targets = {t: torch.randn(64, d, generator=g) for t, d in DIMS.items()}  # fixed targets per sample
    views = torch.rand(64, 1, 16, 16, generator=g)
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append({key: views[sl], **{f"target_{t}": targets[t][sl] for t in DIMS}, "sample_id": torch.arange(start, start + n)})
        start += n
    return out


def test_counts_steps_images_skips_and_weighted_sums():
    model = _objective()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    calls: list[int] = []
    stats = train_epoch(model, _batches([8, 8, 5, 1]), opt, sched, list(DIMS), torch.device("cpu"), lambda n, _: calls.append(n))
    assert (stats.steps, stats.images, stats.skipped_images) == (3, 21, 1)  # the 1-row batch: BatchNorm cannot train on it
    assert calls == [8, 8, 5] and sched.last_epoch == 3
    assert set(stats.sums) == {"loss", "loss/a", "loss/b", "cos/a", "cos/b"}
    means = stats.means()
    assert 0.0 < means["loss"] < 4.0  # 2 - 2 cos lies in [0, 4]
    assert abs(means["loss"] - (means["loss/a"] + means["loss/b"]) / 2) < 1e-4  # equal teacher weights


def test_loss_falls_on_fixed_targets_and_the_student_view_is_used():
    model = _objective()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = [train_epoch(model, _batches([16] * 4, "student_view"), opt, None, list(DIMS), torch.device("cpu"),
                          view_key="student_view").means()["loss"] for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_step_changes_the_weights_only_through_the_loss():
    model = _objective()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_epoch(model, _batches([8]), opt, None, list(DIMS), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # lr 0: nothing moves
