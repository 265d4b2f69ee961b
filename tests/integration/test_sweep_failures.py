"""A real sweep on a local Ray cluster whose every trial fails at its start (an unknown student architecture,
which only a trial builds): ``simreg sweep`` exits 1 with one line naming the first trial's error file and
MLflow run, the parent run ends FAILED. Its tracking URI carries a secret (a query parameter the sqlite
store ignores): no file of the sweep folder (Tune's pickled experiment state included) and no line of the
output holds it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

SECRET = "s3cr3t-tok"
SPACE = """\
description: every trial fails at its start
search: {algorithm: grid, metric: val/top1_20nn, mode: max}
base: {data.train_size: 256, data.knn_bank_size: 128, data.knn_query_size: 64, train.epochs: 1,
       eval.val_bank_size: 128, eval.val_query_size: 64}
params:
  student.arch: {grid: [no_such_arch_a, no_such_arch_b]}
"""


def test_all_failed_sweep_exits_1_and_keeps_the_uri_secret(tmp_path: Path, teachers_dir):
    from mlflow.tracking import MlflowClient

    (tmp_path / "space.yaml").write_text(SPACE)
    out = tmp_path / "sweep"
    uri = f"sqlite:///{out / 'mlflow.db'}?token={SECRET}"
    exe = str(Path(sys.executable).with_name("simreg"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([exe, "sweep", "--space", str(tmp_path / "space.yaml"), "--output-dir", str(out), "--tracking-uri", uri,
                        "ray.num_cpus=2"], capture_output=True, text=True, env=env, timeout=500)
    output = r.stdout + r.stderr
    assert r.returncode == 1, output[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("simreg: error:")]
    assert len(line) == 1, output[-3000:]
    m = re.search(r"all 2 trials of the sweep in (\S+) failed; the first, trial (\w+): .*no_such_arch_a.* \(traceback in (.+), "
                  r"MLflow run (\w+)\)$", line[0])
    assert m and m.group(1) == str(out), line[0]
    assert "is not a timm architecture" in Path(m.group(3)).read_text()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert parent.info.status == "FAILED"
    child = client.get_run(m.group(4))
    assert child.info.status == "FAILED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert json.loads((out / "sweep_summary.json").read_text())["failed_trials"] == 2

    assert SECRET not in output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".pkl") for p in files) and any(p.name.startswith("experiment_state") for p in files)
    assert [str(p) for p in files if SECRET.encode() in p.read_bytes()] == []
