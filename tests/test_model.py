import pytest
import torch
import torch.nn.functional as F

from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT, KVCache, ModelConfig, attention

OPTION_SETS = [
    {},
    {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False},
    {"qk_norm": True, "pos_emb": "rope"},
    {"mlp": "relu2", "logit_softcap": 2.0},
]


def tiny(**options) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **options)
    return GPT(config).eval()


@pytest.mark.parametrize("options", OPTION_SETS)
def test_forward_shapes_and_loss(options):
    model = tiny(**options)
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    # an untrained model is near-uniform: loss close to ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None


@pytest.mark.parametrize("options", OPTION_SETS)
def test_cached_logits_equal_uncached(options):
    model = tiny(**options)
    idx = torch.randint(0, 50, (1, 12))
    cache = KVCache(model.config, 1, idx.device, torch.float32)
    model(idx[:, :7], kv_cache=cache)
    step_logits = [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(7, 12)]
    full_logits = model.logits(model.hidden_states(idx))[:, 7:]
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", OPTION_SETS)
def test_cache_slots_of_different_lengths_decode_together(options):
    model = tiny(**options)
    idx = torch.randint(0, 50, (3, 20))
    full_logits = model.logits(model.hidden_states(idx))  # (3, 20, vocab)
    cache = KVCache(model.config, 4, idx.device, torch.float32)
    model(idx[:1, :9], kv_cache=cache.select([2]))  # slot 2 holds 9 positions, slot 0 holds 4
    model(idx[1:2, :4], kv_cache=cache.select([0]))
    model(torch.randint(0, 50, (1, 15)), kv_cache=cache.select([3]))  # then is cut back: stale tail
    cache.lengths[3] = 0
    model(idx[2:, :6], kv_cache=cache.select([3]))
    for t in range(3):  # one forward for all three slots, each at its own position
        step = torch.stack([idx[0, 9 + t], idx[1, 4 + t], idx[2, 6 + t]])[:, None]
        logits, _ = model(step, kv_cache=cache.select([2, 0, 3]))
        expected = torch.stack([full_logits[0, 9 + t], full_logits[1, 4 + t], full_logits[2, 6 + t]])
        torch.testing.assert_close(logits[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [7, 0, 12, 9]
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(idx[:1, :1].expand(1, 21), kv_cache=cache.select([2]))


def test_weight_tying_and_param_count():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total - 32 * 32  # position embeddings left out, as nanoGPT


def test_gated_mlp_keeps_parameter_budget_close():
    plain, gated = tiny(), tiny(mlp="swiglu")
    assert abs(gated.num_params() - plain.num_params()) / plain.num_params() < 0.1


def test_relu2_mlp_squares_the_positive_part():
    model = tiny(mlp="relu2")
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2))


def test_logit_softcap_bounds_the_logits():
    capped = tiny(logit_softcap=1.0)
    plain = tiny()  # same seed: the same weights
    with torch.no_grad():  # large logits, to reach the cap
        capped.lm_head.weight.mul_(20)
        plain.lm_head.weight.mul_(20)
    idx = torch.randint(0, 50, (2, 16))
    raw = plain.lm_head(plain.hidden_states(idx))
    logits, _ = capped(idx, idx)
    assert raw.abs().max() > 2 and logits.abs().max() <= 1.0
    torch.testing.assert_close(logits, torch.tanh(raw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_embd": 30, "n_head": 4},
        {"n_layer": 0},
        {"dropout": 1.5},
        {"norm": "batchnorm"},
        {"vocab_size": 0},
        {"mlp": "relu3"},
        {"logit_softcap": -1.0},
        {"logit_softcap": float("nan")},
    ],
)
def test_invalid_model_config_is_user_error(bad):
    values = {"block_size": 8, "vocab_size": 10, "n_layer": 1, "n_head": 2, "n_embd": 8} | bad
    with pytest.raises(UserError):
        GPT(ModelConfig(**values))


def test_set_dropout_reaches_every_dropout_and_attention():
    model = tiny().train()
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(idx)[0], model(idx)[0])  # built with dropout 0: training is deterministic
    model.set_dropout(0.5)
    assert model.config.dropout == 0.5
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    assert torch.equal(model.eval()(idx)[0], model(idx)[0])  # eval mode switches it off
    with pytest.raises(UserError, match="dropout"):
        model.set_dropout(1.0)


def test_attention_of_bf16_inputs_runs_in_fp32_on_a_cpu():
    """A bf16 model's attention (one query per row over a cache, masked) is computed in fp32 and
    returned in bf16: torch's bf16 CPU attention is several times slower."""
    torch.manual_seed(0)
    q = torch.randn(3, 2, 1, 8).bfloat16()
    k, v = torch.randn(3, 2, 20, 8).bfloat16(), torch.randn(3, 2, 20, 8).bfloat16()
    mask = (torch.arange(20) <= torch.tensor([5, 12, 19])[:, None])[:, None, None, :]  # (B, 1, 1, T)
    got = attention(q, k, v, mask, 0.0, False)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected.bfloat16())


@pytest.mark.parametrize("is_causal", [True, False])
def test_attention_stays_fp32_under_cpu_bf16_autocast(is_causal):
    """Training's CPU bfloat16 mode runs Linear layers in bf16 (autocast), but attention (forward and
    backward) stays exactly fp32: torch's CPU attention backward is several times slower in bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).dtype == torch.bfloat16
        got = attention(q, k, v, None, 0.0, is_causal)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    for g, e in zip(grads, expected_grads):
        assert torch.equal(g, e)
