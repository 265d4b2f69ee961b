"""The storage layer against a real S3 API (moto's standalone server on 127.0.0.1), no Ray: files and
folders, the lease that keeps one driver per folder, the target cache, packs and `simreg eval` from a
bucket, and the one-line errors of a bad endpoint, bucket or tracking server."""
from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simreg.models.errors import ConfigError
from simreg.orchestrator.cli.main import main
from simreg.orchestrator.storage import Store, local_copy, open_store
from tests.services import s3_objects


def _prefix() -> str:
    return f"s3://simreg-test/{uuid.uuid4().hex[:8]}"


def test_files_and_folders_in_a_bucket(s3, tmp_path: Path):
    root = Store(_prefix())
    assert not root.exists() and not root.is_dir() and root.listdir() == []
    (root / "a" / "b.txt").write_text("hello")
    assert (root / "a").is_dir() and (root / "a" / "b.txt").is_file() and (root / "a" / "b.txt").read_text() == "hello"
    assert root.listdir() == ["a"] and root.listdir(dirs_only=True) == ["a"]
    local = tmp_path / "tree"
    (local / "x").mkdir(parents=True)
    (local / "x" / "y.bin").write_bytes(b"\0" * 1000)
    (local / "z.txt").write_text("z")
    (root / "up").upload(local)
    assert sorted((root / "up").listdir()) == ["x", "z.txt"]
    back = (root / "up").download(tmp_path / "back")
    assert (back / "x" / "y.bin").read_bytes() == b"\0" * 1000
    with local_copy((root / "up" / "z.txt").uri) as p:
        assert p.read_text() == "z"
    assert not p.exists()  # the download is removed
    (root / "up").delete()
    assert not (root / "up").is_dir()
    # a pickled store names no secret: each process reads the credentials from its own environment
    import pickle

    assert b"simreg-test-secret" not in pickle.dumps(root.fs)
    assert str(Store(root.uri + "?endpoint_override=127.0.0.1:1&scheme=http")) == str(root)


def test_uri_with_credentials_or_unknown_parameters_is_refused(s3):
    with pytest.raises(ConfigError, match="must not hold credentials"):
        Store("s3://key:secret@simreg-test/x")
    with pytest.raises(ConfigError, match=r"unsupported URI parameter\(s\) \['secret_key'\]"):
        Store("s3://simreg-test/x?secret_key=abc")


