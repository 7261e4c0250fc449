"""A real 2-node Ray cluster on loopback, token authentication on, driven like a user would drive one.

    head = RayNode.head(root, cluster_env(token), num_cpus=1); RayNode.join(root, head, num_cpus=1, name="node2")
    cluster/submit.sh -- python jobs/train.py ...      (env: RAY_ADDRESS=http://127.0.0.1:<dashboard>, token)

Training is submitted with ``cluster/submit.sh`` (``ray job submit`` + cluster/runtime_env.yaml, the
checkout uploaded as working_dir) and must put its two Ray Train workers on two different nodes:
each node advertises 1 CPU and each worker asks for 0.6, so no node can hold both (Ray Train's default
PACK strategy would otherwise put them together). Then the worker node leaves and ``jobs/evaluate.py``
runs unchanged on the single remaining node.

Every node is a ``ray start --block`` child of this test with its own ``--temp-dir`` and explicit free
ports; teardown ends exactly those processes and their descendants (``ray stop`` would kill every Ray
instance on the machine, including other tests'). The token is a fresh one passed as RAY_AUTH_TOKEN,
so ~/.ray/auth_token is neither read nor written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` / `python`: job drivers and workers import refseg
JOB_TIMEOUT_S = 1200  # a 2-core machine under load; ~2 min when idle


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (all held open until every one is picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env(token: str, dashboard_url: str | None = None) -> dict:
    """The environment of every process of this test's cluster and its clients."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    if dashboard_url:
        env["RAY_ADDRESS"] = dashboard_url
    return env


