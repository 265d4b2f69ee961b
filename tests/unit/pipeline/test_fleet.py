"""The teacher fleet's actor class in one process (no Ray): requests of concurrent runs batched together, rows
two runs need at once computed once, each run's targets those of its own views, accounting per request."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from simreg.orchestrator.cache.memory import SHARDS
from simreg.orchestrator.cache.targets import spec_dict
from simreg.orchestrator.data.views import ViewPlan, ViewSpec, add_views, preset_spec
from simreg.orchestrator.pipeline.actors import PooledTeacher
from simreg.orchestrator.pipeline.requester import Requester
from simreg.orchestrator.pipeline.teacher import TeacherInference, TeacherSpec

FM = ((0.2860,) * 3, (0.3530,) * 3)


@pytest.fixture(scope="module")
def spec(teachers_dir: Path) -> TeacherSpec:
    return TeacherSpec("r10t", "resnet10t", str(teachers_dir / "fmnist_simclr_resnet10t.safetensors"), 64, *FM)


def _request(images, view: ViewSpec, rows: slice, epoch: int = 0) -> dict[str, np.ndarray]:
    b = {"sample_id": images.sample_ids[rows], "label": images.labels[rows], "image": images.images[rows]}
    out = add_views(b, epoch=epoch, seed=0, plan=ViewPlan(view))
    return {k: out[k] for k in ("sample_id", "view", "view_index")}


def _requester(images, view: ViewSpec, cache_root: Path | None = None) -> Requester:
    return Requester(str(cache_root) if cache_root else None, images.source_fingerprint, {"seed": 0, "teacher_view": spec_dict(view)})


def _serve(teacher: PooledTeacher, *calls: tuple[dict, Requester]) -> list[tuple[np.ndarray, dict, str | None]]:
    async def go() -> list:
        return list(await asyncio.gather(*(teacher.infer(b, r) for b, r in calls)))

    return asyncio.run(go())


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Targets of one view computed in batches of other sizes: equal up to float16 rounding of the kernels' sums."""
    return bool(np.allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2, rtol=2e-2))


def test_two_runs_asking_for_the_same_rows_at_once_get_one_forward(spec, fmnist_small):
    view = ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=20)
    req = _requester(fmnist_small, view)
    batch = _request(fmnist_small, view, slice(0, 32))
    (a, ca, _), (b, cb, _) = _serve(teacher, (batch, req), (dict(batch), req))
    assert teacher.forward_rows == 32 and teacher.batches == 1  # 64 rows asked for, 32 through the teacher
    assert sorted([ca["forward"], cb["forward"]]) == [0, 32] and ca["shared"] + cb["shared"] == 32
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
    direct = TeacherInference(spec, threads=1, device="cpu").targets(batch["view"])
    assert np.array_equal(a.view(np.uint16), direct.view(np.uint16))  # the batch held these 32 rows only


def test_partly_overlapping_requests_share_only_the_common_rows(spec, fmnist_small):
    view = ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=128, batch_wait_ms=20)
    req = _requester(fmnist_small, view)
    (a, ca, _), (b, cb, _) = _serve(teacher, (_request(fmnist_small, view, slice(0, 32)), req),
                                    (_request(fmnist_small, view, slice(16, 48)), req))
    assert teacher.forward_rows == 48 and teacher.shared_rows == 16 and teacher.batches == 1
    assert (ca, cb) == ({"forward": 32, "cached": 0, "shared": 0}, {"forward": 16, "cached": 0, "shared": 16})
    assert np.array_equal(a[16:].view(np.uint16), b[:16].view(np.uint16))  # the shared rows: the same forward's


def test_runs_with_other_views_get_their_own_targets(spec, fmnist_small):
    """An augmentation-strength sweep: the same samples and view index, other views: nothing shared, each run's
    targets those of its own views, though one forward computed both."""
    weak, strong = preset_spec("strong", 64, (0.2, 1.0), 0.5, 0.3), preset_spec("strong", 64, (0.2, 1.0), 0.5, 1.0)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=20)
    bw, bs = _request(fmnist_small, weak, slice(0, 32)), _request(fmnist_small, strong, slice(0, 32))
    assert not np.array_equal(bw["view"], bs["view"])
    (tw, cw, _), (ts, cs, _) = _serve(teacher, (bw, _requester(fmnist_small, weak)), (bs, _requester(fmnist_small, strong)))
    assert teacher.batches == 1 and teacher.forward_rows == 64 and teacher.shared_rows == 0
    assert cw["forward"] == cs["forward"] == 32
    direct = TeacherInference(spec, threads=1, device="cpu")
    assert _close(tw, direct.targets(bw["view"])) and _close(ts, direct.targets(bs["view"]))
    assert not _close(tw, ts)


