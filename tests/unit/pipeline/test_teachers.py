from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from simreg.models import InputTransform, ModelError, TeacherLoadError, build_backbone, load_teacher
from simreg.orchestrator.data.views import ViewPlan, ViewSpec, add_views
from simreg.orchestrator.pipeline.teacher import TeacherInference, TeacherSpec

TF = InputTransform(64, (0.286,) * 3, (0.353,) * 3)


def test_real_teacher_loads_frozen(teachers_dir: Path):
    t = load_teacher("r10t", "resnet10t", teachers_dir / "fmnist_simclr_resnet10t.safetensors", TF)
    assert t.feature_dim == 512
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    t.train()  # a teacher never leaves eval mode
    assert not t.training and not t.backbone.training
    out = t(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 512) and not out.requires_grad


def test_wrong_keys_listed(tmp_path: Path, teachers_dir: Path):
    with pytest.raises(TeacherLoadError) as e:
        load_teacher("t", "resnet18", teachers_dir / "fmnist_simclr_resnet10t.safetensors", TF, key="teachers.0")
    msg = str(e.value)
    assert "teachers.0.weights=" in msg and "resnet18" in msg
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "conv1.weight" in msg  # resnet18's stem key is missing from a resnet10t (deep-stem) file


def test_wrapped_and_torch_state_dicts(tmp_path: Path):
    torch.manual_seed(0)
    m = build_backbone("resnet10t")
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    t = load_teacher("t", "resnet10t", tmp_path / "ckpt.pth", TF)
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(t(x), m.eval()(TF(x)))


def test_missing_and_corrupt_files(tmp_path: Path):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher("t", "resnet10t", tmp_path / "nope.safetensors", TF)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(TeacherLoadError, match="cannot read teacher weights"):
        load_teacher("t", "resnet10t", bad, TF)


class Payload:
    def __reduce__(self):  # would run code on a plain pickle load
        return (print, ("pwned",))


def test_pickled_code_refused(tmp_path: Path, capsys):
    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(TeacherLoadError, match="cannot read teacher weights.*weights_only|cannot read teacher weights"):
        load_teacher("t", "resnet10t", tmp_path / "evil.pt", TF)
    assert "pwned" not in capsys.readouterr().out


def test_shape_mismatch(tmp_path: Path):
    m = timm.create_model("resnet10t", num_classes=0)
    sd = m.state_dict()
    sd["fc_dummy"] = torch.zeros(1)
    del sd["fc_dummy"]
    sd["conv1.0.weight"] = torch.zeros(24, 3, 5, 5)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"conv1.0.weight: file \(24, 3, 5, 5\)"):
        load_teacher("t", "resnet10t", tmp_path / "w.safetensors", TF)


def test_unknown_timm_name():
    with pytest.raises(ModelError, match=r"student.arch='resnet10tt' is not a timm architecture.*resnet10t"):
        build_backbone("resnet10tt")


def test_teacher_and_student_receive_identical_view(teachers_dir: Path, fmnist_small):
    """The teacher stage passes the very view it consumed through; the student reads that column."""
    spec = TeacherSpec("r10t", "resnet10t", str(teachers_dir / "fmnist_simclr_resnet10t.safetensors"), 64, TF.mean, TF.std)
    batch = {"sample_id": fmnist_small.sample_ids[:8], "label": fmnist_small.labels[:8], "image": fmnist_small.images[:8]}
    viewed = add_views(batch, epoch=3, seed=7, plan=ViewPlan(ViewSpec(64)))
    consumed: list[torch.Tensor] = []
    inf = TeacherInference(spec, threads=1, device="cpu")
    orig = inf.teacher.transform
    inf.teacher.transform = lambda v: (consumed.append(v.clone()), orig(v))[1]  # record what the teacher saw
    out = inf(dict(viewed))
    assert torch.equal(consumed[0], torch.from_numpy(viewed["view"]))
    assert out["view"] is viewed["view"]  # passed through untouched: the student trains on these bytes
    assert out["target_r10t"].dtype.name == "float16" and out["target_r10t"].shape == (8, 512)
    ref = inf.teacher(torch.from_numpy(viewed["view"])).numpy()
    assert abs(out["target_r10t"].astype("float32") - ref).max() < 1e-2
    assert (out["epoch"] == 3).all() and (out["sample_id"] == batch["sample_id"]).all()


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_cnn_and_vit_teachers_share_one_crop_each_with_its_own_transform(tmp_path: Path, teachers_dir: Path, fmnist_small):
    """A ViT teacher (DINO checkpoint layout, 48 px, ImageNet mean/std) beside the real CNN teacher (64 px,
    Fashion-MNIST mean/std): both read the same view column; each resizes and normalizes it its own way."""
    import timm

    from simreg.models import SimRegObjective, build_backbone

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=48).eval()
    dino = {"teacher": {**{f"backbone.{k}": v for k, v in vit.state_dict().items()}, "head.last_layer.weight": torch.zeros(8, 192)}, "epoch": 7}
    torch.save(dino, tmp_path / "dino_vit.pth")
    specs = [
        TeacherSpec("cnn", "resnet10t", str(teachers_dir / "fmnist_simclr_resnet10t.safetensors"), 64, TF.mean, TF.std),
        TeacherSpec("vit", "vit_tiny_patch16_224", str(tmp_path / "dino_vit.pth"), 48, *IMAGENET, model_kwargs={"img_size": 48}),
    ]
    batch = {"sample_id": fmnist_small.sample_ids[:8], "label": fmnist_small.labels[:8], "image": fmnist_small.images[:8]}
    out = add_views(batch, epoch=0, seed=0, plan=ViewPlan(ViewSpec(64)))
    for spec in specs:
        out = TeacherInference(spec, threads=1, device="cpu")(out)
    assert out["target_cnn"].shape == (8, 512) and out["target_vit"].shape == (8, 192)
    view = torch.from_numpy(out["view"])
    with torch.no_grad():
        ref = vit(InputTransform(48, *IMAGENET)(view))
    assert torch.allclose(torch.from_numpy(out["target_vit"]).float(), ref, atol=2e-2)
    obj = SimRegObjective(build_backbone("resnet10t"), InputTransform(32, TF.mean, TF.std), {"cnn": 512, "vit": 192})
    res = obj(view, {"cnn": torch.from_numpy(out["target_cnn"]), "vit": torch.from_numpy(out["target_vit"])})
    assert set(res) == {"loss", "loss/cnn", "loss/vit", "cos/cnn", "cos/vit"}
    torch.testing.assert_close(res["loss"], (res["loss/cnn"] + res["loss/vit"]) / 2)


def test_model_kwargs_rejected_by_timm_name_the_key():
    from simreg.models import build_backbone

    with pytest.raises(ModelError, match=r"teachers.1.model_kwargs=\{'img_szie': 48\} is not accepted by timm arch 'vit_tiny_patch16_224'"):
        build_backbone("vit_tiny_patch16_224", key="teachers.1.arch", model_kwargs={"img_szie": 48})
    with pytest.raises(ModelError, match=r"student.model_kwargs must not set num_classes"):
        build_backbone("resnet10t", model_kwargs={"num_classes": 10})
