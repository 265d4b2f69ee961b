"""`simreg --version`, and which value a sweep's base config takes: the command line's own `key=value` over the
space's `base` (the sweep itself replaced by a recorder: no Ray)."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from simreg.orchestrator.cli.main import main


def test_version_names_the_package_and_what_it_runs_on():
    exe = str(Path(sys.executable).with_name("simreg"))
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    line = r.stdout.strip()
    assert line.startswith(f"simreg {version('simreg')} (torch {version('torch')}, ")
    for name in ("torchvision", "timm", "ray", "mlflow", "pyarrow"):
        assert f"{name} {version(name)}" in line
    assert re.search(r"; Python 3\.\d+\.\d+\)$", line)


@pytest.fixture
def recorded(monkeypatch) -> dict[str, Any]:
    """``simreg sweep`` up to the sweep: the base tree the trials would get, from the real space check."""
    from simreg.orchestrator.tune import sweep as sweep_module
    from simreg.orchestrator.tune.space import check_space

    seen: dict[str, Any] = {}

    def record(cfg: Any, space: Any, source: str, out: Any, **kwargs: Any) -> dict[str, Any]:
        import json

        seen["tree"] = check_space(space, json.loads(cfg.model_dump_json()), source, kwargs.get("command_line"))
        return {"trials": [], "output_dir": str(out), "mlflow_tracking_uri": "sqlite:///x.db", "parent_run_id": "0"}

    monkeypatch.setattr(sweep_module, "sweep", record)
    return seen


def test_a_command_line_key_wins_over_the_space_base(recorded, tmp_path, caplog):
    """The smoke space's base sets data.train_size=2048; the user's own value is the one a trial gets."""
    caplog.set_level(logging.INFO, logger="simreg")
    assert main(["sweep", "--space", "smoke", "--output-dir", str(tmp_path / "s"), "data.train_size=4096"]) == 0
    assert recorded["tree"]["data"]["train_size"] == 4096
    assert "the command line sets data.train_size=4096, over the space's base" in caplog.text


def test_without_a_command_line_key_the_space_base_applies(recorded, tmp_path):
    assert main(["sweep", "--space", "smoke", "--output-dir", str(tmp_path / "s")]) == 0
    assert recorded["tree"]["data"]["train_size"] == 2048


def test_compare_with_a_tracking_server_that_is_not_there_is_one_line(capsys):
    """Nothing listens on the port: one line at once, not MLflow's minutes of urllib3 retries."""
    assert main(["compare", "0123abcd", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Retrying" not in err
    assert err.startswith("simreg: error: MLflow tracking server http://127.0.0.1:9 does not answer ([Errno 111] Connection refused)")
