"""Studies end to end on real Ray Tune (local, loopback): Parquet schema, resume after kill -9,
GPU scheduling on a fake multi-node cluster, secrets, bad input (cluster.yaml: test_cluster.py)."""

from __future__ import annotations

import re
import subprocess

import clis
import pandas as pd
import pyarrow.parquet as pq
import pytest
from clis import cli_env
from shared_studies import METHODS, PLANTED

from study import schema

pytestmark = pytest.mark.integration
SECRET = PLANTED["HF_TOKEN"]
KILLED_STUDY = ["--backbones", "llama-tiny", "bert-tiny", "--max-model", "llama-tiny", "--methods", "full",
                "--task", "synthetic", "--trials-per-method", "3", "--epochs", "3", "--cost-runs", "none",
                "--batch-size", "16", "--confirm-seeds", "0", "--train-size", "128"]


def study_env() -> dict[str, str]:
    return cli_env(HF_TOKEN=SECRET)


def run_cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return clis.run_cli(module, *args, timeout=timeout, env=study_env())


def test_tiny_study_writes_exact_schema_and_no_secrets(tiny_study):
    """shared_studies.TINY_STUDY (4 methods × 2 tiny backbones, planned up to llama-70b), run once per session
    (the `tiny_study` fixture; test_secrets.py and test_analysis.py use the same run)."""
    out, tmp_path = tiny_study.proc, tiny_study.storage
    assert out.returncode == 0, out.stderr[-4000:]
    trials = pq.read_table(tmp_path / "scaling" / "trials.parquet")
    epochs = pq.read_table(tmp_path / "scaling" / "epochs.parquet")
    assert trials.schema.metadata[b"petl_study.schema_version"] == schema.SCHEMA_VERSION.encode()
    fixed = [n for n in trials.schema.names if not n.startswith("hp.")]
    assert fixed == schema.TRIAL_COLUMNS
    for f in schema.TRIAL_FIELDS:
        assert trials.schema.field(f.name).type == f.type, f.name
    assert epochs.schema.names == schema.EPOCH_COLUMNS
    everything = trials.to_pandas()
    planned, df = everything[everything.status == "estimated"], everything[everything.status != "estimated"]
    n_pairs = len(METHODS) * 2
    # the plan: one row per method × planned backbone (the two run here and the ladder up to llama-70b)
    assert {"llama-tiny", "bert-tiny", "llama-7b", "llama-70b"} <= set(planned.backbone)
    assert len(planned) == len(METHODS) * planned.backbone.nunique() and not planned.duplicated(["method", "backbone"]).any()
    assert (planned.params_trainable.gt(0) | planned.method.eq("probe")).all() and planned.params_head.gt(0).all()
    assert len(df) == n_pairs * 2 + n_pairs * 2  # 2 search trials, then the best re-run with 2 seeds, per pair
    assert set(df.status) == {"ok"}, df[["method", "backbone", "status", "error"]]
    assert df.groupby(["method", "backbone", "role"]).size().eq(2).all()
    assert df["hp.lr"].notna().all() and (df.params_trainable.gt(0) | df.method.eq("probe")).all()
    assert set(df.pooling) == {"last", "first"} and planned.pooling.notna().all()
    confirm = df[df.role == "confirm"]
    assert sorted(set(confirm.seed)) == [1, 2]  # fresh seeds; the search ran seed 0
    for (method, backbone), g in confirm.groupby(["method", "backbone"]):  # the winner's config, re-run
        search = df[(df.role == "search") & (df.method == method) & (df.backbone == backbone)]
        full = search[search.early_stopped.eq(False)]  # the column holds nulls for planned rows: object dtype
        pool = full if len(full) else search  # confirm.best_runs
        top = pool[pool.final_metric == pool.final_metric.max()]
        assert len(set(g["hp.lr"])) == 1 and set(g["hp.lr"]) <= set(top["hp.lr"]), (method, backbone)
    quality = pd.read_parquet(tmp_path / "scaling" / "quality.parquet")
    assert len(quality) == n_pairs and quality.seeds.eq(2).all() and quality.search_trials.eq(2).all()
    assert (quality.ci_low <= quality["mean"]).all() and (quality["mean"] <= quality.ci_high).all()
    assert "test: mean [95% t-CI]" in out.stdout and "search max (val)" in out.stdout
    predictions = pd.read_parquet(tmp_path / "scaling" / "predictions.parquet")  # the synthetic test split: 64
    assert len(predictions) == 64 * len(confirm) and set(predictions.trial_id) == set(confirm.trial_id)
    ep = pd.read_parquet(tmp_path / "scaling" / "epochs.parquet")
    assert ep.groupby("trial_id").epoch.max().le(2).all() and len(ep) >= len(df)
    # a planted secret in the environment appears in no file the study wrote
    for path in (tmp_path / "scaling").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"


