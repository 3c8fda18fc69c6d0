"""The decode engine: a request gets the same tokens in a batch as alone, whatever joins or leaves."""

import pytest
import torch

from smallgpt import decode
from smallgpt.data.tokenizers import CharTokenizer
from smallgpt.decode import (
    DecodeEngine,
    SamplingSettings,
    SettingError,
    penalize_repeats,
    sample_next,
    suppressed_ids,
)
from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT, ModelConfig

BLOCK = 32
POSITIONS = [{}, {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}]


def tiny(**options) -> GPT:
    """A random model with larger weights than GPT-2's init: its tokens depend on the whole context
    (at std 0.02 attention barely matters and a wrong mask would go unnoticed)."""
    torch.manual_seed(0)
    config = ModelConfig(block_size=BLOCK, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **options)
    model = GPT(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.3)
    return model


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model: GPT, prompt_ids: list[int], settings: SamplingSettings, use_cache: bool = True) -> list[int]:
    return list(DecodeEngine(model, max_batch=1, use_cache=use_cache).generate(prompt_ids, settings))


def run_batched(engine: DecodeEngine, joining: dict[int, list[tuple[list[int], SamplingSettings]]]):
    """Step until idle; joining[step] are the requests added before that step. Returns each
    request's tokens in the order added, and the finish reasons."""
    requests, tokens = [], {}
    step = 0
    while engine.busy or any(s >= step for s in joining):
        for prompt_ids, settings in joining.get(step, []):
            requests.append(engine.add(prompt_ids, settings))
        for event in engine.step():
            tokens.setdefault(id(event.request), []).append(event.token_id)
        step += 1
    return [tokens[id(r)] for r in requests], [r.finish_reason for r in requests]


@pytest.mark.parametrize("options", POSITIONS)
def test_cache_matches_full_recompute_greedy(options):
    model = tiny(**options)
    settings = SamplingSettings(max_new_tokens=20, temperature=0)
    for seed in range(3):  # within block_size (5 + 20 < 32) both paths see the same context
        assert alone(model, prompt(5, seed), settings) == alone(model, prompt(5, seed), settings, False)


def test_a_cpu_caches_keys_and_values_in_fp32_for_a_bf16_model():
    """Attention runs in fp32 on a CPU, so the cache is kept in fp32 rather than cast every layer;
    the batch decodes as before."""
    model = tiny().to(torch.bfloat16)
    engine = DecodeEngine(model, max_batch=2)
    assert engine.cache is not None
    assert {t.dtype for t in engine.cache.keys + engine.cache.values} == {torch.float32}
    settings = SamplingSettings(max_new_tokens=40, temperature=0)  # 3 + 40 > BLOCK: the slot slides
    tokens, reasons = run_batched(engine, {0: [(prompt(3, 0), settings), (prompt(9, 1), settings)]})
    assert [len(t) for t in tokens] == [40, 40] and reasons == ["length", "length"]


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("options", POSITIONS)
def test_batched_greedy_equals_each_request_alone(options, compile, monkeypatch):
    """compile: the decoding forward runs for all slots at once (fixed shapes, masked attention),
    traced by torch.compile (its aot_eager backend here: the same graph, no C++ build)."""
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    model = tiny(**options)
    greedy = SamplingSettings(max_new_tokens=50, temperature=0)
    prompts = [prompt(n, seed) for seed, n in enumerate([3, 17, 1, 30, 8, 12])]
    expected = [alone(model, p, greedy) for p in prompts]
    # request 2 leaves early at a stop id (its 6th token alone), request 4 after 7 tokens
    stop_early = SamplingSettings(max_new_tokens=50, temperature=0, stop_ids=(expected[2][5],))
    short = SamplingSettings(max_new_tokens=7, temperature=0)
    expected[2] = expected[2][: expected[2].index(expected[2][5]) + 1]
    expected[4] = alone(model, prompts[4], short)
    settings = [greedy, greedy, stop_early, greedy, short, greedy]
    # 4 slots for 6 requests: some wait for a slot, some join mid-decode, rows pass block_size
    joining = {0: [(prompts[0], settings[0]), (prompts[1], settings[1])], 3: [(prompts[2], settings[2])]}
    joining[9] = [(p, s) for p, s in zip(prompts[3:], settings[3:])]
    engine = DecodeEngine(model, max_batch=4, compile=compile)
    compiled, eager = [], []  # compiled steps; tokens fed per row by eager forwards
    if compile:
        step, engine.decode_all = engine.decode_all, lambda *a: compiled.append(1) or step(*a)
    forward, engine._forward = engine._forward, lambda rows, keep: eager.append(keep) or forward(rows, keep)
    tokens, reasons = run_batched(engine, joining)
    assert tokens == expected
    if compile:  # every one-token step is the compiled one; eager forwards only (re)fill slots
        assert len(compiled) > 40 and 1 not in eager
    assert reasons == ["length", "length", "stop", "length", "length", "length"]
    assert len(prompts[3]) + len(tokens[3]) > 2 * BLOCK  # this row slid past block_size, twice
    assert engine.stats.max_batch_size == 4 and engine.stats.tokens == sum(map(len, tokens))
    assert not engine.busy and engine.free_slots == 4


