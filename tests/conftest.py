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


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> str:
    """A real S3 API on 127.0.0.1 (moto's standalone server) with the bucket ``simreg-test``; the standard AWS
    variables point at it for the rest of the session (Ray processes started later inherit them)."""
    from tests.services import S3_ENV, make_bucket, moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        before = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
        make_bucket(endpoint, "simreg-test")
        yield endpoint
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server_url(s3, tmp_path_factory) -> str:
    """A real ``mlflow server`` (sqlite store) proxying artifacts to ``s3://simreg-test/mlflow``."""
    from tests.services import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3, "s3://simreg-test/mlflow") as url:
        yield url
