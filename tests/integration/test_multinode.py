"""Training on a two-node Ray cluster survives losing a node.

One machine plays a cluster: `ray start --head` (node A) plus a second `ray start --address` (node B), both on
127.0.0.1 with their own ports, one CPU each. `taxonet train` runs two workers of 0.75 CPU, so exactly one fits on
each node (Ray Train packs a placement group of two 0.75-CPU bundles; no node has 1.5 CPUs), with the dataset and the
run on moto's S3 server. Once the checkpoint of epoch 1 is registered, the test SIGKILLs everything of node B (its
raylet, its agents and the Ray worker processes on it: what an OOM-killed or reclaimed pod looks like), waits until
Ray Train has decided to retry (`train.max_failures: 1`), then starts a replacement node B (what KubeRay does for a
lost worker pod). The run must finish from the last registered checkpoint: only the epoch in flight runs again.

Ray Train V2 (Ray 2.60) semantics this relies on (docs/scaling.md, "Losing a node"): a worker-group failure is
charged to `FailureConfig.max_failures` and the whole group restarts from the latest registered checkpoint; with a
fixed `num_workers` the new group waits for all its bundles — a start that times out
(`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`, 60 s) is a controller error, retried without limit by default
(`controller_failure_limit=-1`) and not charged to `max_failures` — so the run resumes when capacity returns.

Every process is started here and stopped here by process id (never `ray stop`: other Ray instances may run on the
machine). Runs in about 2–3 minutes on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset
from taxonet.taxonomy import Taxonomy
from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
BUCKET = "taxonet-multinode"
RUN = "nodeloss"
EPOCHS = 4
KILL_AFTER_EPOCH = 1  # node B dies once this epoch's checkpoint is registered, i.e. during the next epoch


# ------------------------------------------------------------------------------------------------ processes
def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc (no psutil in the runtime dependencies)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to a `ray start --block` process, its process group and every descendant; returns their pids."""
    pids = [process.pid, *_descendants(process.pid)]
    try:
        os.killpg(process.pid, sig)  # started in a session of its own: its pid is the group id
    except ProcessLookupError:
        pass
    for pid in pids:  # a descendant that left the group (setsid) still goes
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if _alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return [pid for pid in pids if _alive(pid)]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5, diagnostics=lambda: ""):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnostics()}")


# ------------------------------------------------------------------------------------------------ S3 + cluster
@dataclass
class Cluster:
    """A head (node A) and a worker node (node B) started with `ray start --block`, each in its own session."""

    env: dict[str, str]
    root: Path  # Ray's temp dir (short: Ray's unix sockets live under it)
    gcs_port: int = 0
    head: subprocess.Popen | None = None
    node_b: subprocess.Popen | None = None
    dead: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root.parent / f"{self.root.name}-{name}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                                     "--node-ip-address", "127.0.0.1", *args, *self._node_ports()],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @staticmethod
    def _node_ports() -> list[str]:
        # Every port a node opens, fresh: two raylets share the address 127.0.0.1, and other tests' Ray may run.
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]

    def start_head(self) -> None:
        self.gcs_port = free_port()
        self.head = self._start("head", [
            "--head", "--port", str(self.gcs_port), "--temp-dir", str(self.root), "--num-cpus", "1",
            "--resources", json.dumps({"node_a": 1}), "--object-store-memory", str(300 * 2**20),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
            "--ray-client-server-port", str(free_port())])

    def start_node_b(self) -> None:
        self.node_b = self._start("node-b", [
            "--address", self.address, "--num-cpus", "1", "--resources", json.dumps({"node_b": 1}),
            "--object-store-memory", str(300 * 2**20)])

    def kill_node_b(self) -> list[int]:
        """SIGKILL node B: the `ray start` process, its raylet, agents and every worker process the raylet forked."""
        assert self.node_b is not None
        pids = _kill_tree(self.node_b)
        self.dead.append(self.node_b)
        self.node_b = None
        return pids

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes as Ray's GCS sees them (a short driver of its own: this process stays Ray-free)."""
        probe = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                 "print(json.dumps([{'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
                 % self.address)
        result = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            return []
        return json.loads(result.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        for process in [self.node_b, self.head, *self.dead]:
            if process is None:
                continue
            pids = _kill_tree(process, signal.SIGTERM)
            if _wait_gone(pids, 20):
                _kill_tree(process, signal.SIGKILL)
                _wait_gone(pids, 20)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """moto's standalone server as a process of its own; yields the environment for the Ray nodes and the CLI."""
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"moto-multinode-{port}.log", "wb")
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update({
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": S3_REGION,
        "AWS_DEFAULT_REGION": S3_REGION, "AWS_ENDPOINT_URL_S3": endpoint,
        # Not the tests' usual RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: that is Ray's single-node mode, in which
        # `ray start --address` refuses to add a node. Loopback comes from --node-ip-address 127.0.0.1 on both nodes.
        "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0",
        "GLOO_SOCKET_IFNAME": "lo",  # torch.distributed's CPU backend between the two workers, on loopback too
        "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)]),
    })
    saved = {k: os.environ.get(k) for k in env if k.startswith("AWS_")}
    try:
        _wait_for(lambda: _http_up(endpoint), 60, "moto_server")
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # for this process's boto3
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        write_synthetic_dataset(f"s3://{BUCKET}/ds", Taxonomy.demo(), per_species=160, image_size=32, seed=0,
                                options=PrepareOptions(workers=1, progress=False, shard_size=200))
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _http_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=2):
            return True
    except OSError as exc:
        return hasattr(exc, "code")  # an HTTP error status means the server answers


