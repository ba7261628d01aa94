"""The cluster launcher config and the node installer, checked offline: cluster.yaml passes Ray's own
validator and the project's checks, each broken copy fails for its reason, and study/setup.sh (the one
installer of `make install` and every cluster node) leaves an importable project in a fresh venv."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tomllib

import pytest
import yaml
from clis import ROOT

from study import cluster_check

pytestmark = pytest.mark.integration
CFG = yaml.safe_load((ROOT / "cluster.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_cluster_yaml_passes_rays_validator_and_the_checks(capsys):
    assert cluster_check.main([str(ROOT / "cluster.yaml")]) == 0, capsys.readouterr().err
    assert cluster_check.problems(CFG, PYPROJECT) == []


def _broken(change) -> dict:
    cfg = copy.deepcopy(CFG)
    change(cfg)
    return cfg


def _set_setup(cfg: dict, command: str) -> None:
    cfg["setup_commands"][0] = command


def _rules(*ports: int):
    return lambda cfg: cfg["provider"]["security_group"].update(IpPermissions=[
        {"FromPort": p, "ToPort": p, "IpProtocol": "TCP", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]} for p in ports])


@pytest.mark.parametrize("change,needle", [
    (lambda c: _set_setup(c, "python3 -m venv .venv && .venv/bin/pip install -e ."), "installs outside"),
    (lambda c: _set_setup(c, "cd ~/petl-study && bash study/setup.sh --extras cluster"), "needs >= 3.11"),
    (lambda c: _set_setup(c, "cd ~/petl-study && bash study/setup.sh --extras dev --install-python"), "no boto3"),
    (_rules(22), "repeats the SSH rule"),
    (_rules(8265), "opens port(s) 8265-8265"),
    (lambda c: c["available_node_types"]["gpu_1x_a10g"]["node_config"].pop("IamInstanceProfile"),
     "'gpu_1x_a10g' has no IamInstanceProfile"),
    (lambda c: c["available_node_types"]["head"]["node_config"].pop("IamInstanceProfile"),
     "cannot iam:PassRole the workers' petl-study-s3"),
    (lambda c: [t.get("resources", {}).pop("cpu_only", None) for t in c["available_node_types"].values()],
     "would start GPU machines"),
    (lambda c: c["setup_commands"].append("echo export HF_TOKEN=hf_abcdefghijklmnopqrstuvwx >> ~/.bashrc"),
     "hub token"),
    (lambda c: c["head_start_ray_commands"].__setitem__(1, "ray start --head --dashboard-host=0.0.0.0"),
     "RAY_AUTH_MODE=token"),
])
def test_each_broken_copy_fails_for_its_reason(change, needle):
    found = cluster_check.problems(_broken(change), PYPROJECT)
    assert any(needle in p for p in found), found


def test_rays_validator_rejects_schema_errors(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({**CFG, "max_wrokers": 3}))
    assert cluster_check.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Ray's validator") and "max_wrokers" in err[0]


def _setup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "study" / "setup.sh"), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_setup_script_leaves_an_importable_project_in_a_fresh_venv(tmp_path):
    """A fresh venv (this Python, no pip of its own) that sees this venv's packages through a .pth file, so
    nothing is downloaded (no index: torch and every pin are already satisfied); the script installs the
    project itself, editable, and a second run changes nothing."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "_shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    offline = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}
    out = _setup("--venv", str(venv), "--python", sys._base_executable, env=offline)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "installed petl-study[dev]" in out.stdout
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import study.storage, trainables.cache, torch; "
                            "print(study.storage.__file__)"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == str(ROOT / "study" / "storage.py"), probe.stderr
    again = _setup("--venv", str(venv), "--python", sys._base_executable, env=offline)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr


def test_setup_script_refuses_python_older_than_311(tmp_path):
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\nexit 1\n")  # what `python3.10 -c 'sys.version_info < (3, 11)'` answers
    old.chmod(0o755)
    out = _setup("--venv", str(tmp_path / "v"), "--python", str(old))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "needs Python >= 3.11" in out.stderr, out.stderr
    assert not (tmp_path / "v").exists()


def test_cpu_only_work_lands_on_cpu_nodes_not_gpu_nodes(tmp_path):
    """Memory estimates ask for `cpu_only` (cluster.yaml's CPU node types); a local storage folder is
    checked to be the same on every node before shard writers and trials use it."""
    import ray
    from ray.cluster_utils import Cluster

    from study import launch, prepare

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gpu = cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        ray.init(address=cluster.address)
        assert launch.cpu_work() == {}  # no CPU-only node type: plain CPU tasks, as on a laptop
        cpu = cluster.add_node(num_cpus=1, resources={launch.CPU_ONLY: 1})
        cluster.wait_for_nodes()
        task = ray.remote(num_cpus=1, **launch.cpu_work())(lambda: ray.get_runtime_context().get_node_id())
        assert set(ray.get([task.remote() for _ in range(4)])) == {cpu.node_id} != {gpu.node_id}
        prepare.check_shared(tmp_path / ".activations")  # a local --storage: every node sees the same folder
        assert not list((tmp_path / ".activations").iterdir())  # its marker is gone
    finally:
        ray.shutdown()
        cluster.shutdown()
