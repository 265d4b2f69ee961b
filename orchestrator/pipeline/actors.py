"""The teacher actors (``PooledTeacher``): a teacher fleet that serves one run or every trial of a sweep, and
ending a run's actors (``RunState`` lives in ``pipeline/state.py``).

Teachers run in actors that live for the whole run (``num_gpus`` each on a GPU cluster): a Ray Data
actor pool would be torn down and rebuilt at every epoch's execution, and on a small machine that
restart (process, imports, weights, the first block through the teacher) cost ~7 s of every epoch in
which the students waited. ``simreg distill`` starts its own (a fleet of one run); ``simreg sweep`` starts one
fleet for all its trials (``teacher_pool.fleet``), so N concurrent trials share one copy of every teacher.

A fleet actor serves requests from any number of runs. Each request names its ``Requester``: the run's target
cache (its key holds the run's view recipe) and a ``views_key`` that says which runs render identical views.
Rows whose target the requester's cache holds are served from it; rows another request is computing right
now (same views key, view index and sample id) wait for that forward (in-flight de-duplication); the rest
are queued, and the actor forwards the queue in batches of up to ``teacher_pool.batch_size`` rows, waiting at
most ``teacher_pool.batch_wait_ms`` for more requests to fill one (rows of concurrent trials go through the
teacher together). Each request is answered with its targets and its accounting (rows computed for it, served
by the cache, shared with another request).

A teacher actor that dies is restarted by Ray and the call retried, up to ``teacher_pool.max_restarts`` times;
then, or when a call outlasts ``teacher_pool.call_timeout_s``, the view stage records why in ``RunState`` and
the run ends FAILED with that line.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from simreg.models.errors import first_line
from simreg.orchestrator.cache.targets import CacheSpec, TargetCache
from simreg.orchestrator.pipeline.requester import Requester
from simreg.orchestrator.pipeline.teacher import TeacherInference, TeacherSpec

log = logging.getLogger("simreg")

OPEN_CACHES = 16  # target caches a fleet actor keeps open (one per cache key: a trial's data, views and seed)
IO_THREADS = 4  # a fleet actor's threads for target-cache reads


@dataclass
class _Work:
    """Rows of one request that go through the teacher (those no cache holds and no other request computes)."""

    view_index: int
    ids: np.ndarray
    views: np.ndarray
    cache: TargetCache | None
    share: str | None
    done: asyncio.Future[np.ndarray]
    queued: float


class PooledTeacher(TeacherInference):
    """A teacher in a long-lived actor that serves every run of a fleet (an asyncio actor: requests of
    concurrent runs wait together, the forwards run one at a time in a thread of their own).

    ``state``: a ``RunState`` told where the actor landed and when it was ready (a run's own teachers, or the
    sweep's fleet state)."""

    def __init__(
        self, spec: TeacherSpec, threads: int, state: ray.actor.ActorHandle | None, options: dict[str, Any],
        batch_size: int = 128, batch_wait_ms: float = 5.0,
    ) -> None:
        super().__init__(spec, threads, **options)  # no cache of its own: each request brings its run's
        self.batch_size = batch_size
        self.wait_s = batch_wait_ms / 1000.0
        # the forwards: one thread (torch's own threads inside it), with torch's thread count set in it
        self._forward_pool = ThreadPoolExecutor(1, "simreg-teacher", initializer=_torch_threads, initargs=(threads,))
        self._caches: OrderedDict[str, TargetCache] = OrderedDict()  # the most recently used last
        # store I/O (bucket listings, shard reads, closing an evicted cache) runs in these threads, never on the
        # actor's event loop: a slow store delays the rows that wait for it, not every other request
        self._io = ThreadPoolExecutor(IO_THREADS, "simreg-cache-io")
        self._closer = ThreadPoolExecutor(1, "simreg-cache-close")  # an evicted cache's last uploads never hold up lookups
        self._closing: list[Future[None]] = []  # evicted caches flushing their uploads, then freed
        self._inflight: dict[tuple[str, int, int], tuple[_Work, int]] = {}  # (views key, view index, sample id) -> (work, row)
        self._queue: list[_Work] = []
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.shared_rows = 0  # rows served from another request's forward
        self.batches = 0  # forwards run
        if state is not None:
            ctx = ray.get_runtime_context()
            state.note_placement.remote(self.placement, {
                "role": "teacher", "name": spec.name, "node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "pid": os.getpid(),
                "resources": {k: v for k, v in ctx.get_assigned_resources().items()},
            })
            state.mark.remote("teacher_ready", time.time())

    def _cache_for(self, requester: Requester) -> TargetCache | None:
        cid = requester.cache_id
        if cid is None or requester.cache_root is None or requester.data_fingerprint is None:
            return None
        if cid in self._caches:
            self._caches.move_to_end(cid)
            return self._caches[cid]
        spec = CacheSpec(requester.cache_root, requester.data_fingerprint, requester.views, requester.memory_mib)
        self._caches[cid] = cache = TargetCache(spec.root, spec.key(self.fingerprint()), self.spec.name, self.teacher.feature_dim,
                                                spec.memory_mib)  # opening does no I/O
        while len(self._caches) > OPEN_CACHES:  # a long sweep's ended trials: their targets stay in storage, not in memory
            _, old = self._caches.popitem(last=False)
            self._closing = [f for f in self._closing if not f.done()]
            free = all(c.dir.path != old.dir.path for c in self._caches.values())
            self._closing.append(self._closer.submit(old.close, free))  # its uploads finish, then its shards leave memory
        return cache

    async def infer(self, batch: dict[str, np.ndarray], requester: Requester | None = None) -> tuple[np.ndarray, dict[str, int], str | None]:
        """{sample_id, view, view_index} -> ((B, d) float16 targets, {"forward", "cached", "shared"} rows, a
        cache write error to report or None)."""
        requester = requester or Requester()
        ids, vidx, views = batch["sample_id"], batch["view_index"], batch["view"]
        out = np.empty((len(ids), self.teacher.feature_dim), np.float16)
        counts = {"forward": 0, "cached": 0, "shared": 0}
        cache = self._cache_for(requester)
        share = requester.views_key
        waits: list[tuple[np.ndarray, _Work, np.ndarray]] = []  # (rows of out, work, rows of its result)
        mine: list[tuple[np.ndarray, _Work]] = []
        for v in np.unique(vidx).tolist():
            rows = np.flatnonzero(vidx == v)
            if cache is not None:
                got, found = await asyncio.get_running_loop().run_in_executor(self._io, cache.lookup, int(v), ids[rows])
                out[rows[found]] = got[found]
                counts["cached"] += int(found.sum())
                rows = rows[~found]
            if rows.size == 0:
                continue
            if share is not None:
                todo: list[int] = []
                theirs: dict[int, tuple[_Work, list[int], list[int]]] = {}
                for r, sid in zip(rows.tolist(), ids[rows].tolist(), strict=True):
                    hit = self._inflight.get((share, int(v), sid))
                    if hit is None:
                        todo.append(r)
                    else:
                        theirs.setdefault(id(hit[0]), (hit[0], [], []))
                        theirs[id(hit[0])][1].append(r)
                        theirs[id(hit[0])][2].append(hit[1])
                for work, here, there in theirs.values():
                    waits.append((np.array(here), work, np.array(there)))
                    counts["shared"] += len(here)
                rows = np.array(todo, dtype=np.int64)
            if rows.size == 0:
                continue
            work = _Work(int(v), np.ascontiguousarray(ids[rows]), np.ascontiguousarray(views[rows]), cache, share,
                         asyncio.get_running_loop().create_future(), time.monotonic())
            if share is not None:
                for j, sid in enumerate(work.ids.tolist()):
                    self._inflight[(share, work.view_index, sid)] = (work, j)
            mine.append((rows, work))
            counts["forward"] += int(rows.size)
            self._enqueue(work)
        # shielded: another request may be waiting on the same work, and Ray cancels a request whose caller went
        # away (a trial stopped, an execution shut down); the cancellation must not reach the shared future
        for at, work in mine:
            out[at] = await asyncio.shield(work.done)
        for at, work, rows_there in waits:
            out[at] = (await asyncio.shield(work.done))[rows_there]
        self.forward_rows += counts["forward"]
        self.cached_rows += counts["cached"]
        self.shared_rows += counts["shared"]
        return out, counts, cache.write_error if cache is not None else None

    def _enqueue(self, work: _Work) -> None:
        loop = asyncio.get_running_loop()  # Ray's actor loop; a test's asyncio.run calls bring new ones
        if self._wake is None or self._loop is not loop:
            self._wake, self._loop, self._batcher = asyncio.Event(), loop, None
        if self._batcher is None or self._batcher.done():
            self._batcher = loop.create_task(self._batches())
        self._queue.append(work)
        self._wake.set()

    async def _batches(self) -> None:
        """Forward the queue: a batch as soon as it holds ``batch_size`` rows, or ``batch_wait_ms`` after its first
        request was queued, whichever comes first (at least one request per batch)."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            while sum(len(w.ids) for w in self._queue) < self.batch_size:
                left = self._queue[0].queued + self.wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            take = self._take()
            try:
                parts = await loop.run_in_executor(self._forward_pool, self._forward, take)
            except BaseException as e:  # handed to every request of the batch (a cancelled batcher: they are cancelled)
                for w in take:
                    if w.done.done():
                        continue
                    if isinstance(e, Exception):
                        w.done.set_exception(e)
                    else:
                        w.done.cancel()
                if not isinstance(e, Exception):
                    raise
            else:
                for w, p in zip(take, parts, strict=True):
                    if not w.done.done():
                        w.done.set_result(p)
            finally:
                for w in take:
                    if w.share is not None:
                        for sid in w.ids.tolist():
                            self._inflight.pop((w.share, w.view_index, sid), None)

    def _take(self) -> list[_Work]:
        """The next batch: queued works in order, up to ``batch_size`` rows (at least one), all of the first's view
        shape (trials may render other sizes; the teacher resizes each batch to its input)."""
        first = self._queue.pop(0)
        take, rows, left = [first], len(first.ids), []
        for w in self._queue:
            if rows + len(w.ids) <= self.batch_size and w.views.shape[1:] == first.views.shape[1:] and w.views.dtype == first.views.dtype:
                take.append(w)
                rows += len(w.ids)
            else:
                left.append(w)
        self._queue = left
        return take

    def _forward(self, works: list[_Work]) -> list[np.ndarray]:
        """One forward over the rows of several requests, then each one's rows stored in its cache (before the
        rows leave the in-flight map: a later request finds them in one or the other)."""
        views = works[0].views if len(works) == 1 else np.concatenate([w.views for w in works])
        tg = self.targets(views)
        self.batches += 1
        parts, at = [], 0
        for w in works:
            p = tg[at:at + len(w.ids)]
            at += len(w.ids)
            if w.cache is not None:
                try:
                    w.cache.store(w.view_index, w.ids, p)
                except Exception as e:  # noqa: BLE001  (one run's cache: its requests are still answered, it stops caching)
                    w.cache.cannot_write(e)
            parts.append(p)
        return parts

    def stats(self) -> dict[str, int]:
        """Rows computed, served by a cache and shared between requests, and forwards run, since the actor (last)
        started: Ray's restart of an actor starts them from zero."""
        return {"forward": self.forward_rows, "cached": self.cached_rows, "shared": self.shared_rows, "batches": self.batches}

    def flush_cache(self) -> None:
        """Wait for the cache shards still uploading (an object store); a no-op on local disk."""
        for f in self._closing:
            f.result()
        self._closing = []
        for c in self._caches.values():
            c.flush()


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


