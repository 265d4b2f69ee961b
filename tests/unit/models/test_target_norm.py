"""Per-teacher target normalisation (l2 | standardize | phi_s), the mse loss and UNIC's teacher dropping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from simreg.models import InputTransform
from simreg.models.loss import LOSSES, mse_per_image, simreg_loss
from simreg.models.step import SimRegObjective
from simreg.models.target_norm import (
    NoVariance,
    TargetNorm,
    equalizing_rotation,
    estimate_stats,
    hadamard,
    norm_map,
)


def _targets(d: int, n: int = 3000, seed: int = 0) -> np.ndarray:
    """Anisotropic, off-centre, correlated targets (like pooled ReLU features: a large common mean)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) * np.geomspace(4, 0.01, d)
    return rng.normal(size=(n, d)) @ a.T + 3 + np.abs(rng.normal(size=d))


def test_estimate_stats_matches_numpy():
    x = _targets(12)
    st = estimate_stats(x)
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-10)
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(st.eigvecs @ np.diag(st.eigvals) @ st.eigvecs.T, cov, atol=1e-8)
    assert np.all(np.diff(st.eigvals) <= 0)  # descending
    np.testing.assert_allclose(st.variances, np.diag(cov), rtol=1e-8)
    s = st.summary()
    assert s["mean_eigenvalue"] == pytest.approx(np.trace(cov) / 12) and 1 <= s["effective_rank"] <= 12


@pytest.mark.parametrize("d", [1, 7, 192, 320, 512])
def test_equalizing_rotation_spreads_the_eigenvalues_evenly(d):
    lam = np.sort(np.random.default_rng(d).exponential(size=d))[::-1]
    r = equalizing_rotation(lam)
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-12)  # orthogonal: invertible, rotation only
    np.testing.assert_allclose(np.diag(r @ np.diag(lam) @ r.T), np.full(d, lam.mean()), rtol=1e-9)


def test_hadamard_for_powers_of_two():
    h = hadamard(8)
    np.testing.assert_allclose(h @ h.T, np.eye(8), atol=1e-12)
    assert np.allclose(np.abs(h), 1 / np.sqrt(8))
    assert np.array_equal(equalizing_rotation(np.arange(8.0)[::-1]), h)  # the paper's choice where it exists
    with pytest.raises(ValueError, match="power of two"):
        hadamard(6)


