"""The embedded Ray's last-resort cleanup: processes are found by the session mark in their environment, even when
they rewrote their command line (as Ray's workers do), and ended with SIGTERM, then SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from taxonet.raycluster import SESSION_ENV, kill_session, session_processes

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")]

#: a child that renames itself (like a Ray worker's process title), ignores SIGTERM, and starts a grandchild
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.argv[0] = "ray::ServeReplica"
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("ready", flush=True)
time.sleep(600)
"""


def test_session_processes_are_found_by_their_mark_and_killed_even_when_they_ignore_sigterm() -> None:
    mark, other = uuid.uuid4().hex, uuid.uuid4().hex
    marked = subprocess.Popen([sys.executable, "-c", STUBBORN], env={**os.environ, SESSION_ENV: mark},
                              stdout=subprocess.PIPE, text=True)
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                env={**os.environ, SESSION_ENV: other})
    try:
        assert marked.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while len(session_processes(mark)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = session_processes(mark)
        assert marked.pid in found and len(found) == 2 and unmarked.pid not in found  # child and grandchild
        assert sorted(kill_session(mark, grace_s=0.5)) == sorted(found)
        assert marked.wait(timeout=60) == -9  # SIGTERM was ignored: SIGKILL ended it
        deadline = time.monotonic() + 60
        while session_processes(mark) and time.monotonic() < deadline:  # the grandchild, reaped by init
            time.sleep(0.1)
        assert session_processes(mark) == []
        assert unmarked.poll() is None  # another session's process is left alone
    finally:
        for process in (marked, unmarked):
            process.kill()
            process.wait()
