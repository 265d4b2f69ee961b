"""Bad input: one clear message naming the input and the fix, exit status 2, no traceback, no Ray start."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simreg.orchestrator.cli.main import main


def _run(capsys, *args: str) -> str:
    rc = main(["distill", "--output-dir", "/tmp/simreg-unit-never", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_unknown_config_key(capsys):
    err = _run(capsys, "heads.dept=2")
    assert "heads.dept: unknown key" in err and "'depth'" in err


def test_unknown_key_in_yaml(tmp_path: Path, capsys):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.1\n  nesterov: true\n")
    err = _run(capsys, "--config", str(tmp_path / "c.yaml"))
    assert "optim.nesterov: unknown key" in err and str(tmp_path / "c.yaml") in err


def test_missing_config_file(capsys):
    assert "does not exist" in _run(capsys, "--config", "/nonexistent/cfg.yaml")


def test_missing_data_folder(capsys):
    err = _run(capsys, "data.root=/nonexistent/fmnist")
    assert "data.root='/nonexistent/fmnist' does not exist" in err


def test_unknown_student_arch(capsys):
    err = _run(capsys, "student.arch=resnet10tt", "data.train_size=64")
    assert "student.arch='resnet10tt' is not a timm architecture" in err


def test_unknown_teacher_arch(capsys):
    err = _run(capsys, "teachers.0.arch=resnet5O")
    assert "teachers.0.arch='resnet5O'" in err


def test_teacher_file_with_wrong_keys(capsys, teachers_dir: Path):
    err = _run(capsys, f"teachers.0.weights={teachers_dir / 'fmnist_simclr_resnet50.safetensors'}")  # default arch: resnet10t
    assert "teachers.0.weights=" in err and "missing keys" in err and "unexpected keys" in err


def test_empty_image_folder(tmp_path: Path, capsys):
    (tmp_path / "cls_a").mkdir()
    err = _run(capsys, "data.source=image-folder", f"data.root={tmp_path}")
    assert "holds no images" in err and str(tmp_path) in err


def test_image_folder_needs_root(capsys):
    assert "data.source=image-folder needs data.root" in _run(capsys, "data.source=image-folder")


def test_override_syntax(capsys):
    assert "is not key=value" in _run(capsys, "heads.depth")


def test_console_script_exit_code_and_no_traceback():
    exe = Path(sys.executable).with_name("simreg")
    p = subprocess.run([str(exe), "distill", "train.epochs=0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "train.epochs: Input should be greater than or equal to 1 (got 0)" in p.stderr
    assert "Traceback" not in p.stderr


def test_batch_smaller_than_workers(capsys):
    err = _run(capsys, "train.batch_size=2", "scaling.num_workers=2")
    assert "fewer than 2 images per worker" in err


def test_overrides_may_follow_options(tmp_path: Path, capsys):
    """``key=value`` overrides before and after an option are all applied (argparse alone refuses the later ones)."""
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.1\n")
    assert main(["config", "train.epochs=3", "--config", str(tmp_path / "c.yaml"), "heads.depth=2"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "depth: 2" in out and "lr: 0.1" in out
    with pytest.raises(SystemExit) as e:  # argparse's own exit: usage and one line, status 2
        main(["config", "--config", str(tmp_path / "c.yaml"), "heads.depth=2", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
