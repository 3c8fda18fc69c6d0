import pytest
import torch

from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT, KVCache, ModelConfig, sample_next

OPTION_SETS = [
    {},
    {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False},
    {"qk_norm": True, "pos_emb": "rope"},
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
def test_kv_cache_matches_full_recompute_greedy(options):
    model = tiny(**options)
    prompt = torch.randint(0, 50, (2, 5))
    # within block_size (5 + 20 < 32) both paths must give the same tokens
    cached = list(model.generate_stream(prompt, 20, temperature=0, use_cache=True))
    full = list(model.generate_stream(prompt, 20, temperature=0, use_cache=False))
    assert torch.equal(torch.stack(cached), torch.stack(full))


@pytest.mark.parametrize("options", OPTION_SETS)
def test_cached_logits_equal_uncached(options):
    model = tiny(**options)
    idx = torch.randint(0, 50, (1, 12))
    cache = KVCache(model.config, 1, idx.device, torch.float32)
    model(idx[:, :7], kv_cache=cache)
    step_logits = [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(7, 12)]
    full_logits = model.lm_head(model.hidden_states(idx))[:, 7:]
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full_logits, atol=1e-5, rtol=1e-5)


def test_generation_runs_past_block_size_and_stops_at_stop_id():
    model = tiny()
    prompt = torch.randint(0, 50, (1, 30))
    tokens = list(model.generate_stream(prompt, 60, temperature=1.0, use_cache=True))
    assert len(tokens) == 60  # the cache slides past block_size instead of failing
    greedy = next(model.generate_stream(prompt, 1, temperature=0))
    stopped = list(model.generate_stream(prompt, 10, temperature=0, stop_ids=(int(greedy[0]),)))
    assert len(stopped) == 1


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -5.0]])
    gen = torch.Generator().manual_seed(0)
    top_k = {int(sample_next(logits, 1.0, 2, None, gen)) for _ in range(200)}
    assert top_k == {0, 1}
    # probabilities ~ [0.665, 0.245, 0.09, ...]: top_p 0.8 keeps the first two tokens only
    top_p = {int(sample_next(logits, 1.0, None, 0.8, gen)) for _ in range(200)}
    assert top_p == {0, 1}
    assert {int(sample_next(logits, 1.0, None, 0.5, gen)) for _ in range(50)} == {0}
    assert int(sample_next(logits, 0.0, None, None, gen)) == 0


def test_weight_tying_and_param_count():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total - 32 * 32  # position embeddings left out, as nanoGPT


def test_gated_mlp_keeps_parameter_budget_close():
    plain, gated = tiny(), tiny(mlp="swiglu")
    assert abs(gated.num_params() - plain.num_params()) / plain.num_params() < 0.1


@pytest.mark.parametrize(
    "bad",
    [{"n_embd": 30, "n_head": 4}, {"n_layer": 0}, {"dropout": 1.5}, {"norm": "batchnorm"}, {"vocab_size": 0}],
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
