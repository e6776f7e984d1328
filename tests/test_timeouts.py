"""The suite cannot hang: pyproject.toml's per-test timeout (pytest-timeout, thread method)
ends a hung test, and no child process a test started outlives it (conftest.py's
`processes` fixture at teardown, its timeout hook when the run is ended)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# A child that starts a grandchild; each appends its pid to PIDS, then sleeps.
FAMILY = textwrap.dedent(
    """
    import os, subprocess, sys, time
    with open(sys.argv[1], "a") as handle:
        print(os.getpid(), file=handle)
    if sys.argv[2:] == ["parent"]:
        subprocess.Popen([sys.executable, __file__, sys.argv[1]])
    time.sleep(600)
    """
)

GENERATED_TESTS = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path

    def started(pids, count):
        deadline = time.monotonic() + 60
        while len(Path(pids).read_text().split()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(Path(pids).read_text().split()) == count

    def test_fails_with_children_running(processes):
        processes.popen([sys.executable, {family!r}, {failed!r}, "parent"])
        started({failed!r}, 2)
        assert False, "a failure: the fixture kills the children at teardown"

    def test_hangs_on_a_child(processes):
        untracked = subprocess.Popen([sys.executable, {family!r}, {hung!r}, "parent"])
        child = processes.popen([sys.executable, {family!r}, {hung!r}, "parent"])
        started({hung!r}, 4)
        child.wait()  # forever, but for the timeout
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_hung_test_is_stopped_and_its_processes_are_gone(tmp_path):
    family, failed, hung = tmp_path / "family.py", tmp_path / "failed.pids", tmp_path / "hung.pids"
    family.write_text(FAMILY)
    failed.write_text("")
    hung.write_text("")
    test_file = tmp_path / "test_generated.py"
    test_file.write_text(GENERATED_TESTS.format(family=str(family), failed=str(failed), hung=str(hung)))
    # The project's own configuration and conftest.py, with a 5-second timeout.
    command = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-p", "conftest"]
    command += ["-p", "no:cacheprovider", "-o", "timeout=5", "-q", str(test_file), "-k"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}

    def run(name: str) -> str:
        result = subprocess.run(
            [*command, name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    output = run("test_fails_with_children_running")
    assert "1 failed" in output and "a failure: the fixture kills" in output, output[-3000:]
    started = time.monotonic()
    output = run("test_hangs_on_a_child")
    assert time.monotonic() - started < 60 and "1 failed" not in output
    assert "Timeout after 5.0 s: 2 child process(es) killed" in output, output[-3000:]
    assert "child.wait()" in output  # the stack of the hung test, shown before the kill
    pids = [int(pid) for path in (failed, hung) for pid in path.read_text().split()]
    assert len(pids) == 6
    deadline = time.monotonic() + 10  # the kill is sent; the kernel ends them
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)]
