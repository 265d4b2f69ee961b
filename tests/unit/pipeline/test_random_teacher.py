"""``teachers[i].weights=random`` / ``random:SEED``: a randomly initialised timm teacher, no file, its own cache identity."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from simreg.models import InputTransform, TeacherLoadError, load_teacher
from simreg.models.random_init import random_init_seed
from simreg.orchestrator.config import TeacherConfig, load_config
from simreg.orchestrator.pipeline.teacher import TeacherInference, teacher_fingerprint
from simreg.orchestrator.train.builders import teacher_specs

RANDOM = ["teachers.0.weights=random", "teachers.0.arch=test_resnet", "teachers.0.input_size=32"]
TF = InputTransform(32, (0.5,) * 3, (0.25,) * 3)


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_a_random_teacher_validates_and_builds_without_a_file():
    spec = teacher_specs(load_config(None, RANDOM))[0]
    assert spec.weights == "random:0" and spec.arch == "test_resnet"
    t = spec.build()
    assert t.feature_dim == 96  # test_resnet's pooled feature, at 16 and at 32 px
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    view = torch.rand(4, 3, 32, 32)
    out = t(view)
    assert out.shape == (4, 96) and torch.isfinite(out).all()
    assert torch.equal(spec.build()(view), out)  # a second build: the very same teacher
    assert load_teacher("t", "test_resnet", "random", InputTransform(16, (0.5,) * 3, (0.25,) * 3))(torch.rand(2, 1, 16, 16)).shape == (2, 96)


def test_seeds_give_other_weights_and_the_callers_random_state_is_kept():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    t0 = load_teacher("t", "test_resnet", "random:0", TF)
    assert torch.equal(torch.rand(3), expected)  # building a random teacher drew nothing from the caller's generator
    t1 = load_teacher("t", "test_resnet", "random:1", TF)
    view = torch.rand(2, 3, 32, 32)
    assert _state_digest(t0) != _state_digest(t1) and not torch.allclose(t0(view), t1(view))
    assert _state_digest(load_teacher("t", "test_resnet", "random", TF)) == _state_digest(t0)  # random = random:0


def test_the_same_weights_in_a_fresh_process():
    code = ("import hashlib, torch; from simreg.models import InputTransform, load_teacher; "
            "t = load_teacher('t', 'test_resnet', 'random:7', InputTransform(32, (0.5,) * 3, (0.25,) * 3)); h = hashlib.sha256()\n"
            "for k, v in sorted(t.state_dict().items()): h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())\n"
            "print(h.hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == _state_digest(load_teacher("t", "test_resnet", "random:7", TF))


def test_the_cache_identity_is_the_seed_and_the_versions():
    spec0 = teacher_specs(load_config(None, RANDOM))[0]
    spec7 = teacher_specs(load_config(None, [*RANDOM, "teachers.0.weights=random:7"]))[0]
    fp0, fp7 = teacher_fingerprint(spec0, False, True), teacher_fingerprint(spec7, False, True)
    torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert fp0["weights_init"] == f"random:0:timm-{timm.__version__}:torch-{torch_minor}" and "weights_sha256" not in fp0
    assert fp7["weights_init"].startswith("random:7:") and {**fp0, "weights_init": ""} == {**fp7, "weights_init": ""}
    inf = TeacherInference(spec7, threads=1, device="cpu")  # as an actor runs it: nothing stat'ed or hashed
    assert inf.fingerprint() == fp7


def test_file_teachers_keep_their_sha256_identity(tmp_path: Path):
    torch.manual_seed(0)
    path = tmp_path / "random"  # a file that happens to be named random
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    t = TeacherConfig(name="f", arch="test_resnet", weights=str(path))
    assert t.weights_ref() == str(path)
    fp = teacher_fingerprint(teacher_specs(load_config(None, [*RANDOM, f"teachers.0.weights={path}"]))[0], False, True)
    assert len(fp["weights_sha256"]) == 64 and "weights_init" not in fp
    assert load_teacher("f", "test_resnet", path, TF).feature_dim == 96  # a Path is a file, whatever its name
    assert TeacherConfig(name="f", arch="test_resnet", weights="./random").weights_ref() == str(Path("random").absolute())


def test_a_bad_seed_is_one_line_naming_the_key():
    from simreg.models.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, [*RANDOM, "teachers.0.weights=random:x"])
    lines = str(e.value).splitlines()
    assert lines[0] == "Found 1 error in the config (defaults):" and len(lines) == 2
    assert lines[1].startswith("  - teachers.0.weights: 'random:x' is not random:SEED") and "random:7" in lines[1]
    with pytest.raises(TeacherLoadError, match=r"^teachers.0.weights: 'random:-1' is not random:SEED"):
        load_teacher("t", "test_resnet", "random:-1", TF, key="teachers.0")
    assert [random_init_seed(w) for w in ("random", "random:007", "weights/random.pt", "randomized.pt")] == [0, 7, None, None]


def test_a_random_teacher_on_synthetic_data_through_prepare_and_eval():
    from simreg.orchestrator.evaluation.weights import evaluate_weights
    from simreg.orchestrator.train.prepare import prepare

    cfg = load_config(None, [*RANDOM, "data.source=synthetic", "data.synthetic.images=400", "data.synthetic.held_out=60",
                             "data.store_size=32", "data.view_size=32", "data.train_size=200", "data.knn_bank_size=100",
                             "data.knn_query_size=50", "eval.val_every=0", "student.arch=test_resnet"])
    prep = prepare(cfg, quiet=True)
    assert prep.teacher_dims == {"simclr_r10t": 96} and prep.train.streamed and len(prep.train) == 200
    assert prep.final_eval.bank.images.shape == (100, 32, 32, 3)
    res = evaluate_weights("random:0", "test_resnet", data="synthetic", input_size=32, view_size=32, bank_size=100, query_size=50,
                           threads=1)
    assert res["feature_dim"] == 96 and res["bank_images"] == 100 and 0.0 <= res["top1_20nn"] <= 100.0
