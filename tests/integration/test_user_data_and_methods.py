"""The researcher's own data and method: a quick study on a hub dataset (laid out as a hub cache, HF_HUB_OFFLINE=1)
with the example method from tests/example_method, tracked with `--log mlflow wandb` (W&B offline, a key planted),
and a broken copy of that method refused before Ray.

The study's driver finds the method by a sys.path entry its Ray workers do not have: the workers import it from
the copy Ray ships in the runtime_env (trainables.methods.external), the way a cluster's nodes get it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import hub_cache
import pyarrow.parquet as pq
import pytest
from clis import ROOT, cli_env, kill_session, leaks
from shared_studies import PLANTED
from test_trackers import tracked

from study import runner, scaling
from trainables.methods import REGISTRY, external

EXAMPLE = ROOT / "tests" / "example_method" / "petl_example_method.py"
TASK = f"hf:{hub_cache.VADER}:sentiment"


def quick_study_args(storage: Path) -> list[str]:
    return ["--backbones", "llama-tiny", "--max-model", "llama-tiny", "--methods", "petl_example_method",
            "--task", TASK, "--trials-per-method", "1", "--epochs", "1", "--cost-runs", "none",
            "--confirm-seeds", "0", "--train-size", "64", "--no-memory-estimates", "--storage", str(storage),
            "--name", "hub", "--log", "mlflow", "wandb"]


@pytest.mark.integration
def test_quick_study_on_a_hub_dataset_with_an_external_method(tmp_path):
    hub_cache.build(tmp_path / "hf" / "hub", n=200)
    # W&B offline (tests/conftest.py) with a key planted: it must land in no file the study writes
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
                  WANDB_API_KEY=PLANTED["WANDB_API_KEY"])
    code = (f"import sys; sys.path.insert(0, {str(EXAMPLE.parent)!r}); from study import runner, scaling; "
            f"raise SystemExit(runner.main_guard(lambda: scaling.main({quick_study_args(tmp_path / 'r')!r})))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    assert "no labelled test split on the hub; test = a fixed stratified 10% of train" in err
    rows = pq.read_table(tmp_path / "r" / "hub" / "trials.parquet").to_pylist()
    ran = [r for r in rows if r["status"] != "estimated"]
    assert [r["status"] for r in ran] == ["ok"] and ran[0]["method"] == "pooled-lowrank"
    assert ran[0]["dataset_revision"] == hub_cache.REVISION and ran[0]["task"] == f"{TASK}@{hub_cache.REVISION}"
    digest = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()[:16]
    for r in rows:  # the planned row too
        assert (r["method_module"], r["method_version"], r["method_hash"]) == ("petl_example_method", "0.1.0", digest)
    counts = tracked(tmp_path / "r" / "hub", wandb=True)  # MLflow's client reads the run and its epoch back
    assert counts == {"runs": 1, "epochs": 1, "wandb_runs": 1}, counts
    planted = {"WANDB_API_KEY": PLANTED["WANDB_API_KEY"]}
    assert not leaks(tmp_path / "r", planted) and PLANTED["WANDB_API_KEY"] not in out + err


@pytest.mark.integration
def test_broken_method_refused_before_ray(tmp_path, monkeypatch, capsys):
    import ray

    broken = EXAMPLE.read_text().replace("        nn.init.zeros_(self.up.weight)", "        pass")
    (tmp_path / "petl_example_method.py").write_text(broken)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "petl_example_method", raising=False)
    monkeypatch.delenv(external.ENV_VAR, raising=False)  # load_modules sets it: restored after the test
    before = dict(REGISTRY)
    try:
        code = runner.main_guard(lambda: scaling.main(quick_study_args(tmp_path / "r")))
    finally:
        REGISTRY.clear()
        REGISTRY.update(before)
        sys.modules.pop("petl_example_method", None)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "kernels" not in ln]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: method 'pooled-lowrank' on llama-tiny breaks the contract: identity_at_init")
    assert not ray.is_initialized() and not (tmp_path / "r" / "hub").exists()