@pytest.mark.parametrize("method", ["standardize", "phi_s"])
@pytest.mark.parametrize("d", [16, 24])
def test_normalised_targets_are_centred_with_unit_variance(method, d):
    x = _targets(d)
    m = norm_map(method, estimate_stats(x))
    y = TargetNorm(method, m)(torch.tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(y.var(0, ddof=1), 1, rtol=1e-3)
    if method == "phi_s":  # isotropic and invertible: the original targets come back
        np.testing.assert_allclose(y @ np.linalg.inv(m.w.astype(np.float64)).T + m.mu, x, rtol=1e-3, atol=1e-3)


def test_standardize_does_not_blow_up_a_dead_dimension_and_a_constant_teacher_is_refused():
    x = _targets(8)
    x[:, 3] = 0.5  # a dead ReLU channel: constant over the sample
    x[:5, 3] += 1e-4
    m = norm_map("standardize", estimate_stats(x))
    mean_var = estimate_stats(x).variances.mean()
    assert m.scale[3] == pytest.approx(1 / np.sqrt(1e-2 * mean_var), rel=1e-4)  # floored at 1% of the mean variance
    spike = x[:1].copy()
    spike[0, 3] = 10.0  # an image that lights the channel up: a large target, not 10^4 x larger
    assert np.abs(TargetNorm("standardize", m)(torch.tensor(spike, dtype=torch.float32)).numpy()).max() < 10 / np.sqrt(1e-2 * mean_var)
    with pytest.raises(NoVariance, match="do not vary"):
        norm_map("phi_s", estimate_stats(np.ones((10, 4))))


def test_eigenvector_signs_are_fixed():
    x = _targets(6)
    a, b = estimate_stats(x), estimate_stats(-x + 2 * x.mean(0))  # the same covariance
    np.testing.assert_allclose(a.eigvecs, b.eigvecs, atol=1e-8)
    assert np.all(a.eigvecs[np.abs(a.eigvecs).argmax(axis=0), np.arange(6)] > 0)


def test_l2_and_missing_statistics():
    x = torch.randn(5, 8) * 10
    assert torch.allclose(TargetNorm("l2")(x).norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="needs the teacher's target statistics"):
        TargetNorm("phi_s")(x)
    with pytest.raises(ValueError, match="unknown"):
        TargetNorm("whiten")
    with pytest.raises(ValueError, match="dimension 8, statistics of dimension 4"):
        TargetNorm("standardize", norm_map("standardize", estimate_stats(_targets(4))))(x)
    with pytest.raises(ValueError, match="given the map of 'phi_s'"):
        TargetNorm("standardize", norm_map("phi_s", estimate_stats(_targets(4))))


def test_mse_per_image_and_scalar_simreg():
    p, t = torch.zeros(3, 4), torch.ones(3, 4)
    assert torch.equal(mse_per_image(p, t), torch.ones(3)) and LOSSES["mse"] is mse_per_image
    assert LOSSES["simreg"](t, t).shape == (3,) and simreg_loss(t, t).ndim == 0


class _Flat(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _objective(**kw) -> SimRegObjective:
    torch.manual_seed(0)
    return SimRegObjective(_Flat(), InputTransform(4, (0.5,) * 3, (0.25,) * 3), {"a": 5, "b": 7}, depth=2, **kw)


def test_objective_regresses_the_normalised_target():
    ta, tb = torch.tensor(_targets(5, 64, 1), dtype=torch.float32), torch.tensor(_targets(7, 64, 2), dtype=torch.float32)
    maps = {"b": norm_map("phi_s", estimate_stats(tb.numpy()))}
    obj = _objective(loss="mse", normalize={"a": "l2", "b": "phi_s"}, target_maps=maps)
    view = torch.rand(64, 3, 4, 4)
    out = obj(view, {"a": ta, "b": tb})
    feat = obj.features(view)
    want_b = mse_per_image(obj.heads["b"](feat), TargetNorm("phi_s", maps["b"])(tb)).mean()
    want_a = mse_per_image(obj.heads["a"](feat), torch.nn.functional.normalize(ta, dim=1)).mean()
    assert out["loss/b"].item() == pytest.approx(want_b.item(), rel=1e-5)
    assert out["loss/a"].item() == pytest.approx(want_a.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * (want_a + want_b).item(), rel=1e-5)
    assert not any(k.startswith("norms") for k in obj.state_dict())  # maps are not checkpointed, nor DDP buffers
    assert not list(obj.norms.buffers())
    obj.to(torch.float64)  # .to() moves the map's tensors with the module (fp32 kept at use: the loss stays fp32)
    assert obj.norms["b"]._t["w"].dtype == torch.float64 and obj.norms["b"](tb).dtype == torch.float32


def test_teacher_drop_keeps_each_images_worst_teacher():
    obj = _objective(teacher_drop=0.5)
    view, tg = torch.rand(256, 3, 4, 4), {"a": torch.randn(256, 5), "b": torch.randn(256, 7)}
    torch.manual_seed(1)
    out = obj(view, tg)
    torch.manual_seed(1)
    keep = torch.rand(2, 256) >= 0.5  # the draw the objective made (its only random numbers)
    per = torch.stack([LOSSES["simreg"](obj.heads[n](obj.features(view)), tg[n]) for n in ("a", "b")])
    keep[per.argmax(dim=0), torch.arange(256)] = True  # each image's worst teacher is never dropped
    assert out["loss"].item() == pytest.approx((0.5 * per * keep).sum(0).mean().item(), rel=1e-5)
    assert out["kept/a"].item() == pytest.approx(keep[0].float().mean().item())
    assert 0.6 < out["kept/a"].item() < 0.9 and 0.6 < out["kept/b"].item() < 0.9  # 1/2 worst + 1/2 x 1/2 kept
    obj.eval()  # evaluation: no dropping
    out = obj(view, tg)
    assert "kept/a" not in out and out["loss"].item() == pytest.approx(0.5 * (out["loss/a"] + out["loss/b"]).item(), rel=1e-6)


def test_teacher_drop_off_and_bounds():
    obj = _objective(teacher_drop=0.0)
    out = obj(torch.rand(8, 3, 4, 4), {"a": torch.randn(8, 5), "b": torch.randn(8, 7)})
    assert "kept/a" not in out
    with pytest.raises(ValueError, match="teacher_drop"):
        _objective(teacher_drop=1.0)
