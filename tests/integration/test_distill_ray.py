"""The whole distill path on a real local Ray cluster: real Fashion-MNIST images, a real SimCLR teacher,
2 DDP workers, a real MLflow sqlite store, and the exported student loaded back through timm."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from simreg.orchestrator.ray_compat import LOCAL_SYSTEM_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", logging_level="WARNING",
             _system_config=dict(LOCAL_SYSTEM_CONFIG))  # as `simreg distill` starts it
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def distilled(ray_cluster, teachers_dir: Path, fmnist_root: Path, tmp_path_factory):
    """One fit covering the method's options together: the real CNN teacher beside a ViT teacher (DINO
    checkpoint layout, its own resolution and mean/std), each network its own view (the student's strong),
    k-NN after the first head layer, the target cache with one view per sample (epoch 1 reads epoch 0's
    targets), the ViT's targets PHI-S-normalised and UNIC's teacher dropping."""
    import yaml

    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.distill import distill

    out = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=48)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, out / "dino_vit.pth")
    teachers = [
        {"name": "r10t", "arch": "resnet10t", "weights": str(teachers_dir / "fmnist_simclr_resnet10t.safetensors")},
        {"name": "vit", "arch": "vit_tiny_patch16_224", "weights": str(out / "dino_vit.pth"), "format": "dino",
         "input_size": 48, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "model_kwargs": {"img_size": 48},
         "normalize": "phi_s"},
    ]
    (out / "cfg.yaml").write_text(yaml.safe_dump({"teachers": teachers}))
    cfg = load_config(out / "cfg.yaml", [
        "name=itest", "data.train_size=300", "data.knn_bank_size=300", "data.knn_query_size=100", "train.epochs=2",
        "train.batch_size=64", "student.arch=resnet10t", "student.input_size=32", "heads.depth=2", "scaling.num_workers=2",
        "augment.mode=different", "augment.teacher=weak", "augment.student=strong", "eval.head_layers=[1]",
        "cache.enabled=true", f"cache.dir={out / 'cache'}", "augment.view_bank=1", "loss.teacher_drop=0.5", "loss.stats_images=128",
        "teacher_pool.cpus_per_actor=0.25",  # 2 workers x 0.5 + 2 teachers x 0.25 + 2 view tasks x 0.25 = 2 CPUs
        "tracking.system_metrics_s=2", "export.onnx=true",
    ])
    summary = distill(cfg, out)
    return cfg, out, summary


def test_summary_contract(distilled):
    cfg, out, summary = distilled
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["mlflow_run_id"] == summary["mlflow_run_id"]
    for key in ("teacher_knn", "student_knn", "random_student_knn", "epochs", "train_images_per_s", "wall_s",
                "mlflow_tracking_uri", "mlflow_run_id", "student_arch", "student_weights"):
        assert key in on_disk, key
    assert set(on_disk["teacher_knn"]) == {"r10t", "vit"}
    assert set(on_disk["student_head_knn"]) == {"r10t/1", "vit/1"}
    for block in (*on_disk["teacher_knn"].values(), on_disk["student_knn"], on_disk["random_student_knn"], *on_disk["student_head_knn"].values()):
        assert set(block) >= {"top1_1nn", "top1_20nn"} and all(0 <= v <= 100 for v in block.values())
    # a real trained teacher separates classes far better than chance (10 classes) on real images
    assert on_disk["teacher_knn"]["r10t"]["top1_20nn"] > 60
    assert on_disk["epochs"] == 2 and len(on_disk["history"]) == 2
    assert on_disk["train_images_per_s"] > 0 and on_disk["student_arch"] == "resnet10t"
    h0, h1 = on_disk["history"]
    # every sample id of the 300 trained on exactly once per epoch across the 2 workers (equal split: 150 each)
    assert h0["train/images"] == 300 and h0["train/unique_ids"] == 300 and h0["train/duplicate_ids"] == 0
    assert h1["train/unique_ids"] == 300 and h1["train/duplicate_ids"] == 0
    assert h0["train/resumed_at_epoch"] == h1["train/resumed_at_epoch"] == 0  # one attempt: no worker group restart
    # the student moves towards the teachers (the undropped per-teacher losses: train/loss is the dropped one)
    assert h1["train/loss/r10t"] + h1["train/loss/vit"] < h0["train/loss/r10t"] + h0["train/loss/vit"]
    assert {"train/loss/r10t", "train/loss/vit", "train/cos/r10t", "train/cos/vit"} <= set(h1)
    # teacher dropping at p = 0.5: each image keeps its worst teacher, and the other one half of the time
    for h in (h0, h1):
        assert all(0.4 < h[f"train/kept/{t}"] <= 1.0 for t in ("r10t", "vit"))
        assert 1.35 < h["train/kept/r10t"] + h["train/kept/vit"] < 1.65
    # the teacher actors ran each of the 300 images once; epoch 1 came from the Parquet cache
    assert on_disk["teacher_rows"] == {"r10t": {"forward": 300, "cached": 300, "shared": 0}, "vit": {"forward": 300, "cached": 300, "shared": 0}}
    assert all(0 < h["val/top1_20nn"] <= 100 for h in (h0, h1))  # validation k-NN every epoch
    # start-up marks, in the order they happened: the first optimizer step last, after the workers ran
    startup = on_disk["startup_s"]
    assert {"data_ready", "ray_ready", "fit", "teacher_ready", "workers_ready", "first_step"} == set(startup), startup
    assert list(startup)[:3] == ["data_ready", "ray_ready", "fit"] and list(startup)[-1] == "first_step"
    assert list(startup.values()) == sorted(startup.values()) and 0 < startup["first_step"] < on_disk["wall_s"]


def test_mlflow_run_has_params_epoch_metrics_and_artifacts(distilled):
    from mlflow.tracking import MlflowClient

    _, out, summary = distilled
    assert summary["mlflow_tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # summary.json ("finished") is the run's last write: after MLflow recorded the FINISHED status (ms clock)
    assert (out / "summary.json").stat().st_mtime >= run.info.end_time / 1000 - 0.002
    assert run.data.params["heads.depth"] == "2" and run.data.params["teachers.0.arch"] == "resnet10t"
    assert run.data.params["augment.mode"] == "different" and run.data.params["teachers.1.model_kwargs.img_size"] == "48"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == [0, 1]
    assert run.data.metrics["knn/student/top1_20nn"] == pytest.approx(summary["student_knn"]["top1_20nn"])
    # the ViT's PHI-S statistics: estimated once on 128 images, stored beside the cache, their figures in MLflow
    assert run.data.params["teachers.1.normalize"] == "phi_s" and run.data.params["teachers.0.normalize"] == "l2"
    assert run.data.metrics["normalize/vit/images"] == 128 and run.data.metrics["normalize/vit/effective_rank"] > 1
    assert "normalize/r10t/images" not in run.data.metrics
    assert len(list((out / "cache" / "stats").glob("*.safetensors"))) == 1
    assert (out / "target_norm.safetensors").is_file()  # the run's maps, for a resume
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "knn.md", "config.json", "student"} <= arts
    # export.onnx=true: the student as ONNX beside its safetensors, its parity with PyTorch checked and recorded
    assert {a.path for a in client.list_artifacts(run.info.run_id, "student")} == {
        "student/student.safetensors", "student/student.json", "student/student.onnx"}
    assert summary["student_onnx"]["onnx"] == "student.onnx" and summary["student_onnx"]["parity_max_abs_diff"] <= 1e-4
    assert (out / "student" / "student.onnx").is_file()
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(out)
    # the node's system metrics, sampled every 2 s while the students trained (MLflow's System metrics tab)
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and sorted(m.step for m in cpu) == list(range(len(cpu))) and any(m.value > 0 for m in cpu)
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage", "system/network_receive_megabytes"} <= set(run.data.metrics)
    if not torch.cuda.is_available():
        assert not any(k.startswith("system/gpu_") for k in run.data.metrics)  # no GPU here: no GPU series


def test_exported_student_loads_in_timm_with_same_features(distilled):
    from simreg.orchestrator.train.builders import student_transform
    from simreg.orchestrator.train.checkpoint import load_state

    cfg, out, summary = distilled
    exported = timm.create_model("resnet10t", num_classes=0)
    exported.load_state_dict(load_file(summary["student_weights"]), strict=True)
    ckpts = sorted((out / "ray" / "train").glob("epoch_*"))
    assert [c.name for c in ckpts] == ["epoch_0000", "epoch_0001"]
    trained = timm.create_model("resnet10t", num_classes=0)
    trained.load_state_dict(load_state(ckpts[-1])["backbone"], strict=True)
    x = student_transform(cfg)(torch.rand(4, 1, 64, 64))
    exported.eval(), trained.eval()
    with torch.no_grad():
        assert torch.equal(exported(x), trained(x))
    card = json.loads((Path(summary["student_weights"]).with_suffix(".json")).read_text())
    assert card["arch"] == "resnet10t" and card["input"]["size"] == 32


def test_a_rerun_on_the_warm_cache_runs_no_teacher(distilled, tmp_path_factory):
    """The same config again: the cache holds every target, so the workers render their views and read the
    targets themselves (no teacher actor, no view task, no Ray Data execution), every image once per epoch. The
    teachers are asked for a resource no node offers: a run that starts none is not refused for it."""
    from simreg.orchestrator.config import validate_config
    from simreg.orchestrator.train.distill import distill

    cfg, _, first = distilled
    tree = cfg.model_dump()
    tree["teacher_pool"]["resources"] = {"teacher_node": 1.0}
    out = tmp_path_factory.mktemp("rerun")
    summary = distill(validate_config(tree, "test config"), out)
    assert summary["teacher_rows"] == {"r10t": {"forward": 0, "cached": 600, "shared": 0}, "vit": {"forward": 0, "cached": 600, "shared": 0}}
    assert not [p for p in summary["placements"] if p.get("role") == "teacher"]
    assert "teacher_ready" not in summary["startup_s"]
    for h in summary["history"]:
        assert h["train/images"] == 300 and h["train/unique_ids"] == 300 and h["train/duplicate_ids"] == 0
        assert h["train/resumed_at_epoch"] == 0 and h["teacher/r10t/forward_rows"] == 0
    assert summary["history"][1]["train/loss"] < summary["history"][0]["train/loss"]  # the student moves towards the teachers


@pytest.fixture(scope="module")
def synthetic_runs(ray_cluster, tmp_path_factory):
    """No dataset and no weights file: the synthetic source (streamed, generated in the view tasks) and a random
    teacher; 2 epochs with one view per sample (epoch 1 computes and stores every target, epoch 2 reads them),
    then a second run on the same cache, every target of it cached."""
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.distill import distill

    out = tmp_path_factory.mktemp("synthetic")
    teacher = [{"name": "rand", "arch": "test_resnet", "weights": "random:3", "input_size": 32}]
    common = [
        "data.source=synthetic", "data.synthetic.images=1500", "data.synthetic.held_out=300", "data.train_size=null",
        "data.store_size=32", "data.view_size=32", "data.knn_bank_size=300", "data.knn_query_size=100",
        f"teachers={json.dumps(teacher)}", "student.arch=test_resnet", "student.input_size=32", "train.epochs=2",
        "augment.view_bank=1", "train.batch_size=64", "eval.val_every=0", "teacher_pool.batch_size=256",
        "cache.enabled=true", f"cache.dir={out / 'cache'}",
    ]
    first = distill(load_config(None, [*common, "name=synthetic1"]), out / "first")
    second = distill(load_config(None, [*common, "name=synthetic2"]), out / "second")
    return out, first, second


def test_a_synthetic_run_streams_through_the_pipeline_and_the_cache(synthetic_runs):
    from simreg.orchestrator.cache.admin import cache_entries

    out, first, second = synthetic_runs
    assert first["train_images"] == 1500
    assert first["teacher_rows"]["rand"]["forward"] == 1500 and first["teacher_rows"]["rand"]["cached"] == 1500
    for h in (*first["history"], *second["history"]):  # every generated image trained on once per epoch
        assert h["train/images"] == 1500 and h["train/unique_ids"] == 1500 and h["train/duplicate_ids"] == 0
    assert second["teacher_rows"]["rand"]["forward"] == 0 and second["teacher_rows"]["rand"]["cached"] == 3000
    shards = sorted((out / "cache").rglob("part-*.parquet"))
    assert shards and {p.parent.name for p in shards} == {"b0000000"}  # ids 0..1499: one bucket of the one view
    assert sum(int(p.name.split("-")[3]) for p in shards) == 1500  # every row stored once
    (entry,) = cache_entries(out / "cache")
    assert (entry["rows"], entry["views"], entry["counted"]) == (1500, 1, "recorded")
    assert first["student_knn"]["top1_20nn"] > 10  # the generated classes are learnable (chance: 10)
