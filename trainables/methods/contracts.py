"""The contracts every method meets, as one function a study runs on a user's method before any trial.

The built-in methods are held to these (and more: learning on one batch, golden counts) by
tests/unit/test_method_contracts.py over every tiny backbone family; a method from the user's
own code (`trainables.methods.external`) is checked here on tiny random-weight backbones, in
about a second, and refused with one line naming the first broken contract.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing

import torch

from trainables import backbones
from trainables.methods.base import (
    MethodFamily,
    MethodInfo,
    SideModel,
    TaskModel,
    apply_method,
    get_method,
    pool,
)
from trainables.text2text import decode, lm_logits

FAMILIES = typing.get_args(MethodFamily)
TINY_BY_FAMILY = {"llama": "llama-tiny", "bert": "bert-tiny", "t5": "t5-tiny"}  # backbone family -> tiny backbone


class ContractError(ValueError):
    """A method breaks a contract: one line, naming the method, the backbone and the contract."""


def tiny_backbones(study_backbones: typing.Iterable[str] = ()) -> list[str]:
    """The tiny backbones a method is checked on: a decoder always, and one per family the study runs."""
    out = ["llama-tiny"]
    for name in study_backbones:
        try:
            family = backbones.get_spec(name).anatomy.family
        except ValueError:
            continue
        out.append(TINY_BY_FAMILY.get(family, "llama-tiny"))
    return list(dict.fromkeys(out))


def _batch(b: int = 4, t: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0  # padded rows, so pooling and masks are exercised
    mask[3, 4:] = 0
    return ids, mask, torch.tensor([0, 1, 1, 0][:b])


def _make(name: str, backbone: str, device: str = "cpu") -> tuple[TaskModel, torch.nn.Module]:
    torch.manual_seed(0)
    spec = backbones.get_spec(backbone)
    bb = backbones.build(spec, device=device)
    return apply_method(name, bb, spec, {}, n_labels=2), bb


def check_info(info: MethodInfo) -> None:
    """The registry entry itself: a frozen config dataclass whose defaults parse, a positive reference lr."""
    family = info.family
    if family not in FAMILIES:
        raise ContractError(f"method {info.name!r}: family {family!r} is not one of {', '.join(FAMILIES)}")
    if not (dataclasses.is_dataclass(info.config_cls) and info.config_cls.__dataclass_params__.frozen):
        raise ContractError(f"method {info.name!r}: config_cls must be a frozen dataclass (strict, hashable configs)")
    try:
        info.parse({})
    except Exception as e:
        raise ContractError(f"method {info.name!r}: its config does not parse with the defaults ({e})") from None
    if not (isinstance(info.reference_lr, int | float) and 0 < info.reference_lr < math.inf):
        raise ContractError(f"method {info.name!r}: reference_lr must be > 0 and finite, not {info.reference_lr!r}")
    if not callable(info.apply):
        raise ContractError(f"method {info.name!r}: apply is not callable")


def check_method(name: str, backbone: str = "llama-tiny") -> None:
    """Every contract of tests/unit/test_method_contracts.py that needs no tuned lr, on one tiny backbone.

    Raises ContractError naming the first one broken."""
    info = get_method(name)
    check_info(info)
    where = f"method {name!r} on {backbone}"

    def fail(contract: str) -> ContractError:
        return ContractError(f"{where} breaks the contract: {contract}")

    try:
        model, bb = _make(name, backbone)
    except ContractError:
        raise
    except Exception as e:
        raise fail(f"apply(backbone, spec, cfg, n_labels, pooling) must build it "
                   f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(model, TaskModel):
        raise fail(f"apply must return a TaskModel, not {type(model).__name__}")
    if (info.family == "graft") == isinstance(model, SideModel):
        raise fail(f"family {info.family!r} but apply returned a {type(model).__name__} "
                   "(side families return a SideModel, graft ones a GraftModel)")
    ids, mask, labels = _batch()
    model.train()
    block_grad: list[tuple[int, bool]] = []
    if info.family != "graft":
        for i, blk in enumerate(model.spec.anatomy.all_blocks(model.backbone)):
            blk.register_forward_hook(lambda _m, _a, out, i=i: block_grad.append(
                (i, (out[0] if isinstance(out, tuple) else out).requires_grad)))
    try:
        out = model(ids, mask, labels)
    except Exception as e:
        raise fail(f"forward(input_ids, attention_mask, labels) must run ({type(e).__name__}: "
                   f"{' '.join(str(e).split())[:160]})") from None
    if out.loss is None or out.loss.dim() != 0 or not torch.isfinite(out.loss):
        raise fail("forward must return a finite scalar loss when given labels")
    if tuple(out.logits.shape) != (ids.shape[0], 2):
        raise fail(f"logits must be batch × n_labels {(ids.shape[0], 2)}, got {tuple(out.logits.shape)}")
    out.loss.backward()
    declared = {n for n, p in model.named_parameters() if p.requires_grad}
    if not declared:
        raise fail("it must train something (no parameter requires grad)")
    for n, p in model.named_parameters():
        if n in declared and p.grad is None:
            raise fail(f"every trainable parameter gets a gradient ({n} got none)")
        if n not in declared and p.grad is not None:
            raise fail(f"frozen parameters get no gradient ({n} got one)")
    on_graph = {i for i, g in block_grad if g}
    if info.family == "side" and on_graph:
        raise fail(f"a side method keeps every backbone block off the autograd graph (blocks {sorted(on_graph)})")
    if info.family == "side-late":
        last = {model.spec.n_layers - 1} | ({model.spec.n_layers + model.spec.n_decoder_layers - 1}
                                            if model.spec.n_decoder_layers else set())
        if on_graph != last:
            raise fail(f"a side-late method puts only the last block on the graph (got {sorted(on_graph)})")
    if info.family != "graft" and model.backbone_tensors_with_grad():
        raise fail("a side method trains no backbone parameter")
    meta, _ = _make(name, backbone, device="meta")
    if meta.param_counts() != model.param_counts():
        raise fail(f"the same parameter counts on the meta device ({meta.param_counts()} vs {model.param_counts()}): "
                   "memory planning counts methods there")
    if info.identity_at_init:
        _check_identity(name, backbone, fail)
    if info.cacheable:
        _check_taps(model, bb, ids, mask, labels, fail)
    _check_roundtrip(name, backbone, model, ids, mask, fail)


def _check_identity(name: str, backbone: str, fail: typing.Callable[[str], ContractError]) -> None:
    torch.manual_seed(0)
    spec = backbones.get_spec(backbone)
    bb = backbones.build(spec, device="cpu")
    frozen = copy.deepcopy(bb)
    model = apply_method(name, bb, spec, {}, n_labels=2).eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        if model.text2text:
            encoded = frozen.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            decoded = decode(frozen, encoded, mask, model.words)
            ref = (model.words.scores(lm_logits(frozen, decoded)) if model.head is None
                   else model.head(decoded[:: model.words.n, 0]))
        else:
            ref = model.head(pool(frozen(input_ids=ids, attention_mask=mask).last_hidden_state, mask, model.pooling))
        got = model(ids, mask).logits
    if not torch.allclose(got, ref, rtol=1e-5, atol=1e-5):
        raise fail("identity_at_init=True: at step 0 the logits equal the frozen backbone + head's "
                   f"(max difference {float((got - ref).abs().max()):.3g})")


def live_and_cached(model: SideModel, bb: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[typing.Any, typing.Any]:
    """A side model's live forward, and its forward on the taps a cache would hold."""
    from trainables.methods.base import collect_taps, collect_taps_t2t

    model.eval()
    with torch.no_grad():
        live = model(ids, mask, labels)
        if model.text2text:
            taps = collect_taps_t2t(bb, model.spec, ids, mask, model.tap_layers(), model.decoder_tap_layers(),
                                    model.words)
        else:
            taps = collect_taps(bb, model.spec, ids, mask, model.tap_layers())
        return live, model.forward_taps(taps, labels)


