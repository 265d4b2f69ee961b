"""The Ray Data pipeline: images (in memory, or streamed from storage such as a pack's Parquet shards) -> views -> targets from each
teacher's actors.

Ray Data re-executes the whole pipeline on every iteration of the split (one per epoch), strictly
one execution after another (the split coordinator shuts an execution down before it starts the next).
The view stage reads the epoch from a tiny ``RunState`` actor that rank 0 advances between epochs,
behind a barrier, so view parameters are a pure function of (seed, epoch, sample_id).

Teachers run in actors that live for the whole run (``TeacherServer``, ``num_gpus`` each on a GPU
cluster): a Ray Data actor pool would be torn down and rebuilt at every epoch's execution, and on a
small machine that restart (process, imports, weights, the first block through the teacher) cost ~7 s
of every epoch in which the students waited. The view stage is a Ray Data *task* (Ray reuses its
worker processes): it renders a block's views, puts them in the object store once and asks every
teacher's actors for targets concurrently. A teacher actor that dies is restarted by Ray and the call
retried (``teacher_pool.max_restarts``); one that cannot serve (restarts used up, or no answer within
``teacher_pool.call_timeout_s``) ends the run FAILED with one line naming it (``teacher_failure``).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import Dataset, TaskPoolStrategy
from ray.data.extensions import ArrowTensorArray

from simreg.models.errors import SimRegError
from simreg.orchestrator.data.imageset import ImageSet, StreamedImages
from simreg.orchestrator.data.views import ViewPlan, add_views

if TYPE_CHECKING:  # the view stage's processes import this module: no teacher code (timm) in them
    from simreg.orchestrator.pipeline.actors import PoolResources
    from simreg.orchestrator.pipeline.requester import Requester


READ_ATTEMPTS = 3  # reads of a block's pieces before the view task fails


def _caused_by_io(e: BaseException) -> bool:
    """Whether an OSError (storage unreachable, a timeout) is in ``e``'s cause chain: worth a worker-group restart,
    unlike a file that is there but damaged."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def teacher_failure(name: str, error: BaseException, max_restarts: int, timeout_s: float) -> str:
    """One line: which teacher cannot serve targets, why, and the knob that decides it."""
    from ray.exceptions import GetTimeoutError

    if isinstance(error, GetTimeoutError):
        return (f"teacher {name} sent no targets for a block within teacher_pool.call_timeout_s={timeout_s:g} s: "
                "raise it for a slow teacher, or look for a hung teacher actor (ray list actors; its log under /tmp/ray/session_latest/logs)")
    why = str(error).strip().splitlines()
    cause = next((ln.strip() for ln in why if "OOM" in ln or "memory" in ln.lower()), why[0] if why else type(error).__name__)
    return (f"teacher {name} cannot serve targets: its actor died and was restarted teacher_pool.max_restarts={max_restarts} times "
            f"({type(error).__name__}: {cause[:300]}); give it more memory (teacher_pool.batch_size, teacher_pool.cpus_per_actor) or check its weights")


