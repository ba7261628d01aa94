"""Per-method search spaces (Optuna distributions), centred on each method's reference learning rate.

Every method gets the learning rate (log-uniform, a factor `lr_span` either side of its
reference on the backbone's family, `MethodInfo.lr_for`; the method module cites the paper
or code each value comes from) plus its capacity knob, and the study gives every method the
same number of trials, so comparisons after tuning are fair. Keys without a prefix are trial
settings (RunConfig fields); `m.<key>` keys go to the method's config.

Side methods at this study's batch size (16, not the LST repo's 100) were checked with an lr
sweep on MiniLM-L6 (vader-movies, 1,000 examples, 4 epochs = 252 steps; figures in issue 13's
closing note): READ 0.732 / 0.746 / 0.774 / 0.758 at 1e-4 / 3e-4 / 1e-3 / 3e-3; LST 0.772 / 0.758 /
0.736 at 3e-4 / 1e-3 / 3e-3 (hence LST and SHERL centred at 1e-3, not the batch-100 3e-3); the
probe 0.698 / 0.700 / 0.710 / 0.708 at 1e-3 / 3e-3 / 1e-2 / 3e-2. Every best lies inside its range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from trainables.methods import external, get_method

_CAPACITY: dict[str, dict[str, BaseDistribution]] = {
    "full": {},
    "bitfit": {},
    "ia3": {},
    "probe": {},
    "lora": {"m.r": CategoricalDistribution([4, 8, 16])},
    "adapter": {"m.reduction_factor": CategoricalDistribution([8, 16, 32])},
    "prompt": {"m.n_virtual_tokens": CategoricalDistribution([10, 20])},
    # READ's output scale s is searched with its lr, as its authors tune it (trainables/methods/read.py)
    "read": {"m.hidden_size": CategoricalDistribution([64, 128, 256]), "m.scale": FloatDistribution(0.1, 10.0, log=True)},
    "lst": {"m.r": CategoricalDistribution([4, 8])},
    "sherl": {"m.r": CategoricalDistribution([4, 8])},
}


QUANTS = ("none", "int8", "nf4")
GC_SUFFIX = "+gc"


@dataclass(frozen=True)
class MethodSpec:
    """One `--methods` entry, NAME[@QUANT][+gc]: the registry method, its frozen backbone's quantisation
    and gradient checkpointing. `label` is the canonical spec string, the `method` column of its rows."""

    name: str
    quant: str = "none"
    gc: bool = False

    @property
    def label(self) -> str:
        return method_label(self.name, self.quant, self.gc)

    def run_fields(self) -> dict[str, Any]:
        """What a trial's run config (RunConfig) carries for this entry."""
        return {"method": self.name, "quant": self.quant, "gradient_checkpointing": self.gc}


def method_label(name: str, quant: str = "none", gc: bool = False) -> str:
    """`lora`, `lora+gc`, `lora@nf4` (QLoRA), `lora@nf4+gc`: the method as rows and tables name it."""
    return name + ("" if quant == "none" else f"@{quant}") + (GC_SUFFIX if gc else "")


def trains_backbone(name: str) -> bool:
    """Full fine-tuning trains the backbone's weights, so they cannot be held quantised."""
    return name == "full"


def backpropagates_through_backbone(name: str) -> bool:
    """Graft methods backpropagate through every block: only there does checkpointing save activations."""
    return get_method(name).family == "graft"


def parse_method_spec(spec: str) -> tuple[str, str, bool]:
    """`lora@nf4+gc` -> ("lora", "nf4", True); every bad part is one ValueError line naming the valid choices."""
    text = spec.strip()
    gc = text.endswith(GC_SUFFIX)
    body = text[: -len(GC_SUFFIX)] if gc else text
    name, at, quant = body.partition("@")
    if at and not quant:
        raise ValueError(f"method {spec!r}: '@' needs a quantisation; valid: {', '.join(QUANTS)}")
    quant = quant or "none"
    get_method(name)  # unknown name: "unknown method ...; valid: ..."
    if quant not in QUANTS:
        raise ValueError(f"method {spec!r}: unknown quantisation {quant!r}; valid: {', '.join(QUANTS)}")
    if quant != "none" and trains_backbone(name):
        raise ValueError(f"method {spec!r}: full fine-tuning trains the backbone, so its weights cannot be "
                         f"quantised; use {method_label('lora', quant)} (QLoRA) or full+gc")
    if gc and not backpropagates_through_backbone(name):
        raise ValueError(f"method {spec!r}: {name} does not backpropagate through the backbone "
                         f"({get_method(name).family} method), so gradient checkpointing saves nothing; drop +gc")
    return name, quant, gc


def run_fields(label: str) -> dict[str, Any]:
    """A label's run-config fields: method=NAME, quant, gradient_checkpointing."""
    return MethodSpec(*parse_method_spec(label)).run_fields()


def resolve_methods(specs: Sequence[str], *, quant: str = "none", gradient_checkpointing: bool = False,
                    ) -> list[MethodSpec]:
    """A study's `--methods` entries with the study-wide `--quant` / `--gradient-checkpointing` applied to
    every entry where they apply (an entry's own @QUANT wins; full keeps its weights unquantised; only
    graft methods checkpoint). Duplicates after resolving are dropped, the order kept."""
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}; valid: {', '.join(QUANTS)}")
    out: dict[str, MethodSpec] = {}
    for spec in specs:
        name, q, gc = parse_method_spec(spec)
        if q == "none" and "@" not in spec and not trains_backbone(name):
            q = quant
        gc = gc or (gradient_checkpointing and backpropagates_through_backbone(name))
        m = MethodSpec(name, q, gc)
        out.setdefault(m.label, m)
    return list(out.values())


def space(method: str, family: str | None = None, lr_span: float = 10.0) -> dict[str, BaseDistribution]:
    """The search space of `method` on a backbone `family` (llama, bert; None: the default reference lr).

    A method from the user's own code (trainables.methods.external) searches its lr around its reference lr."""
    if method not in _CAPACITY and external.is_builtin(method):
        raise ValueError(f"no search space for method {method!r}; defined: {', '.join(_CAPACITY)}")
    ref = get_method(method).lr_for(family)
    out: dict[str, BaseDistribution] = {"lr": FloatDistribution(ref / lr_span, min(ref * lr_span, 1.0), log=True)}
    out.update(_CAPACITY.get(method, {}))
    return out


def split_hp(hp: dict) -> tuple[dict, dict]:
    """Searched values → (RunConfig overrides, method config overrides)."""
    run = {k: v for k, v in hp.items() if not k.startswith("m.")}
    method = {k[2:]: v for k, v in hp.items() if k.startswith("m.")}
    return run, method
