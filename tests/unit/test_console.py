"""taxonet.console: taxonet's lines on the terminal, other threads' (Ray's forwarded) lines in the log file, the
per-epoch progress line shown with an ETA, and errors in full after the routing ends. Subprocesses, so the real
file descriptors 1 and 2 are the ones rerouted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        import logging, os, sys, threading
        sys.path.insert(0, {PLATFORM!r})
        from pathlib import Path
        from taxonet.console import route_output
        log_path = Path({str(tmp_path / "ray.log")!r})
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_ray_lines_go_to_the_log_and_taxonet_lines_to_the_terminal(tmp_path: Path) -> None:
    result = _run("""
        def ray_thread():  # what Ray's log-forwarding thread does: print a worker's lines on the driver
            print("\\x1b[36m(RayTrainWorker pid=7)\\x1b[0m Reporting training result 1: TrainingReport(metrics={})")
            print("(RayTrainWorker pid=7) taxonet train: epoch 1/4 loss 1.0, val_loss 1.0")
            print("(SplitCoordinator pid=8) Execution plan of Dataset train", file=sys.stderr)
            print("(TrainController pid=9) [FailurePolicy] RETRY Worker group resize", file=sys.stderr)
        with route_output(log_path, 0):
            print("[1/6] a stage header")
            thread = threading.Thread(target=ray_thread)
            thread.start(); thread.join()
            os.write(2, b"core_worker.cc: a C++ line on fd 2\\n")
            logging.getLogger("ray.train").warning("a Ray logger line")
            print("the summary")
        print("after")
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    terminal = result.stdout + result.stderr
    assert "[1/6] a stage header" in terminal and "the summary" in terminal and "after" in terminal
    assert "taxonet train: epoch 1/4 loss 1.0, val_loss 1.0" in terminal and "ETA" in terminal
    assert "(TrainController pid=9) [FailurePolicy] RETRY Worker group resize" in result.stderr
    for noise in ("TrainingReport", "SplitCoordinator", "core_worker.cc", "a Ray logger line", "pid=7"):
        assert noise not in terminal
    log = (tmp_path / "ray.log").read_text()
    for line in ("TrainingReport", "SplitCoordinator", "core_worker.cc", "a Ray logger line", "epoch 1/4"):
        assert line in log


def test_quiet_hides_progress_and_verbose_routes_nothing(tmp_path: Path) -> None:
    result = _run("""
        def ray_thread():
            print("(RayTrainWorker pid=7) taxonet train: epoch 1/4 loss 1.0")
            print("(RayTrainWorker pid=7) TrainingReport(metrics={})")
        for verbosity in (-1, 1):
            with route_output(log_path, verbosity):
                print(f"verbosity {verbosity}")
                thread = threading.Thread(target=ray_thread)
                thread.start(); thread.join()
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    quiet, verbose = result.stdout.split("verbosity 1")
    assert "verbosity -1" in quiet and "epoch" not in quiet and "TrainingReport" not in quiet
    assert "taxonet train: epoch 1/4" in verbose and "TrainingReport" in verbose


def test_an_error_is_shown_in_full_after_routing(tmp_path: Path) -> None:
    result = _run("""
        def fail():
            raise RuntimeError("the worker failed: details that matter")
        with route_output(log_path, 0):
            print("before")
            fail()
    """, tmp_path)
    assert result.returncode == 1
    assert "before" in result.stdout
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: the worker failed: details that matter" in result.stderr and "in fail" in result.stderr


def test_cli_flags_before_and_after_the_verb() -> None:
    sys.path.insert(0, PLATFORM)
    from taxonet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "-q"]).quiet is True
    assert parser.parse_args(["-q", "train"]).quiet is True
    assert parser.parse_args(["train", "-v"]).verbose is True
    assert parser.parse_args(["train"]).quiet is None
    assert parser.parse_args(["demo", "--log-file", "x.log"]).log_file == "x.log"
