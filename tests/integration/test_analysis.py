"""The analysis notebooks end to end: two small real studies, then `python -m analysis.report` on them.

The studies run once per session (shared_studies.py: the tiny scaling study, planned up to
llama-70b so the parameter-scaling notebook sees every registered size, which test_study.py
and test_secrets.py check too, and a convergence study, both at once); the
report executes every notebook with papermill and must leave one well-formed verdict per
claim, the figures, and executed copies that ran on this interpreter.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import browser
import nbformat
import pytest
from clis import ROOT, run_cli
from jupyter_client.kernelspec import KernelSpecManager
from PIL import Image

from analysis import claims, html, report

pytestmark = pytest.mark.integration
FIGURES = {"01_parameter_scaling": ["parameter_scaling.png"], "02_convergence": ["convergence.png"],
           "03_memory_energy": ["memory_energy.png"], "04_quality_per_cost": ["pareto_memory.png", "pareto_params.png"]}


@pytest.fixture(scope="session")
def studies(shared_runs) -> dict[str, Path]:
    """shared_studies.py's two studies (conftest.py runs them once per session, at once)."""
    for module, run in shared_runs.items():
        assert run.proc.returncode == 0, f"study.{module} failed:\n{run.proc.stderr[-4000:]}"
    return {"scaling": shared_runs["scaling"].storage / "scaling",
            "convergence": shared_runs["convergence"].storage / "convergence"}


