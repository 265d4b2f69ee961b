"""``simreg cache warm``: a config's teacher targets computed once, in this process (no Ray).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from simreg.models.errors import DataError

log = logging.getLogger("simreg")


def warm_cache(cfg: Any, epochs: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fill the cache for ``cfg`` in this process (no Ray): every teacher, every view index a run of
    ``epochs`` (default ``train.epochs``) will use. Rows already cached are skipped."""
    from simreg.orchestrator.data.views import add_views, view_index
    from simreg.orchestrator.pipeline.teacher import TeacherInference
    from simreg.orchestrator.train.builders import cache_spec, teacher_options, view_plan
    from simreg.orchestrator.train.prepare import prepare

    prep = prepare(cfg, quiet=True)
    spec = cache_spec(cfg, prep.train)
    if spec is None:
        raise DataError("the target cache is off: pass cache.enabled=true (and optionally cache.dir=...)")
    plan = view_plan(cfg)
    n_epochs = epochs or cfg.train.epochs
    indices = sorted({view_index(e, plan.bank) for e in range(n_epochs)})
    tp = cfg.teacher_pool
    train = prep.train  # a streamed pack stays in its shards: read and decoded one block at a time
    report: dict[str, Any] = {"cache_dir": spec.root, "view_indices": indices, "images": len(train), "teachers": {}}
    t0 = time.perf_counter()
    infs = [TeacherInference(ts, tp.threads, **teacher_options(cfg, spec)) for ts in prep.specs]
    seconds = [0.0] * len(infs)
    done, next_log = 0, len(train) // 10
    for batch in train.blocks(tp.batch_size):  # each block decoded once, for every view index and teacher
        n = len(batch["sample_id"])
        for v in indices:
            todo = []
            for k, inf in enumerate(infs):
                assert inf.cache is not None
                if inf.cache.contains(v, batch["sample_id"]):  # skip rendering views nobody needs
                    inf.cached_rows += n
                else:
                    todo.append(k)
            if todo:
                views = add_views(batch, epoch=v, seed=cfg.seed, plan=plan)  # v < bank: view_index(v) == v
                for k in todo:
                    t1 = time.perf_counter()
                    infs[k](dict(views))
                    seconds[k] += time.perf_counter() - t1
        done += n
        if progress and done >= next_log:
            next_log += max(1, len(train) // 10)
            log.info("cache warm: %d / %d images x %d view(s); %s", done, len(train), len(indices),
                     ", ".join(f"{i.spec.name}: {i.forward_rows} computed, {i.cached_rows} already cached" for i in infs))
    for inf, s in zip(infs, seconds, strict=True):
        inf.flush_cache()  # every shard in the store before the report says so
        assert inf.cache is not None
        report["teachers"][inf.spec.name] = {
            "key": inf.cache.dir.name, "computed_rows": inf.forward_rows, "cached_rows": inf.cached_rows, "seconds": s,
        }
    report["wall_s"] = time.perf_counter() - t0
    return report