@pytest.mark.parametrize("options", POSITIONS)
def test_no_cache_recomputes_all_rows_in_one_forward(options):
    """nanoGPT's full recompute: rows of any length in one forward (shorter ones padded at their
    end), each row's logits those it gets alone; a batch decodes each request's tokens."""
    model = tiny(**options)
    contexts = [prompt(n, seed) for seed, n in enumerate([3, 17, 1, 40])]  # 40 > BLOCK: its last 32
    engine = DecodeEngine(model, max_batch=4, use_cache=False)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    requests = [engine.add(ids, greedy) for ids in contexts]
    engine._admit()
    batches = []  # the batch size of each forward through the first block
    model.transformer.h[0].register_forward_hook(lambda module, args, out: batches.append(out.size(0)))
    logits = engine._next_logits(list(enumerate(requests)))
    assert batches == [4]
    alone_logits = [model(torch.tensor([ids[-BLOCK:]]))[0][:, -1] for ids in contexts]
    torch.testing.assert_close(logits, torch.cat(alone_logits))
    tokens, _ = run_batched(
        DecodeEngine(model, max_batch=4, use_cache=False), {0: [(c, greedy) for c in contexts]}
    )
    assert tokens == [alone(model, ids, greedy, use_cache=False) for ids in contexts]


def test_compiled_engines_of_different_models_each_decode_their_own(monkeypatch):
    """Each engine compiles its own step with the model's guards skipped: two models of the same
    shape (and one of another) decoding in turn must not run each other's graphs."""
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    models = [tiny(), tiny(), tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)]
    with torch.no_grad():
        models[1].lm_head.weight.neg_()  # same shapes, other weights (and so other tokens)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    expected = [alone(m, prompt(4, 0), greedy) for m in models]
    assert expected[0] != expected[1]
    engines = [DecodeEngine(m, max_batch=2, compile=True) for m in models]
    requests = [e.add(prompt(4, 0), greedy) for e in engines]
    tokens: list[list[int]] = [[], [], []]
    while any(e.busy for e in engines):
        for i, engine in enumerate(engines):  # interleaved: each call may find another's graph
            tokens[i] += [event.token_id for event in engine.step()]
    assert tokens == expected and all(r.finish_reason == "length" for r in requests)


def test_compile_needs_the_cache():
    with pytest.raises(UserError, match="needs the cache"):
        DecodeEngine(tiny(), use_cache=False, compile=True)


def test_per_row_settings_and_seeds_in_one_batch():
    model = tiny()
    settings = [
        SamplingSettings(max_new_tokens=40, temperature=0),
        SamplingSettings(max_new_tokens=40, temperature=1.0, seed=1),
        SamplingSettings(max_new_tokens=40, temperature=1.0, seed=2),
        SamplingSettings(max_new_tokens=40, temperature=0.7, top_k=5, top_p=0.9, seed=1),
        SamplingSettings(40, temperature=1.5, repetition_penalty=1.5, suppress_ids=(7, 8), seed=3),
    ]
    prompts = [prompt(4 + 3 * i, i) for i in range(len(settings))]
    tokens, _ = run_batched(DecodeEngine(model, max_batch=8), {0: list(zip(prompts, settings))})
    assert tokens == [alone(model, p, s) for p, s in zip(prompts, settings)]
    assert tokens[1] != tokens[2]  # the seed, not the batch, decides
    assert not {7, 8} & set(tokens[4])
    same_prompt = [(prompts[1], settings[1]), (prompts[1], settings[1])]
    twins, _ = run_batched(DecodeEngine(model, max_batch=2), {0: same_prompt})
    assert twins[0] == twins[1] == tokens[1]


