"""Per-teacher normalisation of the regression targets (``teachers[i].normalize``).

Teachers of different objectives give features of different scales, means and spectra; regressed as they are,
one teacher can dominate the loss. Each teacher's target ``x`` (B, d) is mapped before the loss:

- ``l2``: ``x / |x|``, SimReg's own (the ``simreg`` loss l2-normalises the target anyway).
- ``standardize``: ``(x - mu) / sigma`` per dimension (UNIC's per-dimension standardisation, with statistics
  estimated once instead of an EMA).
- ``phi_s``: PHI-S (Ranzinger et al. 2024): ``(1 / sqrt(mean eigenvalue)) * R U^T (x - mu)``, U the eigenvectors
  of the targets' covariance and R an orthogonal matrix that spreads the eigenvalues evenly over the dimensions:
  the normalised Hadamard matrix where d is a power of two (the paper's), else a product of d - 1 Givens
  rotations with the same effect (every diagonal entry of the rotated covariance equals the mean eigenvalue,
  the Schur-Horn construction). Every dimension then has unit variance; the map is invertible.

``mu`` and the covariance are estimated once per teacher and data (``TargetStats``); the driver turns them into
the float32 map (``NormMap``) the workers apply (``orchestrator/train/target_stats.py``). Under a cosine loss
(``train.loss=simreg``) the rotation and the global scale of ``phi_s`` do not change the loss: what remains is
the centring; regress ``phi_s`` or ``standardize`` targets with ``train.loss=mse`` as the papers do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NORMALIZATIONS = ("l2", "standardize", "phi_s")
NEEDS_STATS = ("standardize", "phi_s")


@dataclass(frozen=True, eq=False)
class TargetStats:
    """Mean (d,), covariance eigenvalues (d,, descending) and eigenvectors (d, d: columns) of one teacher's targets."""

    mean: np.ndarray
    eigvals: np.ndarray
    eigvecs: np.ndarray
    images: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def variances(self) -> np.ndarray:
        """The per-dimension variances (the covariance's diagonal)."""
        return np.einsum("ij,j,ij->i", self.eigvecs, self.eigvals, self.eigvecs)

    def summary(self) -> dict[str, float]:
        """Figures to log: the mean eigenvalue, the effective rank (exp of the eigenvalues' entropy), the
        share of the variance in the top eigenvalue, the mean's norm."""
        lam = np.clip(self.eigvals, 0, None)
        total = float(lam.sum())
        p = lam / total if total > 0 else np.full_like(lam, 1.0 / len(lam))
        nz = p[p > 0]
        return {
            "mean_eigenvalue": total / len(lam),
            "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())),
            "top_eigenvalue_share": float(p[0]) if len(p) else 0.0,
            "mean_norm": float(np.linalg.norm(self.mean)),
            "images": float(self.images),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "eigvals": self.eigvals, "eigvecs": self.eigvecs, "images": np.array([self.images])}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> TargetStats:
        return cls(np.asarray(a["mean"], np.float64), np.asarray(a["eigvals"], np.float64), np.asarray(a["eigvecs"], np.float64),
                   int(np.asarray(a["images"]).reshape(-1)[0]))


