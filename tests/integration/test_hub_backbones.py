"""Hub ids end to end, offline: a real checkpoint in the hub's cache layout, and plans at Llama-7B scale.

The checkpoint is a tiny Llama saved by transformers with the real SmolLM2 tokenizer, laid
out under a temporary HF_HOME exactly as `huggingface_hub` stores downloads (refs/main +
snapshots/<commit>/); the trial runs in its own process with HF_HUB_OFFLINE=1 and loads it
by hub id through the project's normal path (no mock of from_pretrained).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from clis import cli_env, run_cli

from trainables import backbones

pytestmark = pytest.mark.integration
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home: Path) -> Path:
    """A tiny Llama checkpoint at test-org/tiny-llama, main = COMMIT, in HF_HOME's hub cache."""
    repo = home / "hub" / "models--test-org--tiny-llama"
    snap = repo / "snapshots" / COMMIT
    torch.manual_seed(0)
    backbones.build("llama-tiny", "cpu").save_pretrained(snap)
    tokenizer = backbones.source("smollm2-135m", backbones.TOKENIZER_PATTERNS).folder
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / f, snap / f)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def test_a_hub_checkpoint_trains_by_hub_id_offline(tmp_path):
    hub_cache(tmp_path / "hf")
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    common = ["--method", "read", "--task", "vader-movies", "--train-size", "24", "--epochs", "1", "--max-length",
              "16", "--batch-size", "8", "--weights", "pretrained", "--device", "cpu", "--json",
              "--run", "max_eval_examples=16", "--run", f"cache_dir={tmp_path / 'cache'}"]
    proc = run_cli("trainables.loop", "--backbone", "hf:test-org/tiny-llama", "--out", str(tmp_path / "run"),
                   *common, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["backbone"] == "hf:test-org/tiny-llama"
    assert summary["backbone_revision"] == COMMIT and summary["backbone_family"] == "llama"
    # a revision that is not in the cache, offline: one line, exit 2, no output folder
    bad = run_cli("trainables.loop", "--backbone", "hf:test-org/tiny-llama@v2", "--out", str(tmp_path / "bad"),
                  *common, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "HF_HUB_OFFLINE is set; offline backbones here: smollm2-135m" in bad.stderr
    assert not (tmp_path / "bad").exists()


def dry_run(tmp_path: Path, *flags: str) -> dict:
    # --quick: the ladder is only its anchor (--max-model), so the plan is these two backbones
    proc = run_cli("study.scaling", "--quick", "--max-model", "llama-13b", "--backbones", "llama-7b", "llama-13b",
                   "--methods", "read", "lora", "full", "--storage", str(tmp_path), "--batch-size", "8", "--max-length", "64",
                   "--dry-run", "--json", *flags, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} <= {".plan-cache.json"}  # a dry run writes no study
    return {(p["method"], p["backbone"]): p for p in json.loads(proc.stdout)["pairs"]}


def test_plans_follow_the_gpu_budget(tmp_path):
    estimated, counted = tmp_path / "estimated", tmp_path / "counted"  # one --storage (and plan cache) each
    estimated.mkdir()
    counted.mkdir()
    # the counts-only plan needs no estimates: it runs beside the first plan, which fills the plan cache
    with ThreadPoolExecutor(2) as pool:
        plans = [pool.submit(dry_run, estimated, "--gpu-memory-gib", "80"),
                 pool.submit(dry_run, counted, "--no-memory-estimates")]
        big, cpu = (p.result() for p in plans)
    assert big["read", "llama-7b"]["runnable"] and big["lora", "llama-7b"]["runnable"]
    assert {big[m, "llama-7b"]["weights"] for m in ("read", "lora")} == {"pretrained"}
    assert big["read", "llama-7b"]["dtype"] == "bf16" and big["read", "llama-7b"]["where"] == "gpu"
    assert not big["full", "llama-7b"]["runnable"] and "graft method" in big["full", "llama-7b"]["reason"]

    small = dry_run(estimated, "--gpu-memory-gib", "24")  # estimates reused from the plan cache
    assert small["read", "llama-7b"]["where"] == "gpu"  # fits as it is
    assert small["read", "llama-13b"]["where"] == "gpu + ZeRO-3" and small["read", "llama-13b"]["zero"]
    assert small["read", "llama-13b"]["peak_bytes"] < 24 * 2**30
    lora13 = small["lora", "llama-13b"]
    assert not lora13["runnable"] and "> 21.1 GiB per GPU" in lora13["reason"] and "graft" in lora13["reason"]

    if not torch.cuda.is_available():  # no GPU: llama-7b and -13b are estimated only, each with its reason
        assert set(cpu) == set(big) and not any(p["runnable"] for p in cpu.values())
        assert all("too slow on cpu" in p["reason"] for p in cpu.values())
        assert {p["where"] for p in cpu.values()} == {"estimated only"}
