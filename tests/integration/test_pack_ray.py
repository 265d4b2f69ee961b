"""A packed folder of real Fashion-MNIST PNGs streamed by Ray Data on a real local cluster (2 CPUs): the
rows equal what the in-memory loader decodes, and ``simreg distill`` trains from the pack's shards (bad
files left out by the pre-scan; every packed train id trained on once per epoch)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from simreg.orchestrator.ray_compat import LOCAL_SYSTEM_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": a cluster of its own even when another one (`ray start`) runs on this machine;
    # started as `simreg distill` starts one (Ray Train reads the dashboard's state API).
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", logging_level="WARNING",
             _system_config=dict(LOCAL_SYSTEM_CONFIG))
    yield
    ray.shutdown()


def test_distill_streams_a_pack_with_bad_files_left_out(ray_cluster, tmp_path: Path, fmnist_root: Path):
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.data.fashion_mnist import load_fashion_mnist
    from simreg.orchestrator.data.pack.write import pack_image_folder
    from simreg.orchestrator.train.distill import distill

    real = load_fashion_mnist(fmnist_root, "test").subset(400, 0)
    for i, (im, lab) in enumerate(zip(real.images, real.labels, strict=True)):
        d = tmp_path / "src" / f"c{lab}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:03d}.png")
    (tmp_path / "src" / "c0" / "broken.png").write_bytes(b"not an image")
    good = (tmp_path / "src" / "c1").glob("*.png").__next__().read_bytes()
    (tmp_path / "src" / "c1" / "cut.png").write_bytes(good[: len(good) // 2])
    manifest = pack_image_folder(tmp_path / "src", tmp_path / "pack", shard_rows=64)
    assert manifest["splits"]["all"]["rows"] == 400  # the two bad files left out by the pre-scan

    cfg = load_config(None, [
        "name=packed", "data.source=packed", f"data.root={tmp_path / 'pack'}", "data.train_size=null",
        "data.holdout_fraction=0.1", "data.knn_bank_size=200", "data.knn_query_size=40", "train.epochs=2",
        "train.batch_size=64", "heads.depth=1", "eval.val_every=0", "cache.enabled=false", "augment.view_bank=null",
    ])
    summary = distill(cfg, tmp_path / "run")
    assert summary["train_images"] == 360  # 400 packed - 40 held out
    for h in summary["history"]:
        assert h["train/unique_ids"] == 360 and h["train/duplicate_ids"] == 0 and h["train/images"] == 360
    assert summary["teacher_rows"]["simclr_r10t"]["forward"] == 720
    assert summary["student_knn"]["top1_20nn"] > 10
