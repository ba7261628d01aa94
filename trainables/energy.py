"""Energy and FLOPs of a trial: NVML or RAPL counters, FlopCounterMode.

Energy comes from hardware counters, never from a power model:
- ``nvml``: GPU energy from NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`,
  mJ since the driver loaded, Volta and newer), summed over the visible GPUs, when the
  trial runs on CUDA and NVML initialises;
- ``rapl``: CPU package energy from Linux RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`),
  when those files are readable (often root-only);
- ``none``: neither; `joules` is then None.

Nothing here raises for a missing driver, unreadable counters or unsupported GPUs: the
meter answers `source="none"` and `joules=None` instead (see STACK_NOTES.md, NVML).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

RAPL_ROOT = Path("/sys/class/powercap")
_RAPL_PACKAGE = re.compile(r"intel-rapl:\d+")  # packages only: intel-rapl:N:M are parts of package N


# --------------------------------------------------------------------------- counters

class _NvmlCounter:
    """Cumulative mJ over the GPUs this process sees (CUDA_VISIBLE_DEVICES honoured)."""

    def __init__(self) -> None:
        import pynvml  # from nvidia-ml-py; imported here so CPU-only use never touches it

        self._nvml = pynvml
        pynvml.nvmlInit()
        weakref.finalize(self, _nvml_shutdown, pynvml)
        # torch's own CUDA→NVML index mapping (handles UUIDs in CUDA_VISIBLE_DEVICES);
        # private, but it is the one torch.cuda.power_draw uses.
        indices = [torch.cuda._get_nvml_device_index(i) for i in range(torch.cuda.device_count())]
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        if not self._handles:
            raise RuntimeError("no visible GPU")
        self.read()  # raises NVMLError_NotSupported on GPUs without the counter (pre-Volta, MIG)

    def read(self) -> float:
        """Joules since some fixed origin (the driver's load)."""
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1e3


def _nvml_shutdown(pynvml: Any) -> None:
    with contextlib.suppress(pynvml.NVMLError):
        pynvml.nvmlShutdown()


class _RaplCounter:
    """Cumulative CPU package energy, corrected for the counters' wraparound.

    Written by hand (no library reads powercap here). Each package counter wraps at
    `max_energy_range_uj`; a wrap is seen as a reading below the previous one, so reads
    must come at least once per wrap period (tens of minutes at full load), which phase
    boundaries do for the runs this machine makes.
    """

    def __init__(self, root: Path | None = None) -> None:
        root = RAPL_ROOT if root is None else root
        self._domains = sorted(d for d in root.glob("intel-rapl:*") if _RAPL_PACKAGE.fullmatch(d.name))
        if not self._domains:
            raise OSError(f"no RAPL package domains under {root}")
        self._range = [int((d / "max_energy_range_uj").read_text()) for d in self._domains]
        self._last = self._raw()
        self._total_uj = 0

    def _raw(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self._domains]

    def read(self) -> float:
        now = self._raw()
        for i, (prev, cur) in enumerate(zip(self._last, now, strict=True)):
            self._total_uj += cur - prev if cur >= prev else cur + self._range[i] - prev
        self._last = now
        return self._total_uj / 1e6


def _open_counter(device: torch.device | None) -> tuple[str, Callable[[], float] | None]:
    """The best counter for a trial on `device` (None: GPU if there is one, else CPU)."""
    want_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if want_gpu:
        try:
            import pynvml

            try:
                return "nvml", _NvmlCounter().read
            except (pynvml.NVMLError, RuntimeError):
                pass
        except ImportError:
            pass
        # A GPU trial is not measured by CPU counters: that would be a different quantity.
        return "none", None
    try:
        return "rapl", _RaplCounter().read
    except (OSError, ValueError):
        return "none", None


# --------------------------------------------------------------------------- the meter

class EnergyMeter:
    """Energy per phase of a trial, from hardware counters.

    `with meter.phase("train"): ...` adds the energy spent inside the block to that
    phase; phases must not nest (they would count twice). `with EnergyMeter() as m:`
    records everything inside as phase "run". If a counter fails mid-run the meter turns
    to `source="none"` rather than report a partial number.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.source, self._read = _open_counter(torch.device(device) if device is not None else None)
        self.phases: dict[str, float] = {}
        self._open: contextlib.ExitStack | None = None

    def _now(self) -> float | None:
        if self._read is None:
            return None
        try:
            return self._read()
        except Exception:  # NVMLError, OSError, ...: energy is optional, never fatal
            self.source, self._read, self.phases = "none", None, {}
            return None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            end = self._now() if start is not None else None
            if start is not None and end is not None:
                self.phases[name] = self.phases.get(name, 0.0) + (end - start)

    @property
    def joules(self) -> float | None:
        """Total over all phases so far; None without a counter."""
        return None if self.source == "none" else sum(self.phases.values())

    def joules_so_far(self, offset: float = 0.0) -> float | None:
        """Total so far plus `offset` (energy of an earlier, resumed part of the run)."""
        total = self.joules
        return None if total is None else total + offset

    def start(self) -> EnergyMeter:
        self._open = contextlib.ExitStack()
        self._open.enter_context(self.phase("run"))
        return self

    def stop(self) -> float | None:
        if self._open is not None:
            self._open.close()
            self._open = None
        return self.joules

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- FLOPs

def flops_per_step(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """FLOPs of forward + backward on `batch`, counted by torch's FlopCounterMode.

    Counts what FlopCounterMode has formulas for (matmuls, convolutions, attention),
    which is where the FLOPs are; the optimizer step is not included. Gradients go
    through `torch.autograd.grad`, so no `.grad` is left on the model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch})
        loss = out.loss if hasattr(out, "loss") else out
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
    return int(counter.get_total_flops())