TeacherServer = ray.remote(PooledTeacher)


def stop_actors(state: ray.actor.ActorHandle | None, teachers: list[ray.actor.ActorHandle], timeout_s: float = 60.0) -> None:
    """End a run's actors: the teachers first finish uploading their cache shards (an object store), then all go."""
    if teachers:
        try:
            ray.get([a.flush_cache.remote() for a in teachers], timeout=timeout_s)
        except Exception as e:  # noqa: BLE001  (a dead actor or a slow store: what did not upload is recomputed later)
            log.warning("target cache: teacher actors did not finish uploading (%s)", first_line(e, 200))
    for a in [state, *teachers]:
        if a is not None:
            ray.kill(a)


@dataclass(frozen=True)
class PoolResources:
    """Resources of each stage; the rule on a small machine: workers + actors + view tasks <= cluster CPUs."""

    actors_per_teacher: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    batch_size: int
    teacher_options: dict[str, Any] = field(default_factory=dict)  # precision, channels_last, compile, device
    view_tasks: int = 2
    cpus_per_view_task: float = 0.25
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per teacher actor
    label_selector: dict[str, str] = field(default_factory=dict)  # node labels per teacher actor
    env_vars: dict[str, str] = field(default_factory=dict)  # environment of the teacher actors' processes
    max_restarts: int = 3  # restarts of a dead teacher actor before its calls fail
    call_timeout_s: float = 600.0  # a view task's wait for one block's targets
    batch_wait_ms: float = 5.0  # a fleet actor's wait for more requests to fill a batch


def start_teachers(
    specs: list[TeacherSpec], state: ray.actor.ActorHandle | None, res: PoolResources,
) -> dict[str, list[ray.actor.ActorHandle]]:
    """``actors_per_teacher`` long-lived actors per teacher (``num_gpus`` each on a GPU cluster); Ray restarts
    a dead one (``max_restarts`` times) and retries the calls it was serving."""
    return {
        t.name: [
            TeacherServer.options(  # type: ignore[misc]
                num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor, max_restarts=res.max_restarts, max_task_retries=-1,
                resources=res.resources or None, label_selector=res.label_selector or None,
                runtime_env={"env_vars": dict(res.env_vars)} if res.env_vars else None,
                scheduling_strategy="DEFAULT",  # not inside a Tune trial's placement group (it holds 0.01 CPU)
            ).remote(t, res.threads, state, res.teacher_options, res.batch_size, res.batch_wait_ms)
            for _ in range(res.actors_per_teacher)
        ]
        for t in specs
    }
