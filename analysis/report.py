"""`python -m analysis.report --scaling DIR --convergence DIR`: every notebook, executed with papermill.

DIR is a study's folder or its URI (`s3://bucket/prefix/scaling`, where `--storage` put it).
Executed copies go to `<DIR>/notebooks/`; the notebooks write `verdicts.json` and the
PNG figures next to the Parquet they read. Then `report.html` (analysis.html: the verdicts, the
summary with its intervals and every figure, in one self-contained page) is written into each
study folder, and the verdicts are printed as a table.
The kernel is always this interpreter (see `venv_kernel`), so running the CLI with
`.venv/bin/python` uses the venv's ipykernel without registering anything globally.
Plain papermill works too, from the repository root (so `analysis` imports):
`.venv/bin/papermill -k python3 analysis/02_convergence.ipynb out.ipynb -p results_dir DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from study import progress, schema
from study.storage import Location, StorageError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL = "python3"
# notebook → which study directories it reads (its papermill parameters)
NOTEBOOKS: dict[str, tuple[str, ...]] = {
    "01_parameter_scaling": ("scaling",),
    "02_convergence": ("convergence",),
    "03_memory_energy": ("scaling", "convergence"),
    "04_quality_per_cost": ("scaling",),
}


@contextmanager
def venv_kernel() -> Iterator[str]:
    """Make kernel "python3" start `sys.executable` with the project importable, for this process only.

    jupyter_client resolves "python3" through the kernelspec directories, JUPYTER_PATH
    first; a user-level spec left by another Python would otherwise win (and the venv's
    own spec says plain "python", found on PATH). A temporary spec at the front of
    JUPYTER_PATH pins the interpreter; it is removed afterwards, nothing is installed.
    """
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PYTHONPATH")}
    with tempfile.TemporaryDirectory(prefix="analysis-kernel-") as tmp:
        spec = Path(tmp) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        spec.joinpath("kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python 3 ({sys.prefix})", "language": "python"}))
        for key, first in (("JUPYTER_PATH", tmp), ("PYTHONPATH", str(ROOT))):
            os.environ[key] = os.pathsep.join(p for p in (first, saved[key]) if p)
        try:
            yield KERNEL
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_notebook(name: str, parameters: dict[str, Any], out_dir: Path, timeout_s: int = 600) -> Path:
    """Execute one notebook into `<out_dir>/notebooks/<name>.ipynb` (the stored one stays output-free)."""
    import papermill as pm  # heavy; only when notebooks actually run

    out = out_dir / "notebooks" / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    from traitlets.config import Config

    with venv_kernel() as kernel:  # IPC: the kernel talks over local sockets, not unencrypted loopback TCP
        pm.execute_notebook(str(HERE / f"{name}.ipynb"), str(out), parameters=parameters, kernel_name=kernel,
                            cwd=str(ROOT), progress_bar=False, execution_timeout=timeout_s,
                            config=Config({"KernelManager": {"transport": "ipc"}}))
    return out


def run_all(scaling: Path | None, convergence: Path | None) -> list[Path]:
    """Every notebook whose studies were given; returns the executed copies."""
    dirs = {"scaling": scaling, "convergence": convergence}
    done = []
    for name, needs in NOTEBOOKS.items():
        given = [dirs[k] for k in needs if dirs[k] is not None]
        if not given:
            continue
        if len(needs) == 1:
            params: dict[str, Any] = {"results_dir": str(given[0])}
        else:
            params = {f"{k}_dir": str(dirs[k]) if dirs[k] is not None else "" for k in needs}
        print(f"running {name} on {', '.join(map(str, given))}", file=sys.stderr, flush=True)
        done.append(run_notebook(name, params, given[0]))
    return done


def verdict_lines(dirs: list[Path]) -> list[str]:
    from analysis import claims

    lines = []
    for d in dirs:
        for e in claims.read_verdicts(d):
            lines.append(f"{e['verdict']:<14} {e['claim']:<36} {e['scope']:<48} {e['details'].get('summary', '')}")
    return lines


def write_html(d: Path, where: str | None = None) -> Path:
    """`<d>/report.html` (analysis.html): the verdicts the notebooks wrote, the summary with its intervals
    (quality.parquet, else computed from the trials as the study computes it) and every figure in `d`."""
    from datetime import UTC, datetime

    from analysis import claims, html

    trials = claims.read_trials(d)
    if (d / "quality.parquet").is_file():
        quality = schema.read(d / "quality.parquet").to_pandas()
    else:  # a convergence study writes none: its confirm runs are summarised the same way
        quality = claims.quality(trials)
    rows = [{k: None if v is None or (isinstance(v, float) and v != v) else v for k, v in r.items()}
            for r in quality.to_dict("records")]
    studies = sorted(str(s) for s in trials["study"].dropna().unique()) or [d.name]
    ran = trials[trials["status"] != "estimated"]
    counts = ", ".join(f"{n} {s}" for s, n in ran["status"].value_counts().items())
    meta = [f"{where or d} · {len(ran)} trials ({counts}) · written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"]
    figures = [(f.name, f.read_bytes()) for f in sorted(d.glob("*.png"))]
    text = html.page(f"petl-study: {', '.join(studies)}", claims.read_verdicts(d), rows, figures, meta)
    out = d / "report.html"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


@contextmanager
def staged(where: str) -> Iterator[Path]:
    """A local folder with the study's results: the folder itself, or for a cloud URI (s3://...) a
    local copy whose new files (verdicts, figures, executed notebooks) are uploaded back, atomically
    each, once every notebook has run. Notebooks and claims then read and write plain files."""
    loc = Location.of(where)
    if loc.local:
        yield loc.local_path
        return
    with tempfile.TemporaryDirectory(prefix="analysis-report-") as tmp:
        folder = Path(tmp)
        for name in ("trials.parquet", "epochs.parquet", "quality.parquet", "predictions.parquet", "evp.parquet",
                     "verdicts.json"):
            if (loc / name).is_file():
                (loc / name).download(folder / name)
        yield folder
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix != ".parquet":
                (loc / path.relative_to(folder).as_posix()).upload(path)


def check_tables(d: Path, given: str) -> str | None:
    """Why the results folder cannot be reported on (one line), or None."""
    if not (d / "trials.parquet").is_file():
        return f"no trials.parquet in {given}"
    for table in ("trials.parquet", "epochs.parquet"):
        try:  # before any notebook starts: a broken table is one line, not a kernel traceback
            if (d / table).exists():
                schema.read(d / table)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            return str(e) if str(d / table) in str(e) else f"{given}/{table}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scaling", help="a study.scaling results folder or URI (holds trials.parquet)")
    p.add_argument("--convergence", help="a study.convergence results folder or URI")
    args = p.parse_args(argv)
    given = {k: v for k in ("scaling", "convergence") if (v := getattr(args, k)) is not None}
    if not given:
        p.error("give --scaling DIR and/or --convergence DIR")
    with ExitStack() as stack:
        try:
            local = {k: stack.enter_context(staged(v)) for k, v in given.items()}
        except StorageError as e:
            p.error(str(e))
        for k, d in local.items():
            if (problem := check_tables(d, given[k])) is not None:
                p.error(problem)
        with progress.phase("report", "the analysis notebooks, executed with papermill"):
            for out in run_all(local.get("scaling"), local.get("convergence")):
                print(f"executed {out}", file=sys.stderr)
        for k, d in local.items():  # a bucket's study: uploaded with the figures as the staging ends
            print(f"wrote {given[k].rstrip('/')}/{write_html(d, given[k]).name}", file=sys.stderr)
        print("\n".join(verdict_lines(list(dict.fromkeys(local.values())))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