def _check_taps(model: TaskModel, bb: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                fail: typing.Callable[[str], ContractError]) -> None:
    if not isinstance(model, SideModel):
        raise fail("cacheable=True needs a SideModel (forward_taps reads cached activations)")
    live, cached = live_and_cached(model, bb, ids, mask, labels)
    if not torch.allclose(cached.logits, live.logits, rtol=1e-4, atol=1e-5):
        raise fail("cacheable=True: forward_taps on the collected taps equals the live forward")


def _check_roundtrip(name: str, backbone: str, model: TaskModel, ids: torch.Tensor, mask: torch.Tensor,
                     fail: typing.Callable[[str], ContractError]) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = model.trainable_state_dict()
    other, _ = _make(name, backbone)
    try:
        other.load_trainable_state_dict(state)
    except Exception as e:
        raise fail(f"its trainable state saves and loads into a fresh copy ({' '.join(str(e).split())[:160]})") from None
    model.eval()
    other.eval()
    with torch.no_grad():
        if not torch.allclose(other(ids, mask).logits, model(ids, mask).logits, rtol=1e-5, atol=1e-5):
            raise fail("a checkpoint of what trains restores the same model (trainable_state_dict holds all "
                       "that trains)")


def check(names: typing.Iterable[str], study_backbones: typing.Iterable[str] = ()) -> None:
    """Every contract for each method on each tiny backbone the study's families need (see module doc)."""
    tiny = tiny_backbones(study_backbones)
    for name in names:
        for backbone in tiny:
            check_method(name, backbone)
