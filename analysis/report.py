"""`python -m analysis.report --scaling DIR --convergence DIR`: every notebook, executed with papermill.

Executed copies go to `<DIR>/notebooks/`; the notebooks write `verdicts.json` and the
PNG figures next to the Parquet they read. Then the verdicts are printed as a table.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from study import schema

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
    with venv_kernel() as kernel:
        pm.execute_notebook(str(HERE / f"{name}.ipynb"), str(out), parameters=parameters, kernel_name=kernel,
                            cwd=str(ROOT), progress_bar=False, execution_timeout=timeout_s)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scaling", type=Path, help="a study.scaling results folder (holds trials.parquet)")
    p.add_argument("--convergence", type=Path, help="a study.convergence results folder")
    args = p.parse_args(argv)
    dirs = [d for d in (args.scaling, args.convergence) if d is not None]
    if not dirs:
        p.error("give --scaling DIR and/or --convergence DIR")
    for d in dirs:
        if not (d / "trials.parquet").is_file():
            p.error(f"no trials.parquet in {d}")
        try:  # before any notebook starts: a broken table is one line, not a kernel traceback
            for table in ("trials.parquet", "epochs.parquet"):
                if (d / table).exists():
                    schema.read(d / table)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            p.error(str(e) if str(d / table) in str(e) else f"{d / table}: {e}")
    scaling = args.scaling.resolve() if args.scaling else None
    convergence = args.convergence.resolve() if args.convergence else None
    for out in run_all(scaling, convergence):
        print(f"executed {out}", file=sys.stderr)
    print("\n".join(verdict_lines([d.resolve() for d in dict.fromkeys(dirs)])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
