"""Two processes on one node want a hub checkpoint that is not here yet: the first downloads it (a slow fake
download into a local hub cache; no network), the second starts while the first of its two shards is on disk,
waits for the download lock and gets the whole checkpoint, never half of it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from clis import ROOT, cli_env, kill_session

pytestmark = pytest.mark.integration
REPO = "petl-test/two-shards"

# The first process: huggingface_hub's download replaced by a slow writer of the hub cache's layout, shard 1,
# then (once the second process is about to look) shard 2 and, last, the index that lists both.
DOWNLOADER = """
import json, sys, time
from pathlib import Path
import huggingface_hub
from trainables import backbones

real, cache, signals = huggingface_hub.snapshot_download, Path(sys.argv[1]), Path(sys.argv[2])

def slow_download(repo_id, revision=None, local_files_only=False, **kw):
    if local_files_only:
        return real(repo_id, revision=revision, local_files_only=True, **kw)
    root, commit = cache / ("models--" + repo_id.replace("/", "--")), "0" * 40
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    (snap / "config.json").write_text("{}")
    (snap / "model-00001-of-00002.safetensors").write_bytes(b"1")
    (signals / "mid-download").touch()
    deadline = time.time() + 120
    while not (signals / "second-looks").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the second process is inside snapshot() by now
    (snap / "model-00002-of-00002.safetensors").write_bytes(b"2")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return str(snap)

huggingface_hub.snapshot_download = slow_download
print(sorted(p.name for p in backbones.snapshot(sys.argv[3]).iterdir()))
"""

# The second process: offline, so only the first one's download can give it the checkpoint.
SECOND = """
import sys, time
from pathlib import Path
from trainables import backbones

signals = Path(sys.argv[1])
deadline = time.time() + 120
while not (signals / "mid-download").exists() and time.time() < deadline:
    time.sleep(0.05)
(signals / "second-looks").touch()
start = time.time()
folder = backbones.snapshot(sys.argv[2])
print(sorted(p.name for p in folder.iterdir()), round(time.time() - start, 2))
"""


def test_a_second_process_waits_for_the_download_and_gets_every_shard(tmp_path):
    cache, signals = tmp_path / "hub", tmp_path / "signals"
    signals.mkdir()
    env = cli_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", DOWNLOADER, str(cache), str(signals), REPO], cwd=ROOT, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True),
             subprocess.Popen([sys.executable, "-c", SECOND, str(signals), REPO], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            kill_session(p.pid)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    every = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json"]
    assert json.loads(outs[0][0].strip().replace("'", '"')) == every
    files, waited = outs[1][0].strip().rsplit(" ", 1)
    assert json.loads(files.replace("'", '"')) == every  # not the first shard alone
    assert float(waited) >= 0.9  # it looked mid-download and waited for the download's lock
