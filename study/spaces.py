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

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from trainables.methods import get_method

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


def space(method: str, family: str | None = None, lr_span: float = 10.0) -> dict[str, BaseDistribution]:
    """The search space of `method` on a backbone `family` (llama, bert; None: the default reference lr)."""
    if method not in _CAPACITY:
        raise ValueError(f"no search space for method {method!r}; defined: {', '.join(_CAPACITY)}")
    ref = get_method(method).lr_for(family)
    out: dict[str, BaseDistribution] = {"lr": FloatDistribution(ref / lr_span, min(ref * lr_span, 1.0), log=True)}
    out.update(_CAPACITY[method])
    return out


def split_hp(hp: dict) -> tuple[dict, dict]:
    """Searched values → (RunConfig overrides, method config overrides)."""
    run = {k: v for k, v in hp.items() if not k.startswith("m.")}
    method = {k[2:]: v for k, v in hp.items() if k.startswith("m.")}
    return run, method
