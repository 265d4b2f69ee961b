"""Augmentation modes (the paper's Table 7 grid), the strength knob, head prefixes and k-NN weighting."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from simreg.models import ConfigError, ModelError, SimRegObjective, build_backbone, build_head, head_prefix
from simreg.models.teachers import InputTransform
from simreg.orchestrator.config import load_config
from simreg.orchestrator.data.views import ViewSpec, add_views, draw_view, eval_views, make_views, preset_spec
from simreg.orchestrator.evaluation.knn import knn_top1
from simreg.orchestrator.train.builders import view_plan

TABLE7 = [("same", "weak", "weak"), ("same", "strong", "strong"), ("different", "weak", "weak"),
          ("different", "weak", "strong"), ("different", "strong", "strong")]


def _rgb(images: np.ndarray) -> np.ndarray:
    """Real Fashion-MNIST images tinted differently per channel: (B, H, W, 3) uint8."""
    x = images.astype(np.float32)
    return np.stack([x, 0.6 * x + 40, 0.3 * x + 90], axis=-1).clip(0, 255).astype(np.uint8)


def test_presets_are_the_papers_and_strength_scales_them():
    weak, strong = preset_spec("weak"), preset_spec("strong")
    assert weak == ViewSpec(64) and not weak.photometric  # crop (0.2, 1) + flip, nothing else
    assert strong.scale == (0.2, 1.0) and strong.jitter == (0.4, 0.4, 0.4, 0.1)
    assert (strong.jitter_p, strong.gray_p, strong.blur_p) == (0.8, 0.2, 0.5)  # MoCo-v2
    half = preset_spec("strong", strength=0.5)
    assert half.scale[0] == pytest.approx(0.6) and half.jitter[0] == pytest.approx(0.2) and half.jitter_p == pytest.approx(0.4)
    none = preset_spec("strong", strength=0.0)
    assert none.scale == (1.0, 1.0) and not none.photometric
    assert preset_spec("weak", strength=1.2).scale[0] == pytest.approx(0.04)


def test_strong_view_draw_frequencies_and_shared_geometry():
    strong, weak = preset_spec("strong"), preset_spec("weak")
    draws = [draw_view(0, e, 5, 28, 28, strong) for e in range(2000)]
    assert 0.76 < np.mean([d.jitter_factors is not None for d in draws]) < 0.84
    assert 0.17 < np.mean([d.gray for d in draws]) < 0.23
    assert 0.46 < np.mean([d.blur_sigma is not None for d in draws]) < 0.54
    b = [d.jitter_factors[0] for d in draws if d.jitter_factors is not None]
    assert 0.6 <= min(b) < 0.65 and 1.35 < max(b) <= 1.4
    # crop and flip come first from the same generator: a weak and a strong view of a sample share them
    for e in range(20):
        s, w = draw_view(0, e, 5, 28, 28, strong), draw_view(0, e, 5, 28, 28, weak)
        assert (s.top, s.left, s.height, s.width, s.flip) == (w.top, w.left, w.height, w.width, w.flip)


def test_photometric_ops_follow_torchvision(fmnist_small):
    rgb = _rgb(fmnist_small.images[:6])
    ids = fmnist_small.sample_ids[:6]
    geo = ViewSpec(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0)
    base = torch.from_numpy(make_views(rgb, ids, 0, 0, geo))
    bright = ViewSpec(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter=(0.4, 0, 0, 0), jitter_p=1.0)
    v = torch.from_numpy(make_views(rgb, ids, 0, 0, bright))
    for i, sid in enumerate(ids.tolist()):
        f = draw_view(0, 0, sid, 28, 28, bright).jitter_factors[0]
        torch.testing.assert_close(v[i], (base[i] * f).clamp(0, 1))
    gray = torch.from_numpy(make_views(rgb, ids, 0, 0, ViewSpec(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, gray_p=1.0)))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    # sigma is given at 224 px and scaled with the view: (7, 7) at 224 px is sigma 2 at 64 px
    blurred = ViewSpec(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, blur_p=1.0, blur_sigma=(7.0, 7.0))
    assert draw_view(0, 0, 1, 28, 28, blurred).blur_sigma == pytest.approx(2.0)
    blur = torch.from_numpy(make_views(rgb, ids, 0, 0, blurred))
    tv = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert tv(blur) < 0.8 * tv(base)
    assert abs(float(blur.mean() - base.mean())) < 0.01
    # On one-channel images saturation and hue change nothing (torchvision's rule)
    sat = ViewSpec(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter=(0, 0, 0.4, 0.1), jitter_p=1.0)
    one = make_views(fmnist_small.images[:6], ids, 0, 0, sat)
    np.testing.assert_allclose(one, eval_views(fmnist_small.images[:6], 64), atol=1e-6)


def test_strength_zero_is_the_whole_image(fmnist_small):
    spec = preset_spec("strong", strength=0.0)
    v = make_views(fmnist_small.images[:8], fmnist_small.sample_ids[:8], 3, 0, spec)
    ref = eval_views(fmnist_small.images[:8], 64)
    for i in range(8):  # the flip is kept at strength 0
        assert np.allclose(v[i], ref[i], atol=1e-6) or np.allclose(v[i], ref[i][..., ::-1], atol=1e-6)


@pytest.mark.parametrize("mode,teacher,student", TABLE7)
def test_table7_rows_render_the_right_views(mode, teacher, student, fmnist_small):
    cfg = load_config(None, [f"augment.mode={mode}", f"augment.teacher={teacher}", f"augment.student={student}"])
    plan = view_plan(cfg)
    rgb = _rgb(fmnist_small.images[:8])
    batch = {"sample_id": fmnist_small.sample_ids[:8], "label": fmnist_small.labels[:8], "image": rgb}
    out = add_views(batch, epoch=1, seed=0, plan=plan)
    assert plan.teacher.photometric == (teacher == "strong")
    if mode == "same":
        assert plan.student is None and plan.student_key == "view" and "student_view" not in out
    else:
        assert plan.student is not None and plan.student.photometric == (student == "strong")
        assert plan.student_key == "student_view" and out["student_view"].shape == out["view"].shape
        assert not np.allclose(out["student_view"], out["view"])  # an independent draw (stream 1)
        again = add_views(batch, epoch=1, seed=0, plan=plan)
        np.testing.assert_array_equal(again["student_view"], out["student_view"])


def test_same_mode_refuses_different_presets():
    with pytest.raises(ConfigError, match=r"augment.mode=same.*augment.teacher=weak.*augment.student=strong.*augment.mode=different"):
        load_config(None, ["augment.student=strong"])
    with pytest.raises(ConfigError, match=r"augment.strength"):
        load_config(None, ["augment.strength=2"])


def test_head_prefix_layers_and_objective_head_features():
    head = build_head(8, 5, depth=4, width_mult=2.0)  # widths 8, 16, 8, 16, 5
    x = torch.randn(6, 8)
    assert [head_prefix(head, k)(x).shape[1] for k in range(5)] == [8, 16, 8, 16, 5]
    head.eval()
    torch.testing.assert_close(head_prefix(head, 4)(x), head(x))
    assert isinstance(head_prefix(head, 1)[-1], torch.nn.ReLU)  # a layer ends after its BN + ReLU
    with pytest.raises(ModelError, match=r"depth 4 has no prefix of 5 layers"):
        head_prefix(head, 5)
    obj = SimRegObjective(build_backbone("resnet10t"), InputTransform(32, (0.5,) * 3, (0.25,) * 3), {"t": 7}).eval()
    view = torch.rand(3, 1, 64, 64)
    torch.testing.assert_close(obj.head_features(view, "t", 0), obj.features(view))
    assert obj.head_features(view, "t", 2).shape == (3, obj.student_dim)


def test_head_layers_must_exist():
    with pytest.raises(ConfigError, match=r"eval.head_layers=\[2, 5\] has \[5\] outside 1..heads.depth=4"):
        load_config(None, ["eval.head_layers=[2, 5]"])
    assert load_config(None, ["heads.depth=2", "eval.head_layers=[1, 2]"]).eval.head_layers == (1, 2)


def test_knn_temperature_weighting_differs_from_majority():
    # Query at angle 0; two class-1 neighbours nearly orthogonal, one class-0 neighbour very close.
    bank = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q, ql = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_top1(bank, labels, q, ql, ks=(3,))[3] == 0.0  # majority: class 1 wins 2 votes to 1
    assert knn_top1(bank, labels, q, ql, ks=(3,), weighting="temperature")[3] == 100.0
    with pytest.raises(ValueError, match="weighting 'soft' is unknown"):
        knn_top1(bank, labels, q, ql, weighting="soft")
