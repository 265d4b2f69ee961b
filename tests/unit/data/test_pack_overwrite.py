"""`simreg data pack --overwrite` removes only the files its own manifest lists, says what it removes, and
refuses a folder that holds no simreg pack."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simreg.models.errors import DataError
from simreg.orchestrator.cli.main import main
from simreg.orchestrator.data.pack.format import MANIFEST
from simreg.orchestrator.data.pack.write import pack_image_folder


@pytest.fixture
def src(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(root / c / f"{i}.png")
    return root


def _unrelated(out: Path) -> list[Path]:
    """Files a user keeps next to (or inside) a pack folder; two are named like shards."""
    files = [out / "notes.txt", out / "other" / "part-00000.parquet", out / "all" / "part-99999.parquet"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"mine")
    return files


def test_overwrite_removes_only_the_listed_files_and_says_so(src: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    pack_image_folder(src, out, shard_rows=2)
    assert sorted(p.name for p in (out / "all").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    mine = _unrelated(out)
    with caplog.at_level(logging.INFO, logger="simreg"):
        m = pack_image_folder(src, out, shard_rows=100, overwrite=True)
    assert m["splits"]["all"]["shards"] == ["part-00000.parquet"]
    assert all(f.read_bytes() == b"mine" for f in mine)  # nothing simreg did not list was touched
    assert sorted(p.name for p in (out / "all").iterdir()) == ["part-00000.parquet", "part-99999.parquet"]
    said = [r.getMessage() for r in caplog.records if "removing the old pack" in r.getMessage()]
    assert len(said) == 1 and f"in {out}: manifest.json and 3 shard(s)" in said[0]
    assert "all/part-00000.parquet, all/part-00001.parquet, all/part-00002.parquet" in said[0] and "MiB" in said[0]


def test_overwrite_refuses_a_folder_without_a_pack(src: Path, tmp_path: Path):
    out = tmp_path / "out"
    mine = _unrelated(out)
    with pytest.raises(DataError, match=r"--overwrite replaces only a pack simreg wrote, and .* has no manifest.json: "
                                        r"nothing was removed"):
        pack_image_folder(src, out, overwrite=True)
    assert all(f.read_bytes() == b"mine" for f in mine)


@pytest.mark.parametrize("shard", ["../notes.txt", "/etc/hostname", "../other/part-00000.parquet"])
def test_overwrite_refuses_a_manifest_pointing_outside_the_pack(src: Path, tmp_path: Path, shard: str):
    out = tmp_path / "out"
    pack_image_folder(src, out)
    mine = _unrelated(out)
    m = json.loads((out / MANIFEST).read_text())
    m["splits"]["all"]["shards"] = [shard]
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"--overwrite replaces only a pack simreg wrote, and .*manifest.json' is not a "
                                        r"manifest this simreg writes: splits.all.shards holds"):
        pack_image_folder(src, out, overwrite=True)
    assert all(f.read_bytes() == b"mine" for f in mine) and (out / "all" / "part-00000.parquet").is_file()


def test_cli_overwrite_of_a_non_pack_is_one_line(src: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    mine = _unrelated(out)
    assert main(["data", "pack", str(src), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite replaces only a pack simreg wrote" in err and len(err.splitlines()) == 1
    assert all(f.is_file() for f in mine)
