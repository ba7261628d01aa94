"""The step as CUDA runs it, checked without a GPU: autocast's scope in a measured step, CUDA autocast's
float32 rule in the estimate (against torch's own CUDA autocast kernels, run forward-only on fake CUDA
tensors), the cuBLAS workspaces, and the GPU budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from trainables import memory
from trainables.backbones import get_spec

BF16 = torch.bfloat16


def _cuda_autocast_dtype(fn, *shapes: tuple[int, ...]) -> torch.dtype:
    """The output dtype torch's CUDA autocast gives `fn` on bf16 inputs (forward only: a fake CUDA tensor's
    backward needs a CUDA build). torch.autocast("cuda") is disabled without CUDA: its switches are set directly."""
    with FakeTensorMode():
        xs = [torch.empty(s, dtype=BF16, device="cuda") for s in shapes]
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", BF16)
        torch.autocast_increment_nesting()
        try:
            return fn(*xs).dtype
        finally:
            torch.autocast_decrement_nesting()
            torch.set_autocast_enabled("cuda", False)


def _emulated_dtype(fn, *shapes: tuple[int, ...]) -> torch.dtype:
    with FakeTensorMode():
        xs = [torch.empty(s, dtype=BF16) for s in shapes]
        with memory._forward_as("cuda", BF16):
            return fn(*xs).dtype


OPS = {
    "layer_norm": (lambda x: F.layer_norm(x, (8,)), (2, 4, 8)),
    "softmax": (lambda x: torch.softmax(x, -1), (2, 4, 8)),
    "tensor.softmax": (lambda x: x.softmax(-1), (2, 4, 8)),
    "log_softmax": (lambda x: F.log_softmax(x, -1), (2, 4, 8)),
    "cross_entropy": (lambda x: F.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=x.device)), (4, 3)),
    "pow": (lambda x: x.pow(2), (2, 8)),
    "rsqrt": (lambda x: torch.rsqrt(x), (2, 8)),
    "linear": (lambda x, w: F.linear(x, w), (2, 8), (8, 8)),
    "matmul": (lambda x, w: x @ w, (2, 8), (8, 8)),
    "gelu": (lambda x: F.gelu(x), (2, 8)),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_emulated_cuda_autocast_matches_torchs_cuda_rules(name):
    fn, *shapes = OPS[name]
    assert _emulated_dtype(fn, *shapes) == _cuda_autocast_dtype(fn, *shapes)


def test_cpu_autocast_keeps_layer_norm_in_bf16_so_the_rules_matter():
    fn, shape = OPS["layer_norm"]
    with FakeTensorMode(), torch.autocast("cpu", dtype=BF16):
        assert fn(torch.empty(shape, dtype=BF16)).dtype == BF16
    assert _cuda_autocast_dtype(fn, shape) == torch.float32


def test_cuda_estimate_adds_fp32_layer_norms_and_two_cublas_workspaces():
    kw = dict(batch_size=2, seq_len=8, dtype=BF16)
    cpu = memory.estimate_step("bert-tiny", "lora", None, **kw)
    cuda = memory.estimate_step("bert-tiny", "lora", None, device_type="cuda", cuda_major=8, **kw)
    hopper = memory.estimate_step("bert-tiny", "lora", None, device_type="cuda", cuda_major=9, **kw)
    assert (cuda.params, cuda.optimizer) == (cpu.params, cpu.optimizer)
    workspaces = 2 * memory.CUBLAS_DEFAULT_BYTES
    assert cuda.activations - workspaces > cpu.activations  # BERT's LayerNorms save fp32 under CUDA autocast
    assert hopper.peak_bytes - cuda.peak_bytes == 2 * (memory.CUBLAS_LARGE_BYTES - memory.CUBLAS_DEFAULT_BYTES)
    assert cuda.peak_bytes == cuda.params + cuda.grads + cuda.optimizer + cuda.activations
    with pytest.raises(ValueError, match="valid: cpu, cuda"):
        memory.estimate_step("bert-tiny", "lora", None, device_type="mps", **kw)


def test_cublas_workspace_size_follows_torch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert memory.cublas_workspace_bytes(8) == 8_519_680  # A10G, A100: ":4096:2:16:8"
    assert memory.cublas_workspace_bytes(9) == memory.cublas_workspace_bytes(10) == 32 * 2**20  # H100/H200, B200
    assert memory.cublas_workspace_bytes(None) == 8_519_680  # no GPU here: the Ampere default
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert memory.cublas_workspace_bytes(8) == 32 * 2**20


def test_measured_step_holds_autocast_over_the_forward_only():
    """Autocast held over the whole step keeps its bf16 weight copies live through backward and the optimizer
    step; the measured step (as the loop trains) drops them when the forward ends."""
    torch.manual_seed(0)
    model = memory.build_task_model("llama-tiny", "full", None, device="cpu", dtype=BF16)
    batch = memory.synthetic_batch(get_spec("llama-tiny").config["vocab_size"], 2, 8)
    forward_only = memory.measure_step(model, batch, forward_context=torch.autocast("cpu", dtype=BF16))
    with torch.autocast("cpu", dtype=BF16):
        whole_step = memory.measure_step(model, batch)
    assert forward_only.peak_bytes < whole_step.peak_bytes
    assert forward_only.reserved_bytes is None and forward_only.as_dict()["peak_memory_reserved_bytes"] is None