def estimate_stats(targets: np.ndarray | torch.Tensor) -> TargetStats:
    """Mean and covariance eigendecomposition of (N, d) targets, in float64."""
    x = torch.as_tensor(targets).to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"target statistics need (N >= 2, d) targets, got {tuple(x.shape)}")
    mu = x.mean(dim=0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    lam, vec = torch.linalg.eigh(cov)  # ascending
    lam, vec = lam.flip(0).clamp(min=0.0), vec.flip(1)
    # an eigenvector's sign is the LAPACK build's choice: fix it (largest entry positive), the same map everywhere
    sign = torch.sign(vec.gather(0, vec.abs().argmax(dim=0, keepdim=True)))
    vec = vec * torch.where(sign == 0, 1.0, sign)
    return TargetStats(mu.numpy(), lam.numpy(), vec.numpy(), int(x.shape[0]))


def hadamard(d: int) -> np.ndarray:
    """The normalised Sylvester Hadamard matrix (d a power of two): orthogonal, every entry +-1/sqrt(d)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, not {d}")
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(d)


def equalizing_rotation(eigvals: np.ndarray) -> np.ndarray:
    """An orthogonal R (d, d) with diag(R diag(eigvals) R^T) = mean(eigvals) everywhere.

    The Hadamard matrix where d is a power of two. Otherwise d - 1 Givens rotations (the constructive proof of the
    Schur-Horn theorem): pair an entry above the mean with one below it, rotate their plane so that the first
    becomes the mean exactly, and carry the remainder in the second; a finished entry is never touched again."""
    lam = np.asarray(eigvals, np.float64)
    d = len(lam)
    if d & (d - 1) == 0:
        return hadamard(d)
    m = float(lam.mean())
    diag = lam.copy()
    r = np.eye(d)
    todo = list(range(d))
    while len(todo) > 1:
        hi = max(todo, key=lambda i: diag[i])
        lo = min(todo, key=lambda i: diag[i])
        a, b = diag[hi], diag[lo]
        if a - b <= 1e-12 * max(abs(m), 1e-30):
            break
        # rotate the (hi, lo) plane: new diag[hi] = c^2 a + s^2 b = m  ->  c^2 = (m - b) / (a - b)
        c2 = min(max((m - b) / (a - b), 0.0), 1.0)
        c, s = math.sqrt(c2), math.sqrt(1.0 - c2)
        row_hi, row_lo = r[hi].copy(), r[lo].copy()
        r[hi] = c * row_hi + s * row_lo
        r[lo] = -s * row_hi + c * row_lo
        diag[hi], diag[lo] = m, a + b - m
        todo.remove(hi)
    return r


VAR_FLOOR = 1e-2  # standardize: a dimension's variance is floored at this share of the mean variance


class NoVariance(ValueError):
    """The targets do not vary: no normalisation that divides by their spread applies."""


@dataclass(frozen=True, eq=False)
class NormMap:
    """A teacher's target map, float32: ``y = (x - mu) * scale`` (standardize) or ``y = (x - mu) @ w.T`` (phi_s).
    Computed once on the driver from the statistics, shipped to the workers and kept in the run folder."""

    method: str
    mu: np.ndarray
    scale: np.ndarray | None = None
    w: np.ndarray | None = None

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = {f"{prefix}mu": self.mu}
        if self.scale is not None:
            out[f"{prefix}scale"] = self.scale
        if self.w is not None:
            out[f"{prefix}w"] = self.w
        return out


def norm_map(method: str, stats: TargetStats) -> NormMap:
    """The map of ``standardize`` or ``phi_s`` from a teacher's statistics; ``NoVariance`` when the targets are constant."""
    mean_var = float(np.clip(stats.eigvals, 0, None).mean())
    if not mean_var > 0:
        raise NoVariance(f"{method}: the teacher's targets do not vary (every eigenvalue is 0)")
    mu = stats.mean.astype(np.float32)
    if method == "standardize":
        var = np.maximum(stats.variances, VAR_FLOOR * mean_var)  # a (nearly) dead dimension is not blown up
        return NormMap(method, mu, scale=(1.0 / np.sqrt(var)).astype(np.float32))
    if method == "phi_s":
        w = equalizing_rotation(stats.eigvals) @ stats.eigvecs.T / np.sqrt(mean_var)
        return NormMap(method, mu, w=w.astype(np.float32))
    raise ValueError(f"normalisation {method!r} takes no statistics")


class TargetNorm(nn.Module):
    """One teacher's target map. Its tensors are plain attributes, not buffers: the same on every rank (no DDP
    broadcast), from the run's map and not from a checkpoint; ``.to()`` moves them (``_apply``). Without a map a
    ``standardize``/``phi_s`` norm can be built (an objective only evaluated) but raises when called. Computed in
    fp32, outside autocast: the loss stays fp32."""

    def __init__(self, method: str, nmap: NormMap | None = None) -> None:
        super().__init__()
        if method not in NORMALIZATIONS:
            raise ValueError(f"target normalisation {method!r} is unknown: use one of {list(NORMALIZATIONS)}")
        if nmap is not None and nmap.method != method:
            raise ValueError(f"target normalisation {method!r} given the map of {nmap.method!r}")
        self.method = method
        self._t: dict[str, torch.Tensor] = {}
        if nmap is not None and method in NEEDS_STATS:
            self._t = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in nmap.arrays().items()}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def, override]
        self._t = {k: fn(v) for k, v in self._t.items()}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.method == "l2":
                return F.normalize(x, dim=1)
            if not self._t:
                raise ValueError(f"target normalisation {self.method!r} needs the teacher's target statistics (build_objective's target_maps)")
            t = {k: v.to(device=x.device, dtype=torch.float32) for k, v in self._t.items()}  # no-op once .to() moved them
            if x.shape[1] != t["mu"].shape[0]:
                raise ValueError(f"{self.method}: targets of dimension {x.shape[1]}, statistics of dimension {t['mu'].shape[0]}")
            xc = x - t["mu"]
            return xc * t["scale"] if "scale" in t else xc @ t["w"].T

    def extra_repr(self) -> str:
        return self.method