def test_tiny_study_console_is_short_names_every_phase_and_ends_with_the_paths(tiny_study):
    """Issue 24: the console a person follows; Ray Tune's own per-trial output is in the study's log file."""
    out, folder = tiny_study.proc, tiny_study.storage / "scaling"
    assert out.returncode == 0, out.stderr[-4000:]
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) < 150, "\n".join(lines)
    log_file = folder / "logs" / "tune.log"
    assert f"Ray Tune's per-trial output: {log_file}" in "\n".join(out.stderr.splitlines()[:3])
    for phase in ("plan", "caches", "search", "confirm"):
        assert -1 < out.stderr.find(f"] {phase} started") < out.stderr.find(f"] {phase} done in "), phase
    n_pairs = len(METHODS) * 2
    assert re.search(rf"\] search {n_pairs * 2}/{n_pairs * 2} done · .*read best \d\.\d+ \(done\) · ", out.stderr)
    assert re.search(rf"\] confirm 1/{n_pairs * 2} done · ", out.stderr) and " 0 failed · " in out.stderr
    assert "Trial status:" not in out.stdout + out.stderr and "╭" not in out.stdout  # Ray's tables: in the log
    tail = out.stdout.rstrip().splitlines()[-4:]
    assert tail[0] == f"tables:    {folder}/{{trials.parquet,epochs.parquet,quality.parquet,evp.parquet,predictions.parquet}}"
    assert tail[1] == f"report:    python -m analysis.report --scaling {folder}  (make study runs it) -> {folder}/report.html"
    assert tail[2] == f"log:       {log_file}" and re.fullmatch(
        r"wall time: plan \S+ · caches \S+ · search \S+ · confirm \S+ · total \S+", tail[3]), tail
    log = log_file.read_text()
    assert log.count("started with configuration") >= n_pairs * 4  # every search and confirm trial's config
    assert "Trial status:" in log and "result" in log and "===== confirm started" in log


def test_verbose_puts_rays_tables_on_the_console_and_a_failed_trial_says_why(tmp_path, capfd):
    """`--verbose` (launch.run's verbose) and a trial failing at run time (an unknown task: checked before Ray
    in a study, not here), in one small in-process run."""
    import ray

    from study import launch, progress

    run = {"backbone": "llama-tiny", "method": "probe", "task": "synthetic", "epochs": 1, "train_size": 32,
           "max_length": 16, "batch_size": 16, "measure_memory": False}
    groups = [launch.Group("probe|llama-tiny", run, {}, 1), launch.Group("probe|broken", {**run, "task": "nope"}, {}, 1)]
    launch.init_ray(None, num_cpus=2)
    try:
        with progress.watch("search", groups, str(tmp_path), f"{tmp_path}/tune", verbose=True) as console:
            grid = launch.run(groups, str(tmp_path), callbacks=console, verbose=True, max_failures=0)
    finally:
        ray.shutdown()
    assert sorted(r.metrics["status"] for r in grid) == ["error", "ok"]  # the loop reports it as an outcome
    out, err = capfd.readouterr()
    assert "Trial status:" in out and "started with configuration" in out  # Ray's own tables, as before
    failed = [line for line in err.splitlines() if "search: trial probe-broken-" in line]
    assert len(failed) == 1 and re.search(r"failed \(error\): ValueError: unknown task 'nope'", failed[0]), err
    assert re.search(r"search 2/2 done · probe best \d\.\d+ \(done\) · 1 failed · finished", err), err
    log = (tmp_path / "logs" / "tune.log").read_text()
    assert log.count("started with configuration") == 2 and "unknown task 'nope'" in log and "Trial status:" in log


