"""Where the cores go: CPU time of every process on this machine over a window, grouped by Ray's process titles.

    simreg distill data.train_size=8000 train.epochs=3 eval.val_every=0 --output-dir /tmp/p &   # then, in epoch 2:
    python benchmarks/cpu_by_process.py --seconds 20

Reads ``/proc/<pid>/stat`` (user + system time) at the start and the end of the window. Ray names its
processes by role (``ray::RayTrainWorker``, ``ray::PooledTeacher.infer``, ``ray::SplitCoordinator.get``,
``ray::IDLE``...); other processes are grouped by their command. Linux only.
"""
from __future__ import annotations

import argparse
import collections
import os
import time


def snapshot() -> dict[str, tuple[float, str]]:
    """pid -> (CPU seconds so far, process name)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        cmd = [a.decode(errors="replace") for a in argv if a]
        if cmd and cmd[0].startswith("ray::"):
            name = cmd[0].split()[0]
        elif cmd:
            exe = os.path.basename(cmd[0])
            script = next((x for x in cmd[1:] if not x.startswith("-")), "")
            script = "(inline code)" if "\n" in script or len(script) > 60 else os.path.basename(script)
            name = f"{exe} {script}".strip() if exe.startswith("python") else exe
        else:
            name = stat[stat.find("(") + 1 : stat.rfind(")")]
        out[pid] = ((int(fields[11]) + int(fields[12])) / tick, name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    before, t0 = snapshot(), time.perf_counter()
    time.sleep(a.seconds)
    after, dt = snapshot(), time.perf_counter() - t0
    cores: dict[str, float] = collections.defaultdict(float)
    for pid, (cpu, name) in after.items():
        cores[name] += (cpu - before[pid][0] if pid in before else cpu) / dt
    print(f"| process | cores (over {dt:.1f} s) |\n|---|---|")
    for name, c in sorted(cores.items(), key=lambda kv: -kv[1])[: a.top]:
        if c > 0:
            print(f"| {name} | {c:.2f} |")
    print(f"| all | {sum(cores.values()):.2f} of {os.cpu_count()} |")


if __name__ == "__main__":
    main()