def test_bad_endpoint_and_missing_bucket_are_one_line(s3, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket' does not exist"):
        Store("s3://no-such-bucket/runs").check_reachable("--output-dir")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match=r"--output-dir s3://simreg-test/runs: cannot reach or write it .*AWS_ENDPOINT_URL"):
        Store("s3://simreg-test/runs").check_reachable("--output-dir")
    # through the command: one line on stderr, before Ray starts, no traceback
    assert main(["distill", "--output-dir", "s3://simreg-test/x", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "simreg: error: --output-dir s3://simreg-test/x: cannot reach" in err


def test_wrong_credentials_are_one_line(tmp_path: Path, monkeypatch):
    """A server that checks signatures (moto with IAM on): a wrong secret is one line, which never shows it."""
    import boto3

    from tests.services import moto_server

    with moto_server(tmp_path, auth_after=3) as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="runner")
        key = iam.create_access_key(UserName="runner")["AccessKey"]
        iam.put_user_policy(UserName="runner", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="locked")
        Store("s3://locked/runs").check_reachable("--output-dir")  # the right key: reachable and writable
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(ConfigError) as e:
            Store("s3://locked/runs").check_reachable("--output-dir")
        msg = str(e.value)
        assert msg.startswith("--output-dir s3://locked/runs: cannot reach or write it") and "AWS_SECRET_ACCESS_KEY" in msg
        assert "\n" not in msg and "not-the-secret" not in msg and key["SecretAccessKey"] not in msg


def test_remote_output_needs_a_tracking_server_that_answers(s3, capsys):
    assert main(["distill", "--output-dir", "s3://simreg-test/y"]) == 2
    assert "an MLflow sqlite file cannot live" in capsys.readouterr().err
    assert main(["distill", "--output-dir", "s3://simreg-test/y", "--tracking-uri", "http://bob:hunter2@127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "MLflow tracking server http://bob:***@127.0.0.1:9 does not answer" in err and "hunter2" not in err
    assert err.count("\n") == 1


def test_target_cache_in_a_bucket(s3):
    from simreg.orchestrator.cache.admin import cache_entries, clear_cache
    from simreg.orchestrator.cache.memory import SHARDS
    from simreg.orchestrator.cache.targets import TargetCache

    root = _prefix()
    a = TargetCache(root, {"k": 1}, "t", 4)
    ids = np.arange(10, 20)
    a.store(0, ids, np.arange(40, dtype=np.float16).reshape(10, 4))  # indexed at once, uploaded in the background
    a.flush()
    SHARDS.clear()
    b = TargetCache(root, {"k": 1}, "t", 4)  # another process (another node) reading the bucket
    got, found = b.lookup(0, np.array([12, 13, 99]))
    assert found.tolist() == [True, True, False] and got[0].tolist() == [8, 9, 10, 11]
    keys = [k for k in s3_objects(s3, "simreg-test", root.removeprefix("s3://simreg-test/")) if k.endswith(".parquet")]
    assert len(keys) == 1 and "/v00000/b0000000/part-000000000010-000000000019-0000010-" in keys[0]
    assert not any(".tmp-" in k for k in keys)
    rows = cache_entries(root)
    assert len(rows) == 1 and rows[0]["rows"] == 10 and rows[0]["teacher"] == "t"
    assert clear_cache(root) == [rows[0]["key"]] and cache_entries(root) == []


def test_a_shard_being_uploaded_is_invisible_to_readers(s3):
    """No rename in an object store: a cache reader must still never see part of a shard. An object appears
    only when its upload completes; a reader listing meanwhile indexes nothing, then the whole shard."""
    from simreg.orchestrator.cache.targets import TargetCache

    root = _prefix()
    reader = TargetCache(root, {"k": 2}, "t", 4)
    shard = reader.dir / "v00000" / "b0000000" / "part-000000000000-000000000002-0000003-0000000000000000.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"sample_id": pa.array(np.arange(3, dtype=np.int64)),
                             "target": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(12, np.float16)), 4)}), buf)
    data = buf.getvalue()
    f = shard.fs.open_output_stream(shard.path)
    f.write(data[: len(data) // 2])  # a writer half-way through (or killed there)
    f.flush()
    assert reader.lookup(0, np.arange(3))[1].tolist() == [False, False, False] and not shard.exists()
    f.write(data[len(data) // 2 :])
    f.close()
    reader._lists.clear()  # its next look lists again (the 30 s rate limit of object stores aside)
    assert reader.lookup(0, np.arange(3))[1].all()


def test_pack_to_a_bucket_then_read_and_evaluate_from_it(s3, tmp_path: Path, teachers_dir: Path, capsys):
    from PIL import Image

    from simreg.orchestrator.data.packed import index_packed_split, load_packed_split
    from simreg.orchestrator.data.sources import resolve_source

    src = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(src / c / f"{i}.png")
    dest = _prefix() + "/pack"
    assert main(["data", "pack", str(src), dest, "--shard-rows", "8"]) == 0
    assert f"data.root={dest}" in capsys.readouterr().out
    assert main(["data", "pack", str(src), dest]) == 2  # not empty, no --overwrite
    assert "is not empty" in capsys.readouterr().err
    (open_store(dest) / "all" / "notes.txt").write_text("mine")  # not written by simreg: kept
    assert main(["data", "pack", str(src), dest, "--shard-rows", "12", "--overwrite"]) == 0  # 2 shards instead of 3
    capsys.readouterr()
    assert sorted((open_store(dest) / "all").listdir()) == ["notes.txt", "part-00000.parquet", "part-00001.parquet"]
    eager = load_packed_split(dest, "all", 16)
    lazy = index_packed_split(dest, "all", 16)
    assert len(eager) == len(lazy) == 24 and eager.source_fingerprint == lazy.source_fingerprint
    assert lazy.images.shards[0].startswith("s3://") and np.array_equal(lazy.images[np.arange(3)], eager.images[:3])
    assert resolve_source(dest) == ("packed", dest)
    # simreg eval: weights and data both from the bucket
    weights = open_store(_prefix()) / "t.safetensors"
    weights.upload(teachers_dir / "fmnist_simclr_resnet10t.safetensors")
    assert main(["eval", "--weights", weights.uri, "--arch", "resnet10t", "--data", dest, "--input-size", "32",
                 "--bank-size", "20", "--query-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "top1_20nn" in out


def test_commands_on_an_unreachable_store_are_one_line(s3, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for args in (["cache", "info", "--dir", "s3://simreg-test/cache"], ["compare", "s3://simreg-test/sweep"]):
        code = main(args)
        err = capsys.readouterr().err
        assert err.startswith("simreg: error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert code == 1, err  # a store that does not answer: a failure, not bad input


def test_abfs_container_is_not_a_credential():
    with pytest.raises(ConfigError, match="must not hold credentials"):
        Store("abfs://container:secret@account.dfs.core.windows.net/x")
    try:
        Store("abfs://container@account.dfs.core.windows.net/x")
    except ConfigError as e:  # pyarrow may lack Azure support here: then only "cannot open", never "credentials"
        assert "credentials" not in str(e)
