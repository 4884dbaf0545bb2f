"""Loopback helpers shared by tests and benchmarks (stdlib + httpx only: no Ray, no torch).

``free_port`` (a port to bind a test server to), ``RequestLoop`` (client threads hammering an HTTP endpoint until
stopped, recording what each call returned) and ``marked_processes`` (processes found by a mark in their
environment, which every child inherits: how a test finds all processes a command started, whatever Ray renamed
them to).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RequestLoop(Generic[T]):
    """``clients`` threads, each with its own ``httpx.Client`` on ``url``, calling ``send(client, index)`` until
    stopped (the context manager's exit) and recording what it returns; an ``httpx.HTTPError`` is recorded as
    ``on_error(exc)`` and the thread pauses ``error_pause_s`` before its next call.

    ``index`` is the thread's number (so threads can send different kinds of request)."""

    def __init__(self, url: str, send: Callable[[httpx.Client, int], T], clients: int, *,
                 on_error: Callable[[httpx.HTTPError], T], timeout_s: float = 60.0, error_pause_s: float = 0.0,
                 join_s: float = 90.0) -> None:
        self.url, self._send, self._on_error = url, send, on_error
        self._timeout_s, self._error_pause_s, self._join_s = timeout_s, error_pause_s, join_s
        self.results: list[T] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self._timeout_s) as client:
            while not self._stop.is_set():
                try:
                    result = self._send(client, index)
                except httpx.HTTPError as exc:
                    result = self._on_error(exc)
                    time.sleep(self._error_pause_s)
                with self._lock:
                    self.results.append(result)

    def __enter__(self) -> "RequestLoop[T]":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._join_s)

    def snapshot(self) -> list[T]:
        with self._lock:
            return list(self.results)

    def wait_for_answers(self, count: int, timeout: float = 120.0) -> None:
        """Poll until ``count`` calls have been recorded; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.snapshot()) < count:
            assert time.monotonic() < deadline, f"{count} answers not recorded within {timeout:.0f} s"
            time.sleep(0.1)


def marked_processes(env_name: str, mark: str) -> dict[int, str]:
    """Live processes (zombies excluded) whose environment carries ``env_name=mark``: pid → command line."""
    needle = f"{env_name}={mark}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue  # a zombie is dead: it only waits for its parent to read its status
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _parent_and_start(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None when it is gone or a zombie."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def process_tree(roots: Iterable[int]) -> dict[int, int]:
    """``roots`` and all their live descendants: pid → start time (to tell a reused pid from the same process).

    Ray renames some processes (``ray::DashboardAgent``) in a way that can overwrite the environment /proc shows,
    so a mark in the environment does not find every process; its parent (the raylet) does, while it lives."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _parent_and_start(int(entry.name))) is not None:
            table[int(entry.name)] = info
    tree = {pid: table[pid][1] for pid in roots if pid in table}
    grew = True
    while grew:
        grew = False
        for pid, (parent, start) in table.items():
            if parent in tree and pid not in tree:
                tree[pid] = start
                grew = True
    return tree


def end_processes(tree: dict[int, int], grace_s: float = 30.0) -> list[int]:
    """SIGTERM the processes of ``tree`` (pid → start time), SIGKILL those left after ``grace_s``; returns the
    pids still alive after that (none, normally). A pid whose start time changed is another process: left alone."""
    def alive() -> list[int]:
        return [pid for pid, start in tree.items() if (info := _parent_and_start(pid)) is not None
                and info[1] == start]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    return alive()
