"""The console: native (C++) stderr goes to a file, Python's stderr stays where it was."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, os, sys
    from simreg.orchestrator import console
    console.setup(verbose={verbose})
    path = console.hide_native_stderr()
    os.write(2, b"NATIVE-LINE\\n")              # what Ray's C++ core worker would write
    logging.getLogger("simreg").info("PYTHON-LINE")
    print("PATH", path, flush=True)
    print("NATIVE", console.native_output(), flush=True)
    console.forget_native_output(keep={keep})
    print("EXISTS", path is not None and path.exists(), flush=True)
""")


def _run(verbose: bool, keep: bool) -> tuple[str, str]:
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(verbose=verbose, keep=keep)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr


def test_native_stderr_goes_to_a_file_and_python_lines_stay():
    out, err = _run(verbose=False, keep=True)
    assert "PYTHON-LINE" in err and "NATIVE-LINE" not in err
    path = out.split("PATH ")[1].split()[0]
    assert open(path).read() == "NATIVE-LINE\n" and f"NATIVE {path}" in out and "EXISTS True" in out
    os.unlink(path)


def test_a_successful_run_leaves_no_file_and_verbose_hides_nothing():
    out, _ = _run(verbose=False, keep=False)
    assert "EXISTS False" in out
    out, err = _run(verbose=True, keep=False)
    assert "PATH None" in out and "NATIVE-LINE" in err and "PYTHON-LINE" in err
