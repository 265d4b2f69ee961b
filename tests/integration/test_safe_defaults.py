"""Safe defaults of a cluster ``simreg`` starts: Ray token auth on (unless the user opts out) and the
dashboard on loopback only. Runs in a clean subprocess: the test suite itself opts out of token auth."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PROBE = textwrap.dedent("""
    import json, os
    from pathlib import Path
    from simreg.orchestrator.config import load_config
    from simreg.orchestrator.train.trainer import init_ray
    init_ray(load_config(None, ["ray.num_cpus=1"]))
    import ray
    node = ray._private.worker.global_worker.node
    print(json.dumps({"auth": os.environ.get("RAY_AUTH_MODE"), "token": (Path.home() / ".ray" / "auth_token").is_file(),
                      "dashboard": node.address_info.get("webui_url")}))
    ray.shutdown()
""")


def test_a_started_cluster_has_token_auth_and_a_loopback_dashboard(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["HOME"] = str(tmp_path)  # a fresh user: no token yet, Ray must create one
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["auth"] == "token" and got["token"], got
    assert got["dashboard"] and got["dashboard"].split(":")[0] in ("127.0.0.1", "localhost"), got
