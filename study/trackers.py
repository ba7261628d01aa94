"""`--log mlflow wandb tensorboard`: the trackers researchers watch studies in, through Ray Tune's own callbacks.

Every trial becomes one tracked run: its config (the group, the searched values, the whole run config)
as parameters, and every epoch's result as metrics at step = epoch. The study name is the MLflow
experiment and the W&B project; the W&B group is Tune's experiment folder name, `tune` in both the search
and the confirm phase (the same trackers see both). Where each writes:

- **mlflow**: `MLFLOW_TRACKING_URI` when set (the researcher's own server or database; read by MLflow from
  the environment, never stored with the experiment); otherwise a file
  store in `<study>/mlruns`, no server needed. Read it with MLflow's client or UI (the file store is in
  maintenance mode in MLflow 3, which then asks for `MLFLOW_ALLOW_FILE_STORE=true`):
  `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <study>/mlruns`.
- **wandb**: W&B's own settings (`WANDB_API_KEY` or `wandb login`; `WANDB_MODE=offline` writes runs
  locally for `wandb sync` later); its local files go to `<study>/wandb`.
- **tensorboard**: event files in every trial's folder, `tensorboard --logdir <study>/tune`.

For a cloud storage (`s3://`), the MLflow file store and W&B's files are written in a local folder and
uploaded to `<study>/mlruns` and `<study>/wandb` when each Tune experiment ends (also when stopped); a
resumed study first downloads them, so its runs continue. Credentials are never an attribute of a
callback (Tune pickles callbacks into the experiment) nor in a Ray runtime_env (Ray's agent logs those):
the W&B key reaches its logging actor as an argument, and only when W&B runs online.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from study.storage import Location, StorageError

TRACKERS = ("mlflow", "wandb", "tensorboard")
CLIENTS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboardX"}  # the package each one needs
MLFLOW_DIR, WANDB_DIR = "mlruns", "wandb"  # under the study folder
OFFLINE_MODES = ("offline", "disabled", "dryrun")


def check(names: Sequence[str]) -> None:
    """Before Ray: each tracker's client is installed, and W&B online has credentials (ValueError, one line)."""
    for name in dict.fromkeys(names):
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r} for --log; valid: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(CLIENTS[name]) is None:
            raise ValueError(f"--log {name} needs the {CLIENTS[name]} package: pip install 'petl-study[trackers]'")
    if "wandb" in names and not wandb_offline() and not os.environ.get("WANDB_API_KEY"):
        import wandb

        if not wandb.login(prompt=False, verify=False):  # a key from `wandb login` (~/.netrc); no network
            raise ValueError("--log wandb: no W&B credentials; export WANDB_API_KEY (or run `wandb login`), "
                             "or set WANDB_MODE=offline to keep the runs local (`wandb sync` them later)")


def wandb_offline(mode: str | None = None) -> bool:
    """W&B writes locally only (WANDB_MODE, or the `mode` given to wandb.init): no key is needed or passed."""
    return (mode if mode is not None else os.environ.get("WANDB_MODE", "")).lower() in OFFLINE_MODES


def callbacks(names: Sequence[str], study: str, folder: str) -> list[tune.Callback]:
    """The Tune callbacks for `--log NAMES` of the study `study` stored in `folder` (local or cloud)."""
    names = list(dict.fromkeys(names))
    if not names:
        return []
    from study import tracker_callbacks as tc  # MLflow's and W&B's Ray integrations take seconds to import

    loc = Location.of(folder)
    staged = loc.local_path if loc.local else Path(tempfile.mkdtemp(prefix="petl-trackers-"))
    out: list[tune.Callback] = []
    for name in names:
        if name == "mlflow":  # the researcher's URI may hold a password: MLflow reads it from the environment
            uri = None if os.environ.get("MLFLOW_TRACKING_URI") else (staged / MLFLOW_DIR).as_uri()
            out.append(tc.MLflow(tracking_uri=uri, experiment_name=study, tags={"study": study}))
        elif name == "wandb":
            if wandb_offline():  # Ray's W&B callback knows only these two spellings of offline
                os.environ["WANDB_MODE"] = "disabled" if os.environ["WANDB_MODE"].lower() == "disabled" else "offline"
            mode = {"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}
            out.append(tc.Wandb(project=study, dir=str(staged), **mode))
        else:
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
    file_store = "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI")
    synced = [d for d, used in ((MLFLOW_DIR, file_store), (WANDB_DIR, "wandb" in names)) if used]
    if not loc.local and synced:
        for d in synced:  # a resumed study's runs continue where they are
            if (loc / d).exists():
                _copy(loc / d, Location.of(staged / d))
        upload = Upload(str(staged), loc.uri, synced)
        atexit.register(upload.close)
        out.append(upload)  # last: after W&B's actors have finished writing
    return out


def _copy(src: Location, dst: Location) -> None:
    try:
        dst.fs.create_dir(dst.path, recursive=True)  # a local destination needs its folders; S3 has none
        pafs.copy_files(src.path, dst.path, source_filesystem=src.fs, destination_filesystem=dst.fs,
                        use_threads=False)
    except OSError as e:
        raise StorageError(f"cannot copy {src.uri} to {dst.uri}: {e}") from None


class Upload(tune.Callback):
    """Copies the trackers' local folders into the study's cloud storage when a Tune experiment ends; at the
    driver's exit the local copy goes if all of it was uploaded, else it stays and a line says where."""

    def __init__(self, staged: str, study: str, folders: Sequence[str]):
        self.staged, self.study, self.folders = staged, study, list(folders)
        self.uploaded = False

    def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
        self.uploaded = False

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for d in self.folders:
            if (Path(self.staged) / d).exists():
                _copy(Location.of(Path(self.staged) / d), Location.of(self.study) / d)
        self.uploaded = True

    def close(self) -> None:
        if self.uploaded:
            shutil.rmtree(self.staged, ignore_errors=True)
        elif Path(self.staged).exists():
            print(f"tracker files not uploaded to {self.study}: kept in {self.staged}", file=sys.stderr)
