"""`simreg doctor`: one row per check against the real parts (this machine's resources, a local folder, moto's
S3 server, a careless S3 endpoint that ignores conditional writes, the real teacher file, Fashion-MNIST), exit 1
with the failing rows named; no Ray started for a local cluster, no folder left behind."""
from __future__ import annotations

import uuid
from pathlib import Path

from simreg.orchestrator.cli.main import main
from tests.unit.test_lease import careless_s3


def _rows(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines()[2:]:
        if not line.strip():
            break
        name, rest = line[:19].strip(), line[19:].strip()
        status, _, detail = rest.partition("  ")
        rows[name] = (status, detail.strip())
    return rows


def test_every_check_passes_on_this_machine(fmnist_root, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["doctor", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert set(rows) == {"versions", "ray cluster", "output folder", "cache.dir", "tracking", "teacher simclr_r10t", "data"}
    assert all(status == "ok" for status, _ in rows.values()), text
    assert "the plan fits" in rows["ray cluster"][1] and "60,000 train images" in rows["data"][1]
    assert "loaded, 4.9 M parameters, feature dim 512" in rows["teacher simclr_r10t"][1]
    assert text.rstrip().endswith("every check passed") and not out.exists()  # the probe's folder removed again


def test_failures_are_rows_with_their_fix_and_exit_1(s3, fmnist_root, tmp_path: Path, capsys):
    with careless_s3() as endpoint:
        rc = main(["doctor", "--output-dir", f"s3://careless/run?endpoint_override={endpoint}&scheme=http",
                   "--tracking-uri", "http://127.0.0.1:9", f"teachers.0.weights={tmp_path / 'missing.safetensors'}",
                   "scaling.num_workers=8", "cache.enabled=false"])
    text = capsys.readouterr().out
    rows = _rows(text)
    assert rc == 1, text
    assert rows["output folder"][0] == "FAIL" and "this S3 server ignores conditional writes" in rows["output folder"][1]
    assert rows["tracking"][0] == "FAIL" and "does not answer" in rows["tracking"][1]
    assert rows["teacher simclr_r10t"][0] == "FAIL" and "missing.safetensors' does not exist" in rows["teacher simclr_r10t"][1]
    assert rows["ray cluster"][0] == "FAIL" and "scaling.num_workers=8" in rows["ray cluster"][1]
    assert rows["versions"][0] == "ok" and rows["data"][0] == "ok" and "cache.dir" not in rows
    assert "4 check(s) failed: ray cluster, output folder, tracking, teacher simclr_r10t" in text


def test_a_bucket_that_enforces_conditional_writes_passes(s3, capsys):
    uri = f"s3://simreg-test/{uuid.uuid4().hex[:8]}"
    assert main(["doctor", "--output-dir", uri, "--tracking-uri", "http://127.0.0.1:9"]) == 1  # only the tracking row fails
    rows = _rows(capsys.readouterr().out)
    assert rows["output folder"] == ("ok", rows["output folder"][1])
    assert rows["output folder"][1].endswith("conditional writes enforced (the run's lease)")
    assert [n for n, (status, _) in rows.items() if status == "FAIL"] == ["tracking"]
