"""Every method registers itself on import; `REGISTRY` maps names to `MethodInfo`."""

from trainables.methods import (  # noqa: F401  (imported for registration)
    adapter,
    bitfit,
    full,
    ia3,
    lora,
    lst,
    probe,
    prompt,
    read,
    sherl,
)
from trainables.methods.base import (
    REGISTRY,
    MethodInfo,
    Output,
    Taps,
    TaskModel,
    apply_method,
    collect_taps,
    get_method,
)
from trainables.methods.external import load_entry_points, load_environment

# Methods from the user's own code: installed entry points, and the modules a study named (every
# process of the study imports them here; see trainables.methods.external)
load_entry_points()
load_environment()

__all__ = ["REGISTRY", "MethodInfo", "Output", "TaskModel", "Taps", "apply_method", "collect_taps", "get_method"]