@pytest.fixture()
def cluster(s3_env: dict[str, str]) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="txmn-", dir="/tmp"))
    nodes = Cluster(env=s3_env, root=root)
    try:
        nodes.start_head()
        _wait_for(lambda: "Ray runtime started" in nodes.logs[0].read_text(errors="replace")
                  or nodes.head.poll() is not None, 120, "the head node",
                  diagnostics=lambda: nodes.logs[0].read_text(errors="replace")[-3000:])
        assert nodes.head.poll() is None, nodes.logs[0].read_text(errors="replace")[-3000:]
        nodes.start_node_b()
        _wait_for(lambda: len(nodes.alive_nodes()) == 2, 150, "two alive Ray nodes", poll=2,
                  diagnostics=lambda: "\n".join(p.read_text(errors="replace")[-2000:] for p in nodes.logs))
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)
        for log in nodes.logs:
            log.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ the test
def _registered_epochs() -> list[int]:
    """Epochs whose checkpoints Ray Train's controller has registered (its snapshot in the run directory)."""
    try:
        body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{RUN}/checkpoint_manager_snapshot.json")
    except Exception:  # not written yet
        return []
    snapshot = json.loads(body["Body"].read())
    return sorted((result.get("metrics") or {}).get("epoch", -1) for result in snapshot.get("checkpoint_results", []))


@pytest.mark.timeout(420)
def test_training_survives_losing_a_node(cluster: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    log_path = tmp_path / "train.log"
    overrides = {
        "data.dataset": f"s3://{BUCKET}/ds", "data.input_size": 32, "model.backbone": "small_cnn",
        "optim.epochs": EPOCHS, "optim.batch_size": 16, "optim.lr": 3e-3,
        "train.storage": f"s3://{BUCKET}/runs", "train.run_name": RUN,
        # one worker per node: a placement group of two 0.75-CPU bundles cannot fit in one 1-CPU node
        "train.num_workers": 2, "train.cpus_per_worker": 0.75, "train.max_failures": 1,
    }
    # -v: every Ray line on the driver's output (Ray Train's failure messages are read from it below)
    command = [str(BIN / "taxonet"), "-v", "train", "--address", cluster.address, "--config", "demo",
               *(f"--set={key}={value}" for key, value in overrides.items())]
    with open(log_path, "wb") as out:
        driver = subprocess.Popen(command, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        # 1. mid-run: the checkpoint of epoch KILL_AFTER_EPOCH is registered, the next epoch is running
        _wait_for(lambda: KILL_AFTER_EPOCH in _registered_epochs() or driver.poll() is not None, 240,
                  f"the checkpoint of epoch {KILL_AFTER_EPOCH}", diagnostics=lambda: output()[-4000:])
        registered = _registered_epochs()
        assert driver.poll() is None, "the run ended before the node could be killed:\n" + output()[-4000:]
        assert max(registered) == KILL_AFTER_EPOCH, f"too late: epochs {registered} already registered"
        killed_at = time.monotonic()
        pids = cluster.kill_node_b()
        assert not _wait_gone(pids, 10), "node B's processes survived SIGKILL"

        # 2. Ray Train notices the lost worker and decides to retry (charged to max_failures)
        _wait_for(lambda: "[FailurePolicy] RETRY" in output() or driver.poll() is not None, 180,
                  "Ray Train's retry decision", diagnostics=lambda: output()[-4000:])
        assert driver.poll() is None, "the run failed instead of retrying:\n" + output()[-4000:]
        noticed_s = time.monotonic() - killed_at

        # 3. a replacement node B joins (KubeRay recreates a lost worker pod); the run finishes on both nodes
        cluster.start_node_b()
        rc = driver.wait(timeout=max(30.0, 400 - (time.monotonic() - started)))
        finished = time.monotonic()
        text = output()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    assert rc == 0, text[-6000:]

    # `taxonet train` ends with its JSON summary (Ray's own lines may follow it)
    summary, _ = json.JSONDecoder().raw_decode(text[text.rindex("\n{\n") + 1:])
    assert summary["resumed_from_epoch"] == KILL_AFTER_EPOCH + 1, summary
    # the run's history rides in the best checkpoint's metrics (train/loop.py: complete_checkpoint)
    best_metrics = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{RUN}/best/metrics.json")["Body"].read()
    history = json.loads(best_metrics)["history"]
    # epochs before the loss ran once in the first attempt; the epoch in flight and the rest ran in the retry
    attempts = [(h["epoch"], h["start_epoch"]) for h in history]
    resumed = KILL_AFTER_EPOCH + 1
    assert attempts == [(e, 0 if e < resumed else resumed) for e in range(EPOCHS)], attempts
    assert "Source: worker group" in text and "Error count: 1 (max allowed: 1)" in text, text[-6000:]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{RUN}/best/")
            .get("Contents", [])]
    assert f"runs/{RUN}/best/checkpoint.json" in keys and f"runs/{RUN}/best/thresholds.json" in keys, keys
    decision = text[text.index("[FailurePolicy] RETRY"):]
    print(f"multinode: node B killed {killed_at - started:.0f} s into the run, after epoch {KILL_AFTER_EPOCH}'s "
          f"checkpoint; Ray Train decided to retry {noticed_s:.0f} s later; the run resumed at epoch {resumed} and "
          f"finished {finished - started:.0f} s into the run. Ray Train said:\n" + "\n".join(decision.splitlines()[:6]))