class RayNode:
    """One ``ray start --block`` node with its own temp dir and ports; ``stop()`` ends its process tree."""

    def __init__(self, args: list[str], temp_dir: Path, env: dict, log: Path, attempts: int = 3) -> None:
        self.temp_dir, self.log = temp_dir, log
        for attempt in range(1, attempts + 1):
            # Ray gives a raylet 30 s to register with the GCS; a loaded 2-core machine can miss that
            if self._start(args, env) or attempt == attempts:
                break
            self.stop()
            shutil.rmtree(temp_dir, ignore_errors=True)
        if not self.started:
            self.stop()
            pytest.fail(f"ray start failed {attempts} times:\n{log.read_text()[-4000:]}")

    def _start(self, args: list[str], env: dict, timeout: float = 120.0) -> bool:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        agent, grpc, runtime_env_agent, metrics, node_manager, object_manager = free_ports(6)
        cmd = [str(BIN / "ray"), "start", "--block", "--temp-dir", str(self.temp_dir),
               "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
               "--object-store-memory", str(150 * 1024**2),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
               "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
               "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
               *args]
        with open(self.log, "a") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=self.temp_dir,
                                         start_new_session=True)
        # `ray start` writes <temp-dir>/ray_current_cluster once the node is up, then blocks
        marker = self.temp_dir / "ray_current_cluster"
        deadline = time.time() + timeout
        self.started = False
        while time.time() < deadline and self.proc.poll() is None:
            if marker.exists():
                self.started = True
                break
            time.sleep(0.5)
        return self.started

    @classmethod
    def head(cls, root: Path, env: dict, num_cpus: int) -> RayNode:
        gcs, dashboard, client = free_ports(3)
        # RAY_ADDRESS for every process of the cluster: Ray helpers that look for "the" local cluster
        # (e.g. Ray Train's PlacementGroupCleaner) would otherwise find other tests' instances too
        env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        node = cls(["--head", "--port", str(gcs), "--num-cpus", str(num_cpus), "--dashboard-port", str(dashboard),
                    "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client)],
                   root / "head", env, root / "head.log")
        node.env, node.gcs_address, node.dashboard_url = env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        return node

    @classmethod
    def join(cls, root: Path, head: RayNode, num_cpus: int, name: str) -> RayNode:
        return cls(["--address", head.gcs_address, "--num-cpus", str(num_cpus)], root / name, head.env,
                   root / f"{name}.log")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the ``ray start --block`` process (it shuts its node down), then kill what is left of
        its descendants, its process group and any process naming this node's temp dir (gcs_server,
        raylet, agents) — only processes this node started."""
        import psutil

        try:
            parent = psutil.Process(self.proc.pid)
            tree = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        mine = str(self.temp_dir)
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and p not in tree and any(mine in a for a in p.info["cmdline"] or ()):
                tree.append(p)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def ray_query(env: dict, gcs_address: str, code: str) -> object:
    """Run ``code`` (which sets ``out``) in a fresh Python attached to the cluster; returns ``out``."""
    script = (f"import json, ray\nray.init(address={gcs_address!r}, logging_level='ERROR')\n"
              f"{textwrap.dedent(code)}\nprint('@@' + json.dumps(out))\n")
    r = subprocess.run([str(BIN / "python"), "-c", script], check=False, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.rsplit("@@", 1)[1])


def alive_nodes(env: dict, gcs_address: str) -> list[dict]:
    return ray_query(env, gcs_address, """
        out = [{"id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes() if n["Alive"]]
    """)


def wait_nodes(env: dict, gcs_address: str, n: int, timeout: float = 90.0) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        nodes = alive_nodes(env, gcs_address)
        if len(nodes) == n or time.time() > deadline:
            return nodes
        time.sleep(2)


def submit(env: dict, log: Path, *entrypoint: str, timeout: float = JOB_TIMEOUT_S) -> tuple[int | None, str]:
    """``cluster/submit.sh -- ENTRYPOINT``: waits for the job and streams its logs (into ``log``), like a
    user would. Returns (exit status or None on timeout, the output)."""
    with open(log, "w") as f:
        try:
            rc = subprocess.run(["bash", str(REPO / "cluster" / "submit.sh"), "--", *entrypoint], check=False,
                                env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, log.read_text(errors="replace")


def job_failure(rc: int | None, text: str) -> str:
    lines = [ln for ln in text.splitlines() if "packaging.py" not in ln]  # one line per skipped .gitignore
    status = "timed out" if rc is None else f"exit {rc}"
    return f"job {status}; last output:\n" + "\n".join(lines[-80:])


def train_worker_nodes(env: dict, gcs_address: str) -> list[str]:
    """Node ids of every Ray Train worker actor the cluster has run (the state API keeps dead actors)."""
    return ray_query(env, gcs_address, """
        from ray.util.state import list_actors
        out = [a.node_id for a in list_actors(address=ray.get_runtime_context().gcs_address, limit=1000,
                                              filters=[("class_name", "=", "RayTrainWorker")],
                                              raise_on_missing_output=False)]
    """)


@pytest.fixture
def cluster_root():
    # short path: Ray's unix sockets live under <temp-dir>/session_*/sockets (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="rsmn-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 600)
def test_two_node_train_then_single_node_evaluate(ray_session, cluster_root, synthetic_root, tmp_path):
    token = secrets.token_hex(32)
    nodes: list[RayNode] = []
    try:
        head = RayNode.head(cluster_root, cluster_env(token), num_cpus=1)
        nodes.append(head)
        nodes.append(RayNode.join(cluster_root, head, num_cpus=1, name="node2"))
        client_env = cluster_env(token, head.dashboard_url)

        alive = wait_nodes(client_env, head.gcs_address, 2)
        assert len(alive) == 2 and all(n["cpus"] == 1 for n in alive), alive

        # token auth is on: a wrong token is refused before anything runs
        rc, text = submit(cluster_env("0" * 64, head.dashboard_url), tmp_path / "bad.log",
                          "python", "-c", "print('must not' + ' run')")
        assert rc != 0 and "must not run" not in text and "Invalid authentication token" in text, text[-3000:]

        out, storage = tmp_path / "out", tmp_path / "storage"
        t0 = time.time()
        rc, text = submit(client_env, tmp_path / "train.log", "python", "jobs/train.py", "--config", "configs/debug.yaml",
                          "--output-dir", str(out), f"data.root={synthetic_root}", "data.synthetic=false",
                          "data.image_size=64", "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=3",
                          "train.val_every=1", "train.num_workers=2", "train.cpus_per_worker=0.6", "data.map_cpus=0.25",
                          "deepspeed.zero_stage=2",
                          f"train.storage_path={storage}", "train.name=mn")
        train_s = time.time() - t0
        assert rc == 0 and "succeeded" in text, job_failure(rc, text)

        # both Ray Train workers ran, on two different nodes (0.6 CPU each, 1 CPU per node)
        placed = train_worker_nodes(client_env, head.gcs_address)
        assert len(placed) == 2, placed
        assert len(set(placed)) == 2, f"both Ray Train workers ran on node {placed[0]}"
        assert set(placed) == {n["id"] for n in alive}

        from refseg.data.sources.refer import load_split

        n_val = len(load_split(synthetic_root, "refcoco", "unc", "val"))  # every val sentence
        summary = json.loads((out / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["steps"] == 3, summary
        assert Path(summary["model_path"]) == out / "model.pt" and (out / "model.pt").is_file()
        (epoch,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert epoch["samples"] == 2 * 3 * 4  # 2 ranks x 3 steps x batch 4
        assert epoch["val_samples"] == n_val  # the two ranks' val shards together cover the split once
        # the best checkpoint lives under train.storage_path/<train.name>, with the ZeRO shard of each rank
        best = Path(summary["best_checkpoint"])
        assert best.parent == storage / "mn" and best.is_dir()
        files = {p.name for p in best.rglob("*") if p.is_file()}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files

        # the worker node leaves: the same jobs run unchanged on a single-node cluster
        nodes.pop().stop()
        alive = wait_nodes(client_env, head.gcs_address, 1)
        assert len(alive) == 1, alive
        t0 = time.time()
        rc, text = submit(client_env, tmp_path / "eval.log", "python", "jobs/evaluate.py", "--checkpoint",
                          str(out / "model.pt"), "--data-root", str(synthetic_root), "--dataset", "refcoco",
                          "--split-by", "unc", "--split", "val", "--workers", "1", "--output", str(tmp_path / "eval"))
        eval_s = time.time() - t0
        assert rc == 0 and "succeeded" in text, job_failure(rc, text)
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        per_sample = (tmp_path / "eval" / "per_sample.jsonl").read_text().splitlines()
        assert metrics["num_samples"] == len(per_sample) == n_val > 0 and metrics["split"] == "val"
        # the same evaluation of the same model.pt in this process (its own local Ray) gives the same figures
        from refseg.infer import evaluate

        local = evaluate(out / "model.pt", synthetic_root, "refcoco", "unc", "val", workers=1,
                         output=tmp_path / "eval_local")
        assert {k: local[k] for k in ("oiou", "miou", "num_samples", "precision_at")} == {
            k: metrics[k] for k in ("oiou", "miou", "num_samples", "precision_at")}
        print(f"\n2-node training job {train_s:.0f}s, single-node evaluation job {eval_s:.0f}s, metrics {metrics}")
    finally:
        for node in reversed(nodes):
            node.stop()