def test_cancel_frees_the_slot_at_once():
    model = tiny()
    engine = DecodeEngine(model, max_batch=1)
    settings = SamplingSettings(max_new_tokens=10, temperature=0)
    first, second = engine.add(prompt(5, 0), settings), engine.add(prompt(6, 1), settings)
    third = engine.add(prompt(7, 2), settings)
    assert [event.request for event in engine.step()] == [first]
    engine.cancel(third)  # still waiting: it never runs
    engine.cancel(first)
    assert first.finish_reason == third.finish_reason == "cancelled" and engine.free_slots == 0
    events = engine.step()
    assert [event.request for event in events] == [second] and second.slot == 0
    while engine.busy:
        events += engine.step()
    assert [event.token_id for event in events] == alone(model, prompt(6, 1), settings)


def test_sampling_filters_restrict_choices():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -5.0]])
    gen = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, 2, None, gen)) for _ in range(200)} == {0, 1}
    # probabilities ~ [0.665, 0.245, 0.09, ...]: top_p 0.8 keeps the first two tokens only
    assert {int(sample_next(logits, 1.0, None, 0.8, gen)) for _ in range(200)} == {0, 1}
    assert {int(sample_next(logits, 1.0, None, 0.5, gen)) for _ in range(50)} == {0}
    assert int(sample_next(logits, 0.0, None, None, gen)) == 0
    penalized = penalize_repeats(logits, torch.tensor([[0, 3, 0]]), 2.0)
    assert penalized.tolist() == [[2.0, 3.0, 2.0, -10.0, -5.0]]


def test_sampling_draws_the_ids_torch_multinomial_draws():
    """sample_next draws as torch.multinomial does, without its checks: the same seeded generator
    gives the same tokens, so seeded outputs did not change with it."""
    logits = torch.randn(400, 65, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for row in logits:
        expected = torch.multinomial((row[None] / 0.8).softmax(dim=-1), 1, generator=theirs)[:, 0]
        assert torch.equal(sample_next(row[None], 0.8, None, None, ours), expected)


@pytest.mark.parametrize(
    "prompt_ids, settings, fragment",
    [
        ([], SamplingSettings(), "at least one token"),
        ([1, 50], SamplingSettings(), "token id 50"),
        ([1], SamplingSettings(stop_ids=(-1,)), "token id -1"),
        ([1], SamplingSettings(temperature=-1), "temperature"),
        ([1], SamplingSettings(max_new_tokens=0), "max_new_tokens"),
        ([1], SamplingSettings(top_p=1.5), "top_p"),
        ([1], SamplingSettings(max_new_tokens="5"), "max_new_tokens must be an integer, got '5'"),
        ([1], SamplingSettings(max_new_tokens=True), "max_new_tokens must be an integer"),
        ([1], SamplingSettings(temperature=float("nan")), "temperature must be a number, got nan"),
        ([1], SamplingSettings(top_k=2.5), "top_k must be an integer"),
        ([1], SamplingSettings(repetition_penalty="1"), "repetition_penalty must be a number"),
        ([1], SamplingSettings(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_bad_requests_are_user_errors(prompt_ids, settings, fragment):
    with pytest.raises(UserError, match=fragment):
        DecodeEngine(tiny(), max_batch=1).add(prompt_ids, settings)


def test_a_bad_setting_names_itself():
    with pytest.raises(SettingError) as refused:
        SamplingSettings(top_p=0).validate()
    assert refused.value.name == "top_p"


def test_suppressed_ids_are_specials_but_the_stop_ids_and_rows_past_the_tokenizer():
    tokenizer = CharTokenizer.from_texts(["ab"])
    tokenizer.add_special_tokens(["<|x|>"])
    eot, unk, x = (tokenizer.special_tokens[name] for name in ("<|endoftext|>", "<|unk|>", "<|x|>"))
    assert tokenizer.vocab_size == 5  # the specials, a, b
    assert sorted(suppressed_ids(tokenizer, 7, stop_ids=(eot,))) == sorted([unk, x, 5, 6])
    assert sorted(suppressed_ids(tokenizer, 5, stop_ids=(x,))) == sorted([eot, unk])
