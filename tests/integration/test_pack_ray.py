"""A packed folder of real Fashion-MNIST PNGs streamed by Ray Data on a real local cluster (2 CPUs): the
rows equal what the in-memory loader decodes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": a cluster of its own even when another one (`ray start`) runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_streamed_rows_equal_loaded_rows(ray_cluster, fmnist_small, tmp_path: Path):
    from simreg.orchestrator.pack import load_packed_splits, pack_image_folder, read_packed_dataset

    for split, sl in (("train", slice(0, 48)), ("val", slice(48, 64))):
        for i, (im, lab) in enumerate(zip(fmnist_small.images[sl], fmnist_small.labels[sl], strict=True)):
            d = tmp_path / "src" / split / f"c{lab}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(d / f"{i:03d}.png")
    pack_image_folder(tmp_path / "src", tmp_path / "pack", shard_rows=12)  # 4 train shards, 2 val shards
    train, val = load_packed_splits(tmp_path / "pack", 24, 0, 0.1)
    for split, expected in (("train", train), ("val", val)):
        # Read and decode tasks at 0.5 CPU: they must not wait for CPUs on a 2-CPU cluster.
        ds = read_packed_dataset(tmp_path / "pack", split, store_size=24, batch_size=8, ray_remote_args={"num_cpus": 0.5})
        rows = sorted(ds.take_all(), key=lambda r: int(r["sample_id"]))
        assert [int(r["sample_id"]) for r in rows] == expected.sample_ids.tolist()
        assert np.array_equal(np.stack([r["image"] for r in rows]), expected.images)
        assert np.array_equal(np.array([int(r["label"]) for r in rows]), expected.labels)
