"""The cluster files, checked offline: launcher YAML against Ray's own schema, KubeRay manifests, the
runtime_env, the Dockerfile (base tag = installed Ray, installable package) and the commands in the docs.

Nothing here needs a cloud account, Kubernetes or a Docker engine; tests/test_multinode.py runs
cluster/submit.sh against a real (loopback) cluster.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_DIR = "/home/ray/refseg"  # the Dockerfile's WORKDIR: where the image holds jobs/ and configs/


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def refseg_image() -> str:
    """The image every cluster file must run: <registry>/refseg:<package version>."""
    return f"ghcr.io/your-org/refseg:{_pyproject()['project']['version']}"


def ray_version() -> str:
    import ray

    return ray.__version__


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ----------------------------------------------------------------------------- launcher YAML
@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_is_valid_for_ray(name, ray_schema):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(cfg, ray_schema)
    validate_config(prepare_config(cfg))  # what `ray up` does before it launches anything

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= cfg["max_workers"]
    for v in workers.values():
        assert 0 <= v.get("min_workers", 0) <= v["max_workers"] <= cfg["max_workers"]
    assert cfg["docker"]["image"] == refseg_image()


def test_aws_has_a_cpu_head_and_8_gpu_workers():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))  # no GPU on the head
    gpu = [v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    # AWS detects CPU/GPU counts from the instance type: p4d.24xlarge = 8 A100, p5.48xlarge = 8 H100
    assert gpu and all(v["node_config"]["InstanceType"] in ("p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge")
                       for v in gpu)


def test_gcp_gpu_workers_declare_their_accelerators():
    cfg = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    assert "GPU" not in cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    gpu = [v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert gpu
    for v in gpu:
        (acc,) = v["node_config"]["guestAccelerators"]
        # GCP does not detect resources: the declared GPU count must match the attached accelerators
        assert v["resources"]["GPU"] == acc["acceleratorCount"] > 0
        assert {"onHostMaintenance": "TERMINATE"} in v["node_config"]["scheduling"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_nodes_share_the_token(name):
    """Workers can only join a token-auth head with its token: ship ~/.ray/auth_token, enable the mode."""
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token ray start" in c for c in start), cfg[key]


# ----------------------------------------------------------------------------- KubeRay
def _ray_cluster_spec_checks(spec: dict) -> None:
    assert spec["rayVersion"] == ray_version()
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    (head_c,) = head["template"]["spec"]["containers"]
    assert head_c["image"] == refseg_image()
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265}
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pod = g["template"]["spec"]
        (c,) = pod["containers"]
        assert c["image"] == refseg_image()
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus > 0 and int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in c["volumeMounts"]} <= volumes
        assert any(m["mountPath"] == "/mnt/shared" for m in c["volumeMounts"])


def test_kuberay_raycluster():
    docs = load_docs(CLUSTER / "kuberay-raycluster.yaml")
    (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"] == "refseg"
    _ray_cluster_spec_checks(rc["spec"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # head and every worker mount it
    claims = {v["persistentVolumeClaim"]["claimName"] for g in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
              for v in g["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


def test_kuberay_rayjob_runs_jobs_train_with_a_valid_config():
    from refseg.cli import build_parser
    from refseg.config import load_config

    (job,) = load_docs(CLUSTER / "kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    _ray_cluster_spec_checks(spec["rayClusterSpec"])
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", f"{IMAGE_DIR}/jobs/train.py"]
    local = [a.replace(IMAGE_DIR, str(REPO)) for a in argv[2:]]  # the image holds this repository there
    assert (REPO / "jobs" / "train.py").is_file()
    a = build_parser().parse_args(["train", *local])
    assert Path(a.config).is_file() and a.output_dir.startswith("/mnt/shared/")
    cfg = load_config(a.config, a.overrides)  # every override key exists and has the right type
    assert cfg.train.storage_path.startswith("/mnt/shared/") and cfg.data.root.startswith("/mnt/shared/")
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.train.use_gpu and cfg.train.num_workers * cfg.train.gpus_per_worker <= gpus


# ----------------------------------------------------------------------------- runtime_env
def test_runtime_env_is_valid_and_uploads_no_venv(tmp_path):
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation (env_vars must be str -> str, ...)
    assert env["working_dir"] == "."
    assert "DS_ACCELERATOR" not in env["env_vars"]  # must stay unset on GPU clusters

    # the package `ray job submit` would upload from the repository root, built by Ray's own code
    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=True, excludes=get_runtime_env_default_excludes() + env["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    assert {"jobs/train.py", "refseg/cli/__init__.py", "configs/debug.yaml", "cluster/runtime_env.yaml"} <= set(names)
    assert not [n for n in names if n.startswith((".venv", ".git/", "runs/", "data/"))]
    assert pkg.stat().st_size < 20 * 1024**2, f"working_dir upload is {pkg.stat().st_size / 1024**2:.0f} MiB"


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_image_matches_ray_and_python():
    from packaging.specifiers import SpecifierSet

    (base,) = [args for word, args in dockerfile() if word == "FROM"]
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)-(gpu|cu\d+)", base)
    assert m, f"base image {base!r} is not an official rayproject/ray GPU tag"
    assert m["ray"] == ray_version()
    python = f"{m['major']}.{m['minor']}"
    assert python in SpecifierSet(_pyproject()["project"]["requires-python"])
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}", "the image runs another Python than the tests"
    assert ("WORKDIR", IMAGE_DIR) in dockerfile()


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv*", "data", "runs"} <= ignored
    for word, args in dockerfile():
        if word == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            for s in sources:
                assert (REPO / s).exists(), f"Dockerfile copies {s}, which does not exist"
                assert s not in ignored, f"Dockerfile copies {s}, which .dockerignore drops"


def test_package_installs_from_what_the_dockerfile_copies(tmp_path):
    """Build the wheel from exactly the files COPY'd before `pip install .`, install it without deps
    into a target dir and run the CLI from there (not from this checkout)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for word, args in dockerfile():
        if word == "RUN" and "pip install" in args and " ." in args:
            break
        if word == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            for s in sources:
                src = REPO / s
                if src.is_dir():
                    shutil.copytree(src, ctx / s, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(src, ctx / s)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ctx)],
                   check=True, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("refseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "refseg/cli/__init__.py" in names and any(n.startswith("refseg/models/assets/") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "jobs/", "bench/"))]
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert re.search(r"Requires-Dist: ray\[.*train.*\]", meta) and "Requires-Dist: deepspeed" in meta

    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "import refseg, refseg.cli; print(refseg.__file__); refseg.cli.main(['model-info', '--preset', 'tiny'])"
    r = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith(str(tmp_path / "site"))


# ----------------------------------------------------------------------------- docs and paths
DOC_FILES = [REPO / "docs" / "cluster.md", CLUSTER / "README.md", *sorted(CLUSTER.glob("*.yaml")),
             CLUSTER / "submit.sh", REPO / "Dockerfile"]
PATH_RE = re.compile(r"(?<![\w/.-])((?:jobs|configs|cluster|tune|docs|tests)/[\w.-]+(?:/[\w.-]+)*)")


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_mentioned_exist(doc):
    text = doc.read_text().replace(IMAGE_DIR + "/", "")
    paths = {p.rstrip(".") for p in PATH_RE.findall(text)}
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"{doc.relative_to(REPO)} mentions missing files: {missing}"


def doc_job_commands() -> list[list[str]]:
    """Every `python jobs/<verb>.py ARGS` command in docs/cluster.md (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "docs" / "cluster.md").read_text())
    cmds = []
    for line in text.splitlines():
        m = re.search(r"python (jobs/\w+\.py .*)$", line)
        if m:
            cmds.append(shlex.split(m.group(1)))
    return cmds


def test_docs_job_commands_parse_and_their_configs_load():
    from refseg.cli import build_parser
    from refseg.config import load_config

    cmds = doc_job_commands()
    assert {c[0] for c in cmds} == {"jobs/train.py", "jobs/evaluate.py", "jobs/segment.py", "jobs/tune.py"}
    parser = build_parser()
    for script, *args in cmds:
        assert (REPO / script).is_file(), script
        verb = Path(script).stem
        try:
            a = parser.parse_args([verb, *args])
        except SystemExit:
            pytest.fail(f"docs/cluster.md: `python {script} {' '.join(args)}` is not a valid `refseg {verb}` call")
        if getattr(a, "config", None):
            assert (REPO / a.config).is_file(), a.config
            load_config(REPO / a.config, a.overrides)
        if getattr(a, "space", None):
            assert (REPO / a.space).is_file(), a.space


def test_jobs_attach_to_the_running_cluster():
    """Each job calls plain ray.init() (attach to the cluster it was submitted to), then the CLI verb."""
    for verb in ("train", "evaluate", "segment", "tune"):
        src = (REPO / "jobs" / f"{verb}.py").read_text()
        assert "ray.init()" in src and f'main(["{verb}", *sys.argv[1:]])' in src, verb


# ----------------------------------------------------------------------------- submit.sh
@pytest.fixture
def fake_tools(tmp_path) -> dict:
    """A fake `ray` (prints its argv and auth env as JSON) and `kubectl` (serves a Secret's token)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ray").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'mode': os.environ.get('RAY_AUTH_MODE'),"
        " 'token': os.environ.get('RAY_AUTH_TOKEN')}))\n")
    token = base64.b64encode(b"secret-from-k8s").decode()
    (bindir / "kubectl").write_text(f"#!/bin/sh\n[ \"$3\" = refseg ] && echo -n {token} || exit 1\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", HOME=str(tmp_path / "home"))
    return env


def run_submit(env: dict, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER / "submit.sh"), *args], check=False, env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_submit_sh_builds_the_ray_job_submit_call(fake_tools, tmp_path):
    env = {**fake_tools, "RAY_AUTH_TOKEN": "tok"}
    r = run_submit(env, "--address", "http://head:8265", "--no-wait", "--", "python", "jobs/train.py",
                   "--config", "configs/debug.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    call = json.loads(r.stdout)
    assert call["argv"] == ["job", "submit", "--address", "http://head:8265", "--runtime-env",
                            str(CLUSTER / "runtime_env.yaml"), "--no-wait", "--", "python", "jobs/train.py",
                            "--config", "configs/debug.yaml"]
    assert call["cwd"] == str(REPO)  # runtime_env.yaml's working_dir "." = the repository, wherever you call it
    assert call["mode"] == "token" and call["token"] == "tok"


def test_submit_sh_token_sources(fake_tools):
    # Kubernetes: the Secret KubeRay created (key auth_token)
    r = run_submit({**fake_tools, "RAY_ADDRESS": "http://x:8265"}, "--k8s-secret", "refseg", "--", "python", "-V")
    assert r.returncode == 0, r.stderr
    call = json.loads(r.stdout)
    assert call["token"] == "secret-from-k8s" and call["argv"][3] == "http://x:8265"
    # launcher clusters: ~/.ray/auth_token (Ray reads it itself)
    r = run_submit(fake_tools, "--", "python", "-V")
    assert r.returncode == 2 and "no Ray auth token" in r.stderr and "ray get-auth-token --generate" in r.stderr
    token_file = Path(fake_tools["HOME"]) / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("abc")
    r = run_submit(fake_tools, "--", "python", "-V")
    assert r.returncode == 0 and json.loads(r.stdout)["mode"] == "token"
    assert json.loads(r.stdout)["argv"][3] == "http://127.0.0.1:8265"  # the forwarded dashboard


def test_submit_sh_usage_errors(fake_tools):
    r = run_submit({**fake_tools, "RAY_AUTH_TOKEN": "t"})
    assert r.returncode == 2 and "no entrypoint" in r.stderr
    r = run_submit({**fake_tools, "RAY_AUTH_TOKEN": "t"}, "--runtime-env", "/nope.yaml", "--", "python", "-V")
    assert r.returncode == 2 and "/nope.yaml" in r.stderr
    r = run_submit(fake_tools, "--k8s-secret", "other", "--", "python", "-V")
    assert r.returncode == 2 and "Secret 'other'" in r.stderr
