"""`simreg data scan|pack` and the packed source, on real Fashion-MNIST images saved as PNG/JPEG in several
modes, plus a truncated JPEG, a non-image with an image suffix, an unreadable file and an empty class."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from simreg.models.errors import ConfigError, DataError
from simreg.orchestrator.cli.main import main
from simreg.orchestrator.config import DataConfig
from simreg.orchestrator.data.image_folder import decode_image, load_image_folder
from simreg.orchestrator.data.imageset import ids_of
from simreg.orchestrator.data.pack.format import MANIFEST
from simreg.orchestrator.data.pack.read import decode_batch, read_manifest
from simreg.orchestrator.data.pack.scan import check_image, scan_image_folder
from simreg.orchestrator.data.pack.write import pack_image_folder
from simreg.orchestrator.data.packed import load_packed_split, load_packed_splits
from simreg.orchestrator.data.sources import load_splits

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
MODES = [("L", "png"), ("RGB", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("P", "png")]  # image i is saved as MODES[i % 5]


def _colour(gray: np.ndarray, mode: str) -> Image.Image:
    """A real FMNIST image in ``mode``, with colour where the mode has it (so RGB conversion is exercised)."""
    rgb = Image.fromarray(np.stack([gray, 255 - gray, gray // 2], axis=-1))
    if mode == "L":
        return Image.fromarray(gray)
    if mode == "RGBA":
        im = rgb.convert("RGBA")
        im.putalpha(Image.fromarray(np.clip(gray.astype(int) + 64, 0, 255).astype(np.uint8)))
        return im
    return rgb.convert(mode)


def _make_folder(root: Path, images: np.ndarray, labels: np.ndarray, bad: bool) -> dict[str, str]:
    """ROOT/c<label>/<i>.<ext> for every image, and with ``bad`` also the broken files; returns
    {relative path: kind} of those."""
    for i, (gray, lab) in enumerate(zip(images, labels, strict=True)):
        mode, ext = MODES[i % len(MODES)]
        d = root / f"c{lab}"
        d.mkdir(parents=True, exist_ok=True)
        _colour(gray, mode).save(d / f"{i:03d}.{ext}")
    (root / "zz_empty").mkdir()
    broken: dict[str, str] = {}
    if bad:
        buf = io.BytesIO()
        _colour(images[0], "RGB").save(buf, "JPEG")
        (root / "c1" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        broken["c1/cut.jpg"] = "truncated"
        (root / "c2" / "notes.png").write_text("not an image, but named like one")
        broken["c2/notes.png"] = "corrupt"
        (root / "c2" / "README.txt").write_text("ignored: no image suffix")
        if not AS_ROOT:
            locked = root / "c3" / "locked.png"
            _colour(images[1], "L").save(locked)
            locked.chmod(0)
            broken["c3/locked.png"] = "unreadable"
    return broken


@pytest.fixture
def folder(tmp_path: Path, fmnist_small) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "images"
    broken = _make_folder(root, fmnist_small.images, fmnist_small.labels, bad=True)
    yield root, broken
    for p in root.rglob("*"):
        p.chmod(0o755)  # so tmp_path can be removed


@pytest.fixture
def clean(tmp_path: Path, fmnist_small) -> Path:
    root = tmp_path / "clean"
    _make_folder(root, fmnist_small.images, fmnist_small.labels, bad=False)
    return root


def _expected_modes(n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(n):
        counts[MODES[i % len(MODES)][0]] = counts.get(MODES[i % len(MODES)][0], 0) + 1
    return counts


def test_scan_counts_every_category(folder, fmnist_small):
    root, broken = folder
    report = scan_image_folder(root, workers=2)
    n_bad = {k: sum(v == k for v in broken.values()) for k in ("corrupt", "truncated", "unreadable")}
    assert n_bad["unreadable"] == (0 if AS_ROOT else 1)
    assert report.counts() == {"files": 64 + len(broken), "ok": 64, **n_bad, "empty_classes": 1, "ignored": 1}
    assert report.modes == dict(sorted(_expected_modes(64).items())) == {"CMYK": 13, "L": 13, "P": 12, "RGB": 13, "RGBA": 13}
    assert {b.path: b.kind for b in report.bad} == broken
    assert report.splits["all"].empty_classes == ["zz_empty"]
    assert report.classes[-1] == "zz_empty" and report.held_out is None
    assert not report.clean
    assert sum(report.splits["all"].class_counts) == 64
    text = report.table()
    assert "all/c1/cut.jpg  truncated: Truncated File Read" in text and "zz_empty" in text and "CMYK 13" in text


def test_unreadable_file_is_counted(clean, monkeypatch):
    """As root every file is readable; a read that fails as permission denied does (chmod 000 elsewhere)."""
    target = clean / "c0" / sorted(p.name for p in (clean / "c0").iterdir())[0]
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    report = scan_image_folder(clean)
    assert report.counts()["unreadable"] == 1 and report.counts()["ok"] == 63
    assert report.bad[0].path == f"c0/{target.name}" and "Permission denied" in report.bad[0].reason


@pytest.mark.skipif(AS_ROOT, reason="root reads a chmod-000 file")
def test_chmod_000_is_unreadable(folder):
    root, _ = folder
    assert check_image(root / "c3" / "locked.png")[0] == "unreadable"


def test_truncated_found_even_when_pil_is_told_to_load_truncated(folder, monkeypatch):
    root, _ = folder
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    report = scan_image_folder(root)
    assert [b.path for b in report.bad if b.kind == "truncated"] == ["c1/cut.jpg"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the scan


def test_strict_fails_naming_the_file(folder, tmp_path: Path):
    root, _ = folder
    with pytest.raises(DataError) as e:
        pack_image_folder(root, tmp_path / "out", strict=True)
    msg = str(e.value)
    assert "all/c1/cut.jpg (truncated: Truncated File Read)" in msg and "all/c2/notes.png (corrupt" in msg
    assert "drop --strict" in msg and "Remove or replace" in msg
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_pack_leaves_bad_files_out_and_every_row_decodes(folder, tmp_path: Path, fmnist_small):
    root, broken = folder
    out = tmp_path / "out"
    m = pack_image_folder(root, out, shard_rows=10)
    assert m["splits"]["all"]["rows"] == 64 and len(m["splits"]["all"]["shards"]) == 7
    assert m["scan"]["counts"]["ok"] == 64 and {b["path"] for b in m["scan"]["bad"]} == set(broken)
    t = pq.read_table(sorted((out / "all").glob("part-*.parquet")))
    assert t.schema.names == ["sample_id", "label", "image", "path", "mode"]
    assert t["sample_id"].to_pylist() == list(range(64))
    paths = t["path"].to_pylist()
    assert not set(paths) & set(broken) and paths == sorted(paths, key=lambda p: (int(p[1]), p))
    assert np.bincount(t["label"].to_numpy(), minlength=11).tolist() == [*np.bincount(fmnist_small.labels, minlength=10), 0]
    for p, blob, mode in zip(paths, t["image"].to_pylist(), t["mode"].to_pylist(), strict=True):
        assert blob == (root / p).read_bytes()  # the file's own bytes
        assert mode == MODES[int(Path(p).stem) % len(MODES)][0]
        assert decode_image(blob, 16, p).shape == (16, 16, 3)


def test_packed_pixels_equal_decoding_the_files(folder, tmp_path: Path):
    root, _ = folder
    pack_image_folder(root, tmp_path / "out", shard_rows=16)
    s = load_packed_split(tmp_path / "out", "all", 24, workers=3)
    paths = pq.read_table(sorted((tmp_path / "out" / "all").glob("*.parquet")), columns=["path"])["path"].to_pylist()
    expected = np.stack([decode_image(root / p, 24) for p in paths])
    assert s.images.dtype == np.uint8 and s.images.shape == (64, 24, 24, 3)
    assert np.array_equal(s.images, expected)
    assert s.classes[-1] == "zz_empty" and s.sample_ids.tolist() == list(range(64))
    assert (s.images[..., 0] != s.images[..., 1]).any()  # colour survived (RGB/CMYK/P images)


def test_clean_pack_equals_image_folder_source(clean, tmp_path: Path):
    """Same ids, labels and pixels as data.source=image-folder, and the same held-out draw."""
    pack_image_folder(clean, tmp_path / "out")
    direct = load_image_folder(clean, 20)
    packed = load_packed_split(tmp_path / "out", "all", 20)
    for a in ("images", "labels", "sample_ids"):
        assert np.array_equal(getattr(direct, a), getattr(packed, a))
    assert direct.classes == packed.classes
    tr_d, ho_d = load_splits(DataConfig(source="image-folder", root=str(clean), download=False, store_size=20, holdout_fraction=0.25, stream=False), 7)
    tr_p, ho_p = load_splits(DataConfig(source="packed", root=str(tmp_path / "out"), download=False, store_size=20, holdout_fraction=0.25, stream=False), 7)
    assert len(ho_p) == 16 and np.array_equal(ho_d.sample_ids, ho_p.sample_ids) and np.array_equal(tr_d.images, tr_p.images)
    assert tr_p.source_fingerprint == ho_p.source_fingerprint == packed.source_fingerprint


def test_fingerprint_stable_across_packs_and_changes_with_an_image(clean, tmp_path: Path):
    fp = lambda out: read_manifest(out)["splits"]["all"]["fingerprint"]
    pack_image_folder(clean, tmp_path / "a", shard_rows=7)
    pack_image_folder(clean, tmp_path / "b", shard_rows=64)  # other shards, same content
    assert fp(tmp_path / "a") == fp(tmp_path / "b")
    victim = clean / "c0" / sorted(p.name for p in (clean / "c0").iterdir())[0]
    with Image.open(victim) as im:
        arr = np.array(im)
    arr.flat[0] = 255 - arr.flat[0]
    Image.fromarray(arr).save(victim)
    pack_image_folder(clean, tmp_path / "c")
    assert fp(tmp_path / "c") != fp(tmp_path / "a")
    # The ImageSet fingerprint (the target cache's key) also follows the stored size.
    f16, f20 = (load_packed_split(tmp_path / "a", "all", s).source_fingerprint for s in (16, 20))
    assert f16 != f20 and f16 == load_packed_split(tmp_path / "b", "all", 16).source_fingerprint


def test_train_val_layout(tmp_path: Path, fmnist_small):
    src = tmp_path / "split"
    _make_folder(src / "train", fmnist_small.images[:48], fmnist_small.labels[:48], bad=False)
    _make_folder(src / "val", fmnist_small.images[48:], fmnist_small.labels[48:], bad=False)
    (src / "val" / "stray").mkdir()
    Image.fromarray(fmnist_small.images[0]).save(src / "val" / "stray" / "x.png")
    report = scan_image_folder(src)
    assert list(report.splits) == ["train", "val"] and report.held_out == "val"
    assert report.splits["val"].unknown_classes == ["stray"] and report.counts()["ok"] == 64
    m = pack_image_folder(src, tmp_path / "out")
    assert (m["splits"]["train"]["rows"], m["splits"]["val"]["rows"]) == (48, 16)
    train, val = load_packed_splits(tmp_path / "out", 16, 0, 0.1)
    assert len(train) == 48 and len(val) == 16 and val.classes == train.classes
    assert np.array_equal(val.images, load_image_folder(src / "val", 16, classes=train.classes).images)
    assert train.source_fingerprint != val.source_fingerprint


def test_decode_batch_matches_loader(clean, tmp_path: Path):
    """The decode of streamed rows (the view stage reads a pack's rows with it) on a plain dict of packed rows."""
    pack_image_folder(clean, tmp_path / "out", shard_rows=20)
    t = pq.read_table(tmp_path / "out" / "all" / "part-00001.parquet")
    batch = {k: t[k].to_numpy(zero_copy_only=False) for k in ("sample_id", "label", "image", "path")}
    out = decode_batch(batch, 16)
    s = load_packed_split(tmp_path / "out", "all", 16)
    assert out["sample_id"].tolist() == list(range(20, 40))
    assert np.array_equal(out["image"], s.images[20:40]) and np.array_equal(out["label"], s.labels[20:40])
    assert decode_batch({k: v[:0] for k, v in batch.items()}, 16)["image"].shape == (0, 16, 16, 3)


def test_out_dir_rules(clean, tmp_path: Path):
    out = tmp_path / "out"
    pack_image_folder(clean, out, shard_rows=8)
    assert len(list((out / "all").glob("part-*.parquet"))) == 8
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty.*--overwrite"):
        pack_image_folder(clean, out)
    pack_image_folder(clean, out, overwrite=True)  # old shards go, other files stay
    assert [p.name for p in (out / "all").iterdir()] == ["part-00000.parquet"] and (out / "keep.txt").is_file()
    with pytest.raises(DataError, match="inside the image folder"):
        pack_image_folder(clean, clean / "packed")
    with pytest.raises(DataError, match="shard_rows=0"):
        pack_image_folder(clean, tmp_path / "o2", shard_rows=0)


def test_split_without_images_is_an_error(tmp_path: Path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match="holds no decodable image"):
        pack_image_folder(tmp_path / "src", tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")


def test_damaged_packs_are_named(clean, tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"has no manifest.json.*simreg data pack IMAGE_FOLDER"):
        load_packed_splits(out, 16, 0, 0.1)
    pack_image_folder(clean, out, shard_rows=32)
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(DataError, match="version 99.*re-pack"):
        load_packed_splits(out, 16, 0, 0.1)
    (out / MANIFEST).write_text(json.dumps(m))
    shard = out / "all" / "part-00001.parquet"
    saved = shard.read_bytes()
    shard.unlink()
    with pytest.raises(DataError, match=r"part-00001.parquet' listed in .* is missing"):
        load_packed_splits(out, 16, 0, 0.1)
    # A shard from another pack of the same shape: ids and labels may pass, the fingerprint does not.
    other = tmp_path / "other"
    shutil.copytree(clean, other)
    victim = sorted((other / "c0").iterdir())[0]
    victim.write_bytes(sorted((clean / "c1").iterdir())[0].read_bytes())
    pack_image_folder(other, tmp_path / "out2", shard_rows=32)
    shutil.copy(tmp_path / "out2" / "all" / "part-00000.parquet", out / "all" / "part-00000.parquet")
    shard.write_bytes(saved)
    with pytest.raises(DataError, match="fingerprint"):
        load_packed_splits(out, 16, 0, 0.1)


def test_cli_scan_and_pack(folder, clean, tmp_path: Path, capsys):
    root, broken = folder
    assert main(["data", "scan", str(root)]) == 1
    text = capsys.readouterr().out
    assert f"{64 + len(broken)} image files" in text and "c2/notes.png  corrupt" in text
    assert main(["data", "scan", str(clean)]) == 0
    assert "0 corrupt, 0 truncated, 0 unreadable" in capsys.readouterr().out
    out = tmp_path / "cli-out"
    assert main(["data", "pack", str(root), str(out), "--shard-rows", "30"]) == 0
    text = capsys.readouterr().out
    assert f"data.source=packed data.root={out}" in text and "all    64    3" in text and "c1/cut.jpg" in text
    assert main(["data", "pack", str(root), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "pack", str(root), str(out), "--overwrite", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "all/c1/cut.jpg" in err and "drop --strict" in err and "Traceback" not in err
    assert read_manifest(out)["splits"]["all"]["rows"] == 64  # the failed strict run left the pack alone


def test_config_and_prepare_on_a_pack(clean, tmp_path: Path):
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.prepare import prepare

    with pytest.raises(ConfigError, match="data.source=packed needs data.root"):
        load_config(overrides=["data.source=packed"])
    out = tmp_path / "out"
    pack_image_folder(clean, out)
    cfg = load_config(overrides=[
        "data.source=packed", f"data.root={out}", "data.store_size=32", "data.train_size=40", "data.knn_bank_size=30",
        "data.knn_query_size=6", "data.holdout_fraction=0.1", "eval.val_every=0",
    ])
    prep = prepare(cfg, quiet=True)
    assert len(prep.train) == 40 and prep.train.images.shape[1:] == (32, 32, 3)
    assert len(prep.final_eval.bank) == 30 and len(prep.final_eval.query) == 6
    assert prep.train.source_fingerprint == load_packed_split(out, "all", 32).source_fingerprint
    assert prep.train.classes[-1] == "zz_empty" and prep.val is None
    # streamed (the default for packs): the same ids and pixels, decoded only when asked (the eval sets now)
    streamed = prepare(load_config(overrides=[*cfg_overrides(out), "data.stream=true"]), quiet=True)
    eager = prepare(load_config(overrides=[*cfg_overrides(out), "data.stream=false"]), quiet=True)
    assert streamed.train.streamed and not eager.train.streamed and not streamed.final_eval.bank.streamed
    assert np.array_equal(streamed.train.sample_ids, eager.train.sample_ids)
    assert np.array_equal(np.asarray(streamed.train.images), eager.train.images)
    assert np.array_equal(streamed.final_eval.bank.images, eager.final_eval.bank.images)
    assert streamed.train.source_fingerprint == eager.train.source_fingerprint
    pieces = streamed.train.images.pieces(16)  # what the Ray Data view stage reads, one block each
    # plain data of one schema (Ray Data ships it to the view tasks): ids as a range or as int64 bytes, never a list
    assert all(sorted(p) == ["ids", "shard", "start", "stop", "store_size"] and isinstance(p["ids"], bytes) for p in pieces)
    assert sorted(i for p in pieces for i in ids_of(p).tolist()) == sorted(eager.train.sample_ids.tolist())
    assert all(len(ids_of(p)) <= 16 for p in pieces)
    got = type(streamed.train.images).read_piece(pieces[0])
    where = [eager.train.sample_ids.tolist().index(i) for i in got["sample_id"].tolist()]
    assert np.array_equal(got["image"], eager.train.images[where])


def cfg_overrides(out: Path) -> list[str]:
    return [
        "data.source=packed", f"data.root={out}", "data.store_size=32", "data.train_size=40", "data.knn_bank_size=30",
        "data.knn_query_size=6", "data.holdout_fraction=0.1", "eval.val_every=0",
    ]


def test_eval_reads_a_pack_like_its_folder(clean: Path, teachers_dir: Path, tmp_path: Path):
    """``simreg eval --data PACK``: the same bank, queries and accuracies as on the folder it was packed from."""
    from simreg.orchestrator.evaluation.weights import evaluate_weights

    pack_image_folder(clean, tmp_path / "pack", shard_rows=16)
    w = teachers_dir / "fmnist_simclr_resnet10t.safetensors"
    on_pack = evaluate_weights(w, "resnet10t", data=str(tmp_path / "pack"), threads=1)
    on_folder = evaluate_weights(w, "resnet10t", data=str(clean), threads=1)
    keys = ("bank_images", "query_images", "feature_dim", "top1_1nn", "top1_20nn")
    assert {k: on_pack[k] for k in keys} == {k: on_folder[k] for k in keys}
    assert on_pack["bank_images"] + on_pack["query_images"] == 64


def test_cache_warm_reads_a_streamed_pack_block_by_block(clean: Path, tmp_path: Path, capsys):
    """`simreg cache warm` on a streamed pack decodes one block at a time, and fills exactly the keys and rows
    that the same pack loaded into memory asks for."""
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.data.sources import load_splits

    pack_image_folder(clean, tmp_path / "pack", shard_rows=16)
    lazy, _ = load_splits(DataConfig(source="packed", root=str(tmp_path / "pack"), download=False, store_size=96, holdout_fraction=0.1, stream=True), 0)
    eager, _ = load_splits(DataConfig(source="packed", root=str(tmp_path / "pack"), download=False, store_size=96, holdout_fraction=0.1, stream=False), 0)
    assert lazy.streamed and not eager.streamed
    got = list(lazy.blocks(10))
    assert max(len(b["sample_id"]) for b in got) <= 10
    ids = np.concatenate([b["sample_id"] for b in got])
    assert sorted(ids.tolist()) == sorted(eager.sample_ids.tolist())  # every row once
    where = {int(s): i for i, s in enumerate(eager.sample_ids)}
    for b in got:  # the same pixels as the in-memory load
        assert np.array_equal(b["image"], eager.images[[where[int(s)] for s in b["sample_id"]]])

    base = ["cache", "warm", "--dir", str(tmp_path / "cache"), "data.source=packed", f"data.root={tmp_path / 'pack'}",
            "data.train_size=null", "data.knn_bank_size=20", "data.knn_query_size=6", "train.epochs=2",
            "augment.view_bank=2", "teacher_pool.batch_size=16", "teacher_pool.threads=1"]
    n = len(eager)
    assert main([*base, "data.stream=true"]) == 0
    rep = json.loads(capsys.readouterr().out)["teachers"]["simclr_r10t"]
    assert (rep["computed_rows"], rep["cached_rows"]) == (2 * n, 0)
    assert main([*base, "data.stream=false"]) == 0  # the in-memory load: same key, every row already there
    rep = json.loads(capsys.readouterr().out)["teachers"]["simclr_r10t"]
    assert (rep["computed_rows"], rep["cached_rows"]) == (0, 2 * n)
    assert load_config(None, base[4:]).data.stream  # streaming is the packed default