def _views_and_targets(
    batch: dict[str, np.ndarray], *, state: ray.actor.ActorHandle, seed: int, plan: ViewPlan,
    teachers: dict[str, list[ray.actor.ActorHandle]], read_piece: Callable[[dict[str, Any]], dict[str, np.ndarray]] | None = None,
    max_restarts: int = 3, timeout_s: float = 600.0, requester: Requester | None = None,
) -> dict[str, np.ndarray]:
    """The view stage: this epoch's views of a block, then every teacher's targets for them (from the run's
    teacher actors or the sweep's fleet, as ``requester``: its cache and views key). A streamed source's block
    describes pieces of storage (``StreamedImages.pieces``): ``read_piece`` reads and decodes their rows here first."""
    if read_piece is not None:
        n = len(next(iter(batch.values())))
        for attempt in range(READ_ATTEMPTS):
            try:
                parts = [read_piece({k: v[i] for k, v in batch.items()}) for i in range(n)]
                break
            except SimRegError as e:
                if attempt + 1 < READ_ATTEMPTS:  # a storage hiccup (a 503, a reset connection) passes
                    time.sleep(2.0 * (attempt + 1))
                    continue
                if not _caused_by_io(e):  # a shard damaged or replaced since the run started: the same on every retry
                    ray.get(state.fail.remote(str(e)))
                raise
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ("sample_id", "label", "image")}
    out = add_views(batch, epoch=ray.get(state.get_epoch.remote()), seed=seed, plan=plan)
    request = ray.put({k: out[k] for k in ("sample_id", "view", "view_index")})  # shipped once to all teachers
    pick = int(out["sample_id"][0]) if len(out["sample_id"]) else 0  # spreads blocks over a teacher's actors
    refs = {name: actors[pick % len(actors)].infer.remote(request, requester) for name, actors in teachers.items()}
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    for name, ref in refs.items():
        try:
            out[f"target_{name}"], counts, write_error = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except (RayActorError, GetTimeoutError) as e:  # ActorDiedError: restarts used up
            message = teacher_failure(name, e, max_restarts, timeout_s)
            ray.get(state.fail.remote(message))  # the driver ends the run with this line (a retried task would hit it again)
            raise SimRegError(message) from None
        state.add_teacher_rows.remote(name, counts)
        if write_error is not None and requester is not None:  # the driver's log says it once
            state.note_placement.remote(
                f"warning: teacher {name}: the target cache in {requester.cache_root} cannot be written ({write_error}); "
                "the run goes on computing targets without caching them (free space there, or set cache.dir / cache.enabled=false)")
    return out


def images_dataset(images: ImageSet, rows_per_block: int) -> Dataset:
    """Rows {sample_id, label, image}; many small blocks so the stream starts early and shuffles by block."""
    tables = []
    for i in range(0, len(images), rows_per_block):
        sl = slice(i, i + rows_per_block)
        tables.append(
            pa.table({
                "sample_id": pa.array(images.sample_ids[sl]),
                "label": pa.array(images.labels[sl]),
                "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images.images[sl])),
            })
        )
    # from_blocks: each block's metadata read here; from_arrow runs a Ray task per block for it, in a cold
    # worker process, and waits on them (benchmarks/RESULTS.md, "Start-up")
    return ray.data.from_blocks(tables)


def streamed_dataset(images: ImageSet, rows_per_block: int) -> Dataset:
    """A streamed source's train rows as one block per piece of storage (``StreamedImages.pieces``), read
    and decoded by the view stage's tasks (nothing decoded in the driver, nothing held in the object store)."""
    assert isinstance(images.images, StreamedImages)
    pieces = images.images.pieces(rows_per_block)
    return ray.data.from_items(pieces, override_num_blocks=len(pieces))


def build_train_dataset(
    images: ImageSet, teachers: dict[str, list[ray.actor.ActorHandle]], state: ray.actor.ActorHandle, seed: int,
    plan: ViewPlan, res: PoolResources, requester: Requester | None = None,
) -> Dataset:
    """Images -> this epoch's views and every teacher's targets, block order randomized per epoch. In-memory
    images travel as blocks of one teacher batch (``teacher_pool.batch_size`` rows: the first block of an
    epoch reaches the students after one teacher call); a streamed source as pieces of its storage."""
    streamed = images.streamed
    ds = (streamed_dataset(images, res.batch_size) if streamed else images_dataset(images, res.batch_size)).randomize_block_order()
    reader = type(images.images).read_piece if streamed else None
    return ds.map_batches(
        _views_and_targets,  # type: ignore[arg-type]  # keyword-only extras come from fn_kwargs
        fn_kwargs={"state": state, "seed": seed, "plan": plan, "teachers": teachers, "read_piece": reader,
                   "max_restarts": res.max_restarts, "timeout_s": res.call_timeout_s, "requester": requester},
        batch_size=1 if streamed else res.batch_size, num_cpus=res.cpus_per_view_task,
        compute=TaskPoolStrategy(size=res.view_tasks), zero_copy_batch=True,
    )
