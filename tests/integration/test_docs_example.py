"""The Python API example of docs/python-api.md, run verbatim in a fresh interpreter (its own Ray cluster)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def test_python_api_example_runs(tmp_path: Path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/python-api.md holds one runnable python example"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "SIMREG_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=840)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(re.findall(r"^(student|eval) 20-NN: ([\d.]+)$", r.stdout, re.M))
    assert set(got) == {"student", "eval"}, r.stdout
    assert 10.0 < float(got["student"]) <= 100.0 and 10.0 < float(got["eval"]) <= 100.0
    assert not (tmp_path / "mlruns").exists()  # the run's store lives in its own folder
