from __future__ import annotations

import json
from pathlib import Path

import torch

from simreg.orchestrator.cli.main import main
from simreg.orchestrator.evaluation.knn import linear_probe
from simreg.orchestrator.evaluation.weights import evaluate_weights


def test_linear_probe_learns_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(800) % 4
    x = centers[y] + torch.randn(800, 16, generator=g)
    acc = linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=10, steps=(5, 8))
    assert acc > 95
    noise = linear_probe(torch.randn(600, 16, generator=g), y[:600], torch.randn(200, 16, generator=g), y[600:], epochs=5, steps=(3,))
    assert noise < 45  # 4 classes: chance is 25


def test_eval_real_teacher_on_real_images(teachers_dir: Path, fmnist_root, tmp_path: Path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--weights", str(teachers_dir / "fmnist_simclr_resnet10t.safetensors"), "--arch", "resnet10t",
               "--bank-size", "600", "--query-size", "200", "--linear", "--linear-epochs", "5", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["bank_images"] == 600 and res["query_images"] == 200 and res["feature_dim"] == 512
    assert res["top1_20nn"] > 65 and res["top1_1nn"] > 65 and res["linear_top1"] > 65  # a trained SSL teacher, 10 classes
    torch.manual_seed(0)  # the same protocol on a random-init backbone is clearly worse
    from safetensors.torch import save_file

    from simreg.models import build_backbone

    save_file(build_backbone("resnet10t").state_dict(), str(tmp_path / "rand.safetensors"))
    rand = evaluate_weights(tmp_path / "rand.safetensors", "resnet10t", bank_size=600, query_size=200)
    assert rand["top1_20nn"] < res["top1_20nn"] - 3


def test_eval_bad_input(tmp_path: Path, capsys):
    assert main(["eval", "--weights", str(tmp_path / "none.safetensors"), "--arch", "resnet10t"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--weights", "x", "--arch", "resnet10t", "--mean", "0.1", "0.2"]) == 2
    assert "--mean takes 1 or 3 values" in capsys.readouterr().err


def test_eval_vit_with_model_kwargs_and_temperature_knn(tmp_path: Path):
    """A ViT checkpoint in DINO layout, built at 32 px through --model-kwargs, evaluated with weighted k-NN."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    torch.save({"student": {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "dino.pth")
    out = tmp_path / "vit.json"
    rc = main(["eval", "--weights", str(tmp_path / "dino.pth"), "--arch", "vit_tiny_patch16_224", "--format", "dino",
               "--model-kwargs", "{img_size: 32}", "--input-size", "32", "--mean", "0.485", "0.456", "0.406",
               "--std", "0.229", "0.224", "0.225", "--bank-size", "300", "--query-size", "100",
               "--knn-weighting", "temperature", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["feature_dim"] == 192 and res["knn_weighting"] == "temperature" and 0 <= res["top1_20nn"] <= 100


def test_eval_model_kwargs_must_be_a_mapping(capsys):
    assert main(["eval", "--weights", "x", "--arch", "resnet10t", "--model-kwargs", "[1, 2]"]) == 2
    assert "--model-kwargs='[1, 2]' must be a mapping" in capsys.readouterr().err