def test_driver_killed_before_tunes_first_snapshot_resumes_with_every_trial_once(tmp_path):
    """SIGKILL as soon as Tune starts: tuner.pkl is written, its first snapshot is not (planted: whatever of it
    reached storage is removed). Tune's own restore would "restart" with one trial and no budget (seen in CI);
    --resume starts the search over and runs every trial once. A kill after a snapshot: tests/integration/test_s3.py."""
    args = [*KILLED_STUDY, "--storage", str(tmp_path), "--no-memory-estimates", "--name", "resume"]
    exp = tmp_path / "resume" / "tune"
    clis.kill_when("study.scaling", *args, env=study_env(), ready=lambda: (exp / "tuner.pkl").exists(), grace_s=0)
    for prefix in ("experiment_state-", "search_gen_state-", "searcher-state-"):
        for f in exp.glob(f"{prefix}*"):
            f.unlink()
    killed = {d.name for d in exp.iterdir()}

    out = run_cli("study.scaling", *args, "--resume")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "holds no saved state" in out.stderr and "starts over" in out.stderr, out.stderr[-4000:]
    df = pd.read_parquet(tmp_path / "resume" / "trials.parquet").query("status != 'estimated'")
    assert len(df) == 2 * 3 and df.trial_id.is_unique, (df[["trial_id", "status"]], out.stderr[-3000:])
    assert set(df.status) == {"ok"}, df[["trial_id", "status", "error"]]
    assert not killed & {d.name for d in exp.glob("full-*")}  # the killed run's trial folders are gone
    ep = pd.read_parquet(tmp_path / "resume" / "epochs.parquet")
    assert not ep.duplicated(["trial_id", "epoch"]).any()
    # ASHA may stop a trial early, but every trial's epochs run 1..n exactly once and match its row
    runs = ep.groupby("trial_id").epoch.apply(list)
    assert all(e == list(range(1, len(e) + 1)) for e in runs), runs
    assert df.set_index("trial_id").epochs_run.sort_index().tolist() == runs.map(len).sort_index().tolist()


def test_gpu_trials_land_on_gpu_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from study import launch

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
    try:
        ray.init(address=cluster.address)
        run = {"backbone": "llama-tiny", "method": "read", "task": "synthetic", "epochs": 1, "train_size": 32,
               "max_length": 16, "batch_size": 16, "measure_memory": False}
        groups = [launch.Group("read|gpu", run, {}, 2, {"cpu": 1, "gpu": 1}),
                  launch.Group("read|cpu", run, {}, 1, {"cpu": 1})]
        grid = launch.run(groups, str(tmp_path), verbose=0)
        nodes = {r.config["group"]: set() for r in grid}
        for r in grid:
            assert r.error is None, r.error
            nodes[r.config["group"]].add(r.metrics["node_id"])
        assert nodes["read|gpu"] == {gpu_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("module,args,needle", [
    ("scaling", ["--methods", "nope"], "valid:"),
    ("scaling", ["--backbones", "gpt-17"], "valid:"),
    ("scaling", ["--task", "imdb-but-not-here"], "valid:"),
    ("scaling", ["--max-model", "llama-900b"], "valid:"),
    ("scaling", ["--storage", "/proc/no-such-dir"], "not writable"),
    ("scaling", ["--zero-ranks", "0"], "--zero-ranks must be 1 or more"),
    ("scaling", ["--epochs", "0"], "--epochs"),  # refused, not replaced by the default
    ("scaling", ["--batch-size", "0"], "--batch-size must be 1 or more"),
    ("scaling", ["--gpu-memory-gib", "-1"], "--gpu-memory-gib must be > 0"),
    ("convergence", ["--max-eval-examples", "0"], "--max-eval-examples"),
    ("convergence", ["--backbone", "llama-7b"], "no tokenizer for llama-7b"),
])
def test_bad_input_one_line_exit_2_nothing_written(module, args, needle, tmp_path, capsys):
    """In-process (the checks run before Ray starts); one case below runs as a real process."""
    import importlib

    from study import runner

    main = importlib.import_module(f"study.{module}").main
    code = runner.main_guard(lambda: main(["--storage", str(tmp_path / "r"), *args]))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_bad_input_exits_2_from_a_real_process(tmp_path):
    out = run_cli("study.scaling", "--storage", str(tmp_path / "r"), "--methods", "nope", timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error:") and out.stderr.count("\n") == 1, out.stderr
