from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # tests start throw-away local clusters

REPO = Path(__file__).resolve().parents[1]
SHARED_TEACHERS = Path(os.environ.get("SIMREG_SHARED_TEACHERS", REPO.parent / "shared" / "teachers"))
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session", autouse=True)
def _own_target_cache(tmp_path_factory):
    """The target cache is on by default: tests get a cache folder of their own, never the user's."""
    before = os.environ.get("SIMREG_CACHE_DIR")
    os.environ["SIMREG_CACHE_DIR"] = str(tmp_path_factory.mktemp("target-cache"))
    yield
    if before is None:
        os.environ.pop("SIMREG_CACHE_DIR", None)
    else:
        os.environ["SIMREG_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def teachers_dir() -> Path:
    if not (SHARED_TEACHERS / "fmnist_simclr_resnet10t.safetensors").is_file():
        pytest.fail(f"real teachers not found in {SHARED_TEACHERS}: set SIMREG_SHARED_TEACHERS to ../shared/teachers")
    return SHARED_TEACHERS


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST missing in {FMNIST}: run `apt-get install -y dataset-fashion-mnist`")
    return FMNIST


@pytest.fixture(scope="session")
def fmnist_small(fmnist_root: Path):
    from simreg.orchestrator.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(fmnist_root, "test").subset(64, 0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