@pytest.fixture(scope="session")
def reported(studies) -> dict[str, Path]:
    out = run_cli("analysis.report", "--scaling", str(studies["scaling"]),
                  "--convergence", str(studies["convergence"]), timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "read-params-flat" in out.stdout
    return studies


def where(name: str, dirs: dict[str, Path]) -> Path:
    return dirs[report.NOTEBOOKS[name][0]]


@pytest.mark.parametrize("name", list(report.NOTEBOOKS))
def test_notebook_executes_on_the_venv_kernel(reported, name):
    folder = where(name, reported)
    book = nbformat.read(folder / "notebooks" / f"{name}.ipynb", as_version=4)
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"kernel: {sys.executable}" in text
    injected = [c for c in book.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and str(folder) in injected[0].source
    for png in FIGURES[name]:
        assert (folder / png).stat().st_size > 5_000, png


def test_verdicts_json_has_a_well_formed_entry_per_claim(reported):
    entries = [e for d in reported.values() for e in json.loads((d / "verdicts.json").read_text(encoding="utf-8"))]
    assert all(claims.verdict_problems(e) == [] for e in entries), entries
    expected = {claims.PARAMS_CLAIM, claims.CONVERGENCE_CLAIM, claims.FLOOR_CLAIM, *(c.claim for c in claims.COST_CLAIMS)}
    assert {e["claim"] for e in entries} == expected
    # counts are exact and planned up to llama-70b: these verdicts do not depend on training noise
    params = {e["details"]["axis"]: e for e in entries if e["claim"] == claims.PARAMS_CLAIM
              and e["details"].get("family") == "llama"}
    assert params["depth"]["verdict"] == claims.SUPPORTED and params["depth"]["n"] == 5
    assert params["width"]["verdict"] == claims.NOT_SUPPORTED and params["width"]["details"]["linear_fit"]["r2"] > 0.999
    by = {(e["claim"], e["scope"]): e["verdict"] for e in entries}
    assert by[("read-energy-84", "source=nvml")] == claims.NO_DATA  # CPU: no energy meter
    assert by[("lst-memory-69", "source=tracked")] == claims.NO_DATA  # LST not in these studies
    conv = [e for e in entries if e["claim"] == claims.CONVERGENCE_CLAIM]
    assert sorted(e["details"]["train_size"] for e in conv) == [32, 64]
    assert all(e["details"]["comparator"] == "lora" for e in conv)
    # 2 seeds: 2 pairs; a cell where no method beat chance (a tiny random backbone) has no threshold: no data
    assert all(e["n"] == 2 if e["verdict"] != claims.NO_DATA else "no threshold" in e["details"]["summary"]
               for e in conv), conv


def visible(shot: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    x, y, w, h = box
    return shot.crop((int(x), int(y), int(x + w), int(y + h))).convert("RGB")


@pytest.mark.parametrize("study", ["scaling", "convergence"])
def test_report_html_in_headless_chromium(reported, study, tmp_path):
    """report.html as a person sees it: loads with no console error, every verdict a table row, every figure
    decoded and drawn; the screenshot covers the whole page and shows the verdict badges and the figures."""
    folder = reported[study]
    verdicts = claims.read_verdicts(folder)
    pngs = sorted(p.name for p in folder.glob("*.png"))
    page = browser.render(folder / "report.html", evaluate={
        "rows": "document.querySelectorAll('table.verdicts tbody tr').length",
        "summary_rows": "document.querySelectorAll('table.summary tbody tr').length",
        "images": "[...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.getBoundingClientRect().x,"
                  " i.getBoundingClientRect().y + scrollY, i.getBoundingClientRect().width,"
                  " i.getBoundingClientRect().height])",
        "table": "(r => [r.x, r.y + scrollY, r.width, r.height])"
                 "(document.querySelector('table.verdicts').getBoundingClientRect())",
        "external": "[...document.querySelectorAll('[src],[href]')].map(e => e.src || e.href)"
                    ".filter(u => !u.startsWith('data:'))"})
    assert page.errors == [], page.errors
    assert page.found["rows"] == len(verdicts) > 0 and page.found["summary_rows"] > 0
    assert page.found["external"] == []
    images = page.found["images"]
    assert [i[0] for i in images] == pngs and all(i[1] and i[2] > 100 for i in images), images
    shot = Image.open(io.BytesIO(page.screenshot))
    shot.save(tmp_path / "report.png")  # for a person to look at
    assert shot.size == page.size and shot.height > images[-1][4]  # the whole page, the last figure included
    table = visible(shot, page.found["table"])
    colours = set(table.getdata())
    shown = {v["verdict"] for v in verdicts}
    for verdict in shown:  # each kind of verdict present shows its badge's colour in the table
        hex_colour = html.VERDICT_COLOURS[verdict]
        assert tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)) in colours, verdict
    for name, *_, x, y, w, h in images:  # each figure drawn: its area is not blank
        region = visible(shot, (x, y, w, h))
        assert len(set(region.getdata())) > 50, name


def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    """The checks above are not vacuous: a console error is reported, an undecodable image has no width."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><script>console.error("planted failure")</script>'
                   '<img src="data:image/png;base64,AAAA"></body></html>')
    page = browser.render(bad, evaluate={"widths": "[...document.images].map(i => i.naturalWidth)"})
    assert any("planted failure" in e for e in page.errors), page.errors
    assert page.found["widths"] == [0]


def test_stored_notebooks_have_no_outputs_and_a_parameters_cell():
    for path in sorted((ROOT / "analysis").glob("*.ipynb")):
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, path.name
    assert sorted(p.stem for p in (ROOT / "analysis").glob("*.ipynb")) == sorted(report.NOTEBOOKS)


def test_kernel_is_this_interpreter_even_with_a_stale_python3_kernelspec(tmp_path, monkeypatch):
    decoy = tmp_path / "kernels" / "python3"
    decoy.mkdir(parents=True)
    decoy.joinpath("kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "stale", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == "/nonexistent/python3"
    with report.venv_kernel() as name:
        assert KernelSpecManager().get_kernel_spec(name).argv[0] == sys.executable
    assert os.environ["JUPYTER_PATH"] == str(tmp_path)


def test_report_reads_a_study_from_s3_and_writes_back_there(studies, monkeypatch):
    from clis import cli_env
    from s3server import moto_s3

    from study.storage import Location

    with moto_s3("petl") as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        remote = Location.of("s3://petl/report/scaling")
        for table in ("trials.parquet", "epochs.parquet"):
            (remote / table).upload(studies["scaling"] / table)
        out = run_cli("analysis.report", "--scaling", remote.uri, timeout=300, env=cli_env(**env))
        assert out.returncode == 0, out.stderr[-4000:]
        assert "read-params-flat" in out.stdout
        assert "WARNING" not in out.stderr, out.stderr  # e.g. the kernel's about unencrypted TCP: it runs over IPC
        stored = {"verdicts.json", "report.html", "notebooks/01_parameter_scaling.ipynb", *FIGURES["01_parameter_scaling"],
                  *FIGURES["04_quality_per_cost"]}
        assert all((remote / name).is_file() for name in stored), remote.list()
        assert {e["claim"] for e in (remote / "verdicts.json").read_json()} >= {claims.PARAMS_CLAIM}
        missing = run_cli("analysis.report", "--scaling", "s3://petl/report/none", timeout=120, env=cli_env(**env))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].endswith(
        "no trials.parquet in s3://petl/report/none"), missing.stderr
