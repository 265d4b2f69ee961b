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


@pytest.fixture(scope="module")
def pack(tmp_path_factory, fmnist_root: Path) -> Path:
    """400 real Fashion-MNIST PNGs (and two bad files) packed in shards of 64 rows."""
    from simreg.orchestrator.data.fashion_mnist import load_fashion_mnist
    from simreg.orchestrator.data.pack.write import pack_image_folder

    tmp_path = tmp_path_factory.mktemp("pack")
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
    return tmp_path / "pack"


def _packed_config(pack: Path, *extra: str):
    from simreg.orchestrator.config import load_config

    return load_config(None, [
        "name=packed", "data.source=packed", f"data.root={pack}", "data.train_size=null",
        "data.holdout_fraction=0.1", "data.knn_bank_size=200", "data.knn_query_size=40", "train.epochs=2",
        "train.batch_size=64", "heads.depth=1", "eval.val_every=0", "cache.enabled=false", "augment.view_bank=null", *extra,
    ])


def test_distill_streams_a_pack_with_bad_files_left_out(ray_cluster, tmp_path: Path, pack: Path):
    from simreg.orchestrator.train.distill import distill

    summary = distill(_packed_config(pack), tmp_path / "run")
    assert summary["train_images"] == 360  # 400 packed - 40 held out
    for h in summary["history"]:
        assert h["train/unique_ids"] == 360 and h["train/duplicate_ids"] == 0 and h["train/images"] == 360
    assert summary["teacher_rows"]["simclr_r10t"]["forward"] == 720
    assert summary["student_knn"]["top1_20nn"] > 10


@pytest.mark.faults
def test_a_shard_damaged_mid_run_ends_the_run_failed_naming_it(ray_cluster, tmp_path: Path, pack: Path):
    """A shard overwritten while a streamed run reads the pack (a copy gone wrong, a bad disk): the run ends
    FAILED with one line naming the shard, without using up its worker-group restarts; epoch 0's checkpoint stays."""
    import shutil
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from simreg.models.errors import SimRegError
    from simreg.orchestrator.train.checkpoint import train_storage
    from simreg.orchestrator.train.distill import distill
    from tests.integration.helpers import committed

    damaged = tmp_path / "pack"
    shutil.copytree(pack, damaged)
    shard = sorted((damaged / "all").glob("part-*.parquet"))[2]
    out = tmp_path / "run"
    done = threading.Event()

    def damage() -> None:
        while not done.is_set() and not committed(out, 0):
            time.sleep(0.2)
        shard.write_bytes(b"PAR1" + bytes(4096) + b"PAR1")

    t = threading.Thread(target=damage, daemon=True)
    t.start()
    t0 = time.time()
    try:
        with pytest.raises(SimRegError) as e:
            distill(_packed_config(damaged, "train.epochs=4", "scaling.max_failures=3"), out)
    finally:
        done.set()
        t.join(timeout=5)
    assert str(shard) in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert time.time() - t0 < 200  # not three more worker groups failing on the same shard
    assert 0 in {int(p.name.removeprefix("epoch_")) for p in train_storage(out).glob("epoch_*")}
    run = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run((out / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED" and not (out / "summary.json").exists()
