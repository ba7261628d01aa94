"""Methods from the user's own code: a module path or an entry point registers a MethodInfo, the study checks
its contracts before any trial, and rows record its module, version and file hash (trainables.methods.external).

tests/example_method/petl_example_method.py is the documented example; broken copies of it are refused."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

import pytest

from study import spaces
from trainables.methods import REGISTRY, contracts, external

EXAMPLE = Path(__file__).resolve().parents[1] / "example_method" / "petl_example_method.py"


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Registrations, imported modules and the caches of this test do not outlive it (the contract table test
    checks that the registry holds exactly the built-ins)."""
    registry = dict(REGISTRY)
    monkeypatch.delenv(external.ENV_VAR, raising=False)
    external.provenance.cache_clear()
    external._distributions.cache_clear()
    yield
    REGISTRY.clear()
    REGISTRY.update(registry)
    for name in [m for m in sys.modules if m.startswith("petl_")]:  # the user modules these tests import
        del sys.modules[name]
    external.provenance.cache_clear()
    external._distributions.cache_clear()
    external.ENTRY_POINT_ERRORS.clear()


def _copy(tmp_path: Path, module: str, *edits: tuple[str, str]) -> str:
    """A copy of the example under another module name, with (old, new) text edits; returns the module name."""
    text = EXAMPLE.read_text().replace('name="pooled-lowrank"', f'name="{module.replace("_", "-")}"')
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / f"{module}.py").write_text(text)
    importlib.invalidate_caches()
    return module


def test_module_path_registers_checks_and_records_provenance(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    assert external.load_modules(["probe", "petl_example_method", "lora+gc"]) == ["probe", "pooled-lowrank", "lora+gc"]
    import os

    assert os.environ[external.ENV_VAR] == "petl_example_method"  # every process of the study imports it
    contracts.check(["pooled-lowrank"], ["bert-tiny"])  # a decoder and an encoder: passes
    prov = external.provenance("pooled-lowrank")
    assert prov == {"method_module": "petl_example_method", "method_version": "0.1.0",
                    "method_hash": hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()[:16]}
    assert external.provenance("lora")["method_module"] == "trainables.methods.lora"
    assert not external.is_builtin("pooled-lowrank") and external.is_builtin("lora")
    env = external.worker_runtime_env()
    assert env["env_vars"] == {external.ENV_VAR: "petl_example_method"}
    assert [m.__name__ for m in env["py_modules"]] == ["petl_example_method"]  # not installed: Ray ships the file
    assert set(spaces.space("pooled-lowrank", "llama")) == {"lr"}  # searched around its reference lr


def test_entry_point_of_an_installed_package(tmp_path, monkeypatch):
    """A pip-installed package: its dist-info declares the entry point and carries the version."""
    _copy(tmp_path, "petl_ep_method")
    info = tmp_path / "petl_ep_method-2.3.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: petl-ep-method\nVersion: 2.3.4\n")
    (info / "entry_points.txt").write_text("[petl_study.methods]\npetl-ep-method = petl_ep_method\n")
    (info / "top_level.txt").write_text("petl_ep_method\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    external.load_entry_points()
    assert "petl-ep-method" in REGISTRY
    assert external.provenance("petl-ep-method")["method_version"] == "2.3.4"  # the distribution's, not __version__


@pytest.mark.parametrize("edits,needle", [
    ([("        nn.init.zeros_(self.up.weight)  # the correction starts at zero: identity at init\n", "")],
     "identity_at_init=True"),
    ([('family="side"', 'family="graft"')], "family 'graft' but apply returned a PooledLowRank"),
    ([("identity_at_init=True", "identity_at_init=False"),
      ("self.classify(h + self.up(self.down(h))", "self.classify(h + torch.rand(()) + self.up(self.down(h))")],
     "forward_taps on the collected taps equals the live forward"),
    ([("        h = self.final_norm(taps.hidden[self.spec.n_layers].to(self.side_dtype))",
       "        h = self.final_norm(taps.hidden[self.spec.n_layers].to(self.side_dtype))\n"
       "        self.backbone.requires_grad_(True)")], "every trainable parameter gets a gradient"),
    ([("reference_lr=1e-2", "reference_lr=0.0")], "reference_lr must be > 0"),
    ([("@dataclass(frozen=True)", "@dataclass")], "config_cls must be a frozen dataclass"),
])
def test_broken_copies_are_refused_naming_the_contract(edits, needle, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    [name] = external.load_modules([_copy(tmp_path, "petl_broken_method", *edits)])
    with pytest.raises(contracts.ContractError) as err:
        contracts.check([name])
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("source,needle", [
    ("x = 1\n", "registers no method: it must call"),
    ("raise RuntimeError('boom')\n", "importing it raised RuntimeError: boom"),
])
def test_module_that_registers_nothing_or_fails_to_import(source, needle, tmp_path, monkeypatch):
    (tmp_path / "petl_empty_method.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as err:
        external.load_modules(["petl_empty_method"])
    assert needle in str(err.value)
    with pytest.raises(ValueError, match="cannot import it"):
        external.load_modules(["no_such_pkg.method"])


@pytest.mark.parametrize("name", ["probe", "lora"])
def test_builtins_meet_the_same_check(name):
    contracts.check_method(name)
