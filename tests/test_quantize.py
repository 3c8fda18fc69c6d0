"""Inference precision (model/quantize.py): int8 weights per output channel, bfloat16, bad values."""

import copy

import pytest
import torch
import torch.nn as nn

from smallgpt.errors import UserError
from smallgpt.model import quantize
from smallgpt.model.gpt import GPT, KVCache, ModelConfig
from smallgpt.model.quantize import Int8Linear, for_inference, quantize_int8


@pytest.mark.parametrize("in_features", [64, 48, 24, 5])  # 24 and 5: not kernel-aligned, the fallback
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [2, 8])  # 14 rows: the CPU kernel; 56: dequantized (a prompt's path)
def test_int8_linear_is_close_to_the_float_layer(in_features, bias, batch):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 40, bias=bias)
    with torch.no_grad():
        linear.weight[3] *= 50  # rows of very different size: each row has its own scale
    x = torch.randn(batch, 7, in_features)
    expected = linear(x)
    layer = Int8Linear(linear)
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    # int8 rounding (half a step of 1/127 of the row's largest weight) and, on the CPU kernel,
    # bf16 activations: within 2% of each output's magnitude
    error = (got - expected).abs().amax(dim=(0, 1)) / expected.abs().amax(dim=(0, 1))
    assert error.max() < 0.02, error.max()
    assert torch.allclose(layer(x[:1]), got[:1], rtol=0.02, atol=0.02)  # either path


@pytest.mark.parametrize("rows, kernel_calls", [(quantize.INT8_KERNEL_MAX_ROWS, 1), (56, 0)])
def test_int8_linear_uses_the_cpu_kernel_for_few_rows_only(rows, kernel_calls, monkeypatch):
    """Decoding's few rows go through torch's int8 kernel; a prompt's many rows through the
    dequantized weight, faster there (the kernel's cost grows with every row)."""
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel(*a))
    layer = Int8Linear(nn.Linear(64, 40))
    assert layer(torch.randn(rows, 64)).shape == (rows, 40)
    assert len(calls) == kernel_calls


def test_int8_weights_are_int8_with_one_scale_per_row():
    linear = nn.Linear(32, 8)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (8, 32)
    assert q.scale.shape == (8,)
    assert q.weight.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range
    restored = q.weight.float() * q.scale[:, None]
    assert torch.allclose(restored, linear.weight, atol=float(q.scale.max()) / 2 + 1e-6)


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(block_size=32, vocab_size=70, n_layer=2, n_head=2, n_embd=64, **overrides)
    return GPT(config).eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_model_logits_close_to_fp32(dtype, monkeypatch):
    monkeypatch.setattr(quantize, "cpu_has_bf16", lambda: True)  # whatever this CPU has
    model = tiny_gpt()
    idx = torch.randint(0, 70, (2, 20))
    with torch.no_grad():
        expected, _ = model(idx, targets=idx)
        quantized = for_inference(copy.deepcopy(model), dtype, "int8")
        got, _ = quantized(idx, targets=idx)
    assert all(isinstance(m, Int8Linear) for m in (quantized.lm_head, quantized.transformer.h[0].mlp.c_fc))
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert quantized.transformer.wte.weight.dtype == getattr(torch, dtype)  # the embedding stays float
    scale = expected.abs().max()
    tolerance = 0.02 if dtype == "float32" else 0.05
    assert (got.float() - expected).abs().max() < tolerance * scale
    # the most likely next token is the same nearly everywhere
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree > 0.9, agree


def test_quantized_model_decodes_with_its_kv_cache():
    """Cached decoding of an int8 model gives the logits of its own full forward."""
    model = quantize_int8(tiny_gpt())
    idx = torch.randint(0, 70, (1, 12))
    with torch.no_grad():
        full = [model(idx[:, : t + 1])[0][0, -1] for t in range(12)]
        cache = KVCache(model.config, 1, torch.device("cpu"), torch.float32)
        cached = [model(idx[:, t : t + 1], kv_cache=cache)[0][0, -1] for t in range(12)]
    for a, b in zip(full, cached):
        assert torch.allclose(a, b, atol=1e-4)


def test_bfloat16_model(monkeypatch):
    monkeypatch.setattr(quantize, "cpu_has_bf16", lambda: True)
    model = tiny_gpt()
    idx = torch.randint(0, 70, (1, 16))
    with torch.no_grad():
        expected, _ = model(idx, targets=idx)
        half = for_inference(copy.deepcopy(model), "bfloat16")
        got, _ = half(idx, targets=idx)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert not half.training
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_bad_precision_values_are_user_errors(monkeypatch):
    model = tiny_gpt()
    with pytest.raises(UserError, match="quantize must be one of none, int8"):
        for_inference(model, "float32", "int4")
    with pytest.raises(UserError, match="dtype must be one of"):
        for_inference(model, "fp8")
    with pytest.raises(UserError, match="float16 is for GPUs"):
        for_inference(model, "float16")
    monkeypatch.setattr(quantize, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="no native bfloat16"):
        for_inference(model, "bfloat16")