def test_small_requests_wait_for_each_other_up_to_the_batch_size(spec, fmnist_small):
    view = ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=32, batch_wait_ms=200)
    req = _requester(fmnist_small, view)
    calls = [(_request(fmnist_small, view, slice(i, i + 8)), req) for i in range(0, 64, 8)]  # 8 requests of 8 rows
    results = _serve(teacher, *calls)
    assert teacher.batches == 2 and teacher.forward_rows == 64  # two batches of 32, not eight of 8
    direct = TeacherInference(spec, threads=1, device="cpu")
    for (b, _), (t, c, _) in zip(calls, results, strict=True):
        assert c == {"forward": 8, "cached": 0, "shared": 0}
        assert _close(t, direct.targets(b["view"]))
    # without waiting, each request goes alone
    alone = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=32, batch_wait_ms=0)
    _serve(alone, *calls[:1])
    assert alone.batches == 1


def test_each_run_uses_its_own_cache_and_a_later_run_reads_it(spec, fmnist_small, tmp_path: Path):
    view = ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=0)
    req = _requester(fmnist_small, view, tmp_path)
    batch = _request(fmnist_small, view, slice(0, 32))
    (first, c1, err), = _serve(teacher, (batch, req))
    assert c1 == {"forward": 32, "cached": 0, "shared": 0} and err is None
    later = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=0)  # a new fleet, the same cache
    (again, c2, _), = _serve(later, (dict(batch), req))
    assert c2 == {"forward": 0, "cached": 32, "shared": 0} and later.batches == 0
    assert np.array_equal(first.view(np.uint16), again.view(np.uint16))
    other = Requester(str(tmp_path), fmnist_small.source_fingerprint, {"seed": 1, "teacher_view": spec_dict(view)})  # another seed
    (_, c3, _), = _serve(later, (dict(batch), other))
    assert c3["forward"] == 32


def test_a_run_without_a_data_fingerprint_never_shares(spec, fmnist_small):
    view = ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=20)
    batch = _request(fmnist_small, view, slice(0, 32))
    anonymous = Requester(None, None, {"seed": 0})
    _serve(teacher, (batch, anonymous), (dict(batch), anonymous))
    assert teacher.forward_rows == 64 and teacher.shared_rows == 0


def test_a_long_sweep_keeps_a_bounded_number_of_caches_open(spec, fmnist_small, tmp_path: Path, monkeypatch):
    import simreg.orchestrator.pipeline.actors as actors

    monkeypatch.setattr(actors, "OPEN_CACHES", 2)
    view = ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=0)
    batch = _request(fmnist_small, view, slice(0, 8))
    for seed in range(4):  # four trials with other seeds: four cache keys
        req = Requester(str(tmp_path), fmnist_small.source_fingerprint, {"seed": seed, "teacher_view": spec_dict(view)})
        _serve(teacher, (dict(batch), req))
    assert len(teacher._caches) == 2
    teacher.flush_cache()  # the evicted caches closed: their shards left this process's memory
    open_dirs = {c.dir.path for c in teacher._caches.values()}
    assert {k[0] for k in SHARDS._held if k[0].startswith(str(tmp_path))} == open_dirs and len(open_dirs) == 2
    first = Requester(str(tmp_path), fmnist_small.source_fingerprint, {"seed": 0, "teacher_view": spec_dict(view)})
    (_, counts, _), = _serve(teacher, (dict(batch), first))  # closed, reopened: read back from its shards
    assert counts == {"forward": 0, "cached": 8, "shared": 0}


def test_a_cancelled_request_does_not_fail_the_one_sharing_its_rows(spec, fmnist_small):
    """Ray cancels a request whose caller went away (a trial stopped, an execution shut down): a trial waiting on
    the same rows still gets them."""
    view = ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=100)
    req = _requester(fmnist_small, view)
    batch = _request(fmnist_small, view, slice(0, 32))

    async def go() -> tuple:
        owner = asyncio.create_task(teacher.infer(batch, req))
        await asyncio.sleep(0.01)  # queued, waiting for more rows
        sharer = asyncio.create_task(teacher.infer(dict(batch), req))
        await asyncio.sleep(0.01)
        owner.cancel()
        got = await sharer
        return got, owner.cancelled()

    (targets, counts, _), cancelled = asyncio.run(go())
    assert cancelled and counts == {"forward": 0, "cached": 0, "shared": 32}
    direct = TeacherInference(spec, threads=1, device="cpu").targets(batch["view"])
    assert np.array_equal(targets.view(np.uint16), direct.view(np.uint16))


def test_views_of_other_sizes_go_through_in_separate_batches(spec, fmnist_small):
    """Trials that render other view sizes share a fleet actor (the teacher resizes to its input): their rows are
    never stacked into one array."""
    small, large = ViewSpec(32), ViewSpec(64)
    teacher = PooledTeacher(spec, 1, None, {"device": "cpu"}, batch_size=64, batch_wait_ms=50)
    bs, bl = _request(fmnist_small, small, slice(0, 8)), _request(fmnist_small, large, slice(0, 8))
    (ts, _, _), (tl, _, _) = _serve(teacher, (bs, _requester(fmnist_small, small)), (bl, _requester(fmnist_small, large)))
    assert teacher.batches == 2
    direct = TeacherInference(spec, threads=1, device="cpu")
    assert _close(ts, direct.targets(bs["view"])) and _close(tl, direct.targets(bl["view"]))
