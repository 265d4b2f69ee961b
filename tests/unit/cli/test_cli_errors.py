"""Bad input: one clear message naming the input and the fix, exit status 2, no traceback, no Ray start."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simreg.models.errors import DataError
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


# ---------------------------------------------------------------- every user-caused error: one line, its exit status


def _one_line(capsys, argv: list[str], status: int) -> str:
    """Run the command: its exit status, stderr exactly one line without a traceback; then with --debug: the traceback."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert main([*argv, "--debug"]) == status
    debug = capsys.readouterr().err
    assert "Traceback (most recent call last)" in debug and debug.endswith(err), debug
    return err


def _argparse_line(capsys, argv: list[str]) -> str:
    """An argument argparse refuses: exit status 2, one line naming the command's --help."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _weights(teachers_dir: Path) -> list[str]:
    return ["--weights", str(teachers_dir / "fmnist_simclr_resnet10t.safetensors"), "--arch", "resnet10t", "--input-size", "32"]


def _folder(root: Path, per_class: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)).save(root / c / f"{i}.png")
    return root


def test_non_utf8_yaml_config(tmp_path: Path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    err = _one_line(capsys, ["config", "--config", str(tmp_path / "latin1.yaml")], 2)
    assert "latin1.yaml' is not UTF-8 text" in err and "offset 9" in err and "save it as UTF-8" in err


def test_yaml_syntax_error_is_one_line(tmp_path: Path, capsys):
    (tmp_path / "c.yaml").write_text("train: [1\nheads: 2\n")
    err = _one_line(capsys, ["config", "--config", str(tmp_path / "c.yaml")], 2)
    assert "is not valid YAML: expected ',' or ']'" in err and "(line 2, column" in err


def test_output_dir_is_a_file(tmp_path: Path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    err = _one_line(capsys, ["distill", "--output-dir", str(tmp_path / "taken")], 2)
    assert f"--output-dir '{tmp_path / 'taken'}' is a file: pass a folder" in err
    err = _one_line(capsys, ["sweep", "--space", "smoke", "--output-dir", str(tmp_path / "taken" / "sub")], 2)
    assert "lies below the file" in err


@pytest.mark.parametrize("flag", ["--bank-size", "--query-size", "--input-size", "--linear-epochs"])
def test_eval_count_of_zero_is_refused_at_the_argument(flag: str, capsys):
    err = _argparse_line(capsys, ["eval", "--weights", "w", "--arch", "resnet10t", flag, "0"])
    assert err == f"simreg eval: error: argument {flag}: must be >= 1 (got 0) (see simreg eval --help)\n"


def test_eval_input_size_zero_and_bad_temperature(capsys):
    assert "argument --input-size: must be >= 1 (got 0)" in _argparse_line(capsys, ["eval", "--weights", "w", "--arch", "x", "--input-size", "0"])
    assert "argument --knn-temperature: must be > 0 (got -1)" in _argparse_line(
        capsys, ["eval", "--weights", "w", "--arch", "x", "--knn-temperature", "-1"])
    assert "argument --input-size: 'big' is not a whole number" in _argparse_line(
        capsys, ["eval", "--weights", "w", "--arch", "x", "--input-size", "big"])


@pytest.mark.parametrize("content, words", [
    (b"", "is empty or cut short in its header (0 bytes)"),
    (bytes([0, 0, 8, 3]) + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2, "holds no items (a header of 16 bytes only)"),
])
def test_empty_idx_files(content: bytes, words: str, tmp_path: Path, teachers_dir: Path, capsys):
    fm = tmp_path / "fmnist"
    fm.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (fm / name).write_bytes(content)
    err = _one_line(capsys, ["eval", *_weights(teachers_dir), "--data", str(fm)], 2)
    assert f"IDX file '{fm / 'train-images-idx3-ubyte'}' {words}: re-download it" in err


def test_eval_output_on_a_full_disk_prints_the_result_first(tmp_path: Path, monkeypatch, capsys):
    import errno
    import json

    from simreg.orchestrator.evaluation import weights

    result = {"top1_1nn": 81.5, "top1_20nn": 84.0, "bank_images": 600}
    monkeypatch.setattr(weights, "evaluate_weights", lambda *a, **k: dict(result))
    out = tmp_path / "r.json"
    stdout_at_write: list[str] = []
    real_write = Path.write_text

    def full_disk(self: Path, *a, **k):
        if self == out:
            stdout_at_write.append(sys.stdout.getvalue())
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    argv = ["eval", "--weights", "w.safetensors", "--arch", "resnet10t", "--output", str(out)]
    assert main(argv) == 1
    got = capsys.readouterr()
    assert json.loads(stdout_at_write[0]) == result  # on stdout before the write was tried
    assert json.loads(got.out) == result
    assert got.err.count("\n") == 1 and "Traceback" not in got.err
    assert got.err.startswith(f"simreg: error: cannot write --output '{out}': no space left on the device")
    assert "(the result is printed above)" in got.err
    assert main([*argv, "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def _ray_wrapped(inner: BaseException) -> BaseException:
    """What ``trainer.fit()`` / Tune hand the driver when a worker raised ``inner`` (Ray's own classes, no cluster)."""
    from ray.exceptions import RayTaskError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError
    from ray.tune.error import TuneError

    tb = "Traceback (most recent call last):\n  File \"worker.py\", line 1, in train_loop\n" + repr(inner)
    group = WorkerGroupError(f"[Rank 0]\n{tb}", {0: UserExceptionWithTraceback(inner, tb)})
    task = RayTaskError("train_fn", tb, group, proctitle="ray::train", pid=1, ip="127.0.0.1").as_instanceof_cause()
    try:
        raise TuneError("Trial trial_0 errored") from task
    except TuneError as e:
        return e


def _distill_raises(monkeypatch, error: BaseException) -> None:
    from simreg.orchestrator import api

    def distill(*_a, **_k):
        raise error

    monkeypatch.setattr(api, "distill", distill)


def test_ray_wrapped_simreg_error_prints_the_original_line(tmp_path: Path, monkeypatch, capsys):
    from simreg.models.errors import SimRegError

    msg = "the training loss became nan at epoch 2, step 7 of 20: lower optim.lr"
    _distill_raises(monkeypatch, _ray_wrapped(SimRegError(msg)))
    assert _one_line(capsys, ["distill", "--output-dir", str(tmp_path / "run")], 1) == f"simreg: error: {msg}\n"
    bad = "image folder '/x' holds no images"
    _distill_raises(monkeypatch, _ray_wrapped(DataError(bad)))  # bad input, though raised in a worker
    assert _one_line(capsys, ["distill", "--output-dir", str(tmp_path / "run")], 2) == f"simreg: error: {bad}\n"


def test_ray_wrapped_unexpected_error_is_a_training_failure(tmp_path: Path, monkeypatch, capsys):
    _distill_raises(monkeypatch, _ray_wrapped(RuntimeError("CUDA error: an illegal memory access\nmore lines")))
    err = _one_line(capsys, ["distill", "--output-dir", str(tmp_path / "run")], 1)
    assert err.startswith("simreg: error: training failed in Ray: RuntimeError: CUDA error: an illegal memory access (")
    assert "--debug" in err and "/tmp/ray/session_latest/logs" in err


def test_mlflow_error_names_the_redacted_uri(tmp_path: Path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    uri = "http://bob:hunter2@127.0.0.1:9"
    _distill_raises(monkeypatch, MlflowException(
        f"API request to {uri}/api/2.0/mlflow/runs/create failed with exception HTTPConnectionPool(host='127.0.0.1', "
        "port=9): Max retries exceeded\nCaused by NewConnectionError"))
    argv = ["distill", "--output-dir", str(tmp_path / "run"), "--tracking-uri", uri]
    err = _one_line(capsys, argv, 1)  # a server that does not answer: a failure
    assert err.startswith("simreg: error: MLflow tracking at http://bob:***@127.0.0.1:9 failed (INTERNAL_ERROR: API request to http://bob:***@")
    assert "mlflow server --host" in err and "--tracking-uri" in err
    assert main([*argv, "--debug"]) == 1 and "hunter2" not in capsys.readouterr().err  # nor in the traceback
    _distill_raises(monkeypatch, MlflowException("unsupported URI", error_code=INVALID_PARAMETER_VALUE))
    err = _one_line(capsys, argv, 2)  # a request MLflow refuses: bad input
    assert "hunter2" not in err and "(INVALID_PARAMETER_VALUE: unsupported URI)" in err


def test_unexpected_error_is_an_internal_error(tmp_path: Path, monkeypatch, capsys):
    _distill_raises(monkeypatch, ZeroDivisionError("division by zero"))
    err = _one_line(capsys, ["distill", "--output-dir", str(tmp_path / "run")], 1)
    assert err == "simreg: internal error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)\n"


def test_debug_before_the_command(tmp_path: Path, capsys):
    (tmp_path / "c.yaml").write_bytes(b"name: \xff\n")
    assert main(["--debug", "config", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UnicodeDecodeError" in err
    assert err.endswith("is not UTF-8 text (byte b'\\xff' at offset 6): save it as UTF-8\n")


def test_k_larger_than_the_bank_is_an_error(tmp_path: Path, teachers_dir: Path, capsys):
    six = _folder(tmp_path / "six", 3)  # 6 images: 5 in the bank after the held-out split
    err = _one_line(capsys, ["eval", *_weights(teachers_dir), "--data", str(six)], 2)
    assert err == (f"simreg: error: k-NN with k=20 needs at least 20 images in its bank, which holds 5: --data {six} holds "
                   "only 5 train image(s) (after its held-out split): use data with at least 20\n")
    many = _folder(tmp_path / "many", 13)  # 26 images: 23 train
    err = _one_line(capsys, ["eval", *_weights(teachers_dir), "--data", str(many), "--bank-size", "10"], 2)
    assert "k=20 needs at least 20 images in its bank, which holds 10: pass --bank-size 20 or more" in err


def test_an_unreachable_object_store_is_a_failure_not_bad_input():
    from simreg.orchestrator.cli.errors import os_error

    code, line = os_error(OSError("When reading information for key 'runs/x' in bucket 'b': AWS Error NETWORK_CONNECTION "
                                  "during HeadObject operation: curlCode: 7, Couldn't connect to server"))
    assert code == 1 and line.endswith("check that the service or device is up, then rerun")
    code, _ = os_error(OSError("Path does not exist 'b/runs/x'"))
    assert code == 2
