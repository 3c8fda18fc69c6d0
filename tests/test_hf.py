"""Hugging Face interop, offline: tiny random models built with transformers itself are the reference."""

import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from smallgpt import cli  # noqa: E402
from smallgpt.config import load_config  # noqa: E402
from smallgpt.data.tokenizers import CharTokenizer, GPT2Tokenizer  # noqa: E402
from smallgpt.decode import DecodeEngine, SamplingSettings  # noqa: E402
from smallgpt.errors import UserError  # noqa: E402
from smallgpt.export import ExportArgs, export  # noqa: E402
from smallgpt.generate import SampleArgs, sample  # noqa: E402
from smallgpt.model import hf  # noqa: E402
from smallgpt.model.gpt import GPT, ModelConfig  # noqa: E402
from smallgpt.preparation import PrepareArgs, run_prepare  # noqa: E402
from smallgpt.train import checkpoint  # noqa: E402
from smallgpt.train.run import train  # noqa: E402

VOCAB = 50257  # GPT-2's, so the GPT-2 tokenizer fits
TINY = dict(n_layer=2, n_head=2, n_embd=32)


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.lm_head(model.hidden_states(idx))


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random GPT2LMHeadModel (64 positions) saved the way from_pretrained expects."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, vocab_size=VOCAB, **TINY)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_import_gpt2_gives_transformers_logits(tmp_path, activation):
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_positions=64, vocab_size=VOCAB, activation_function=activation, **TINY)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)
    model = hf.open_pretrained(str(tmp_path)).model().eval()
    assert model.config.gelu_approx == ("tanh" if activation == "gelu_new" else "none")
    idx = tokens(64)
    torch.testing.assert_close(all_logits(model, idx), hf_logits(reference, idx), atol=1e-5, rtol=0)


def test_import_hub_layout_crops_positions(hf_gpt2, tmp_path):
    # the hub's GPT-2 files name GPT2Model's tensors (no "transformer.") and keep the causal masks
    reference, folder = hf_gpt2
    weights = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    weights["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    model = hf.open_pretrained(str(tmp_path)).model(block_size=16, dropout=0.1)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32)
    idx = tokens(16)
    torch.testing.assert_close(all_logits(model.eval(), idx), hf_logits(reference, idx), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="block_size 128 exceeds"):
        hf.open_pretrained(str(tmp_path)).model(block_size=128)


def test_import_refuses_what_smallgpt_cannot_compute(hf_gpt2, tmp_path):
    _, folder = hf_gpt2
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx=True has no smallgpt equivalent"):
        hf.open_pretrained(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        hf.open_pretrained(str(tmp_path / "empty"))


EXPORTS = {
    "gpt2": dict(bias=True),
    "gpt2-nobias-tanh": dict(bias=False, gelu_approx="tanh"),
    "llama": dict(bias=False, norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_theta=500.0),
    "llama-bias": dict(bias=True, norm="rmsnorm", mlp="swiglu", pos_emb="rope"),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(tmp_path, name, make_run):
    config = ModelConfig(block_size=48, vocab_size=VOCAB, **TINY, **EXPORTS[name])
    model = make_run(tmp_path / "run", config, GPT2Tokenizer())
    out = export(ExportArgs(run=str(tmp_path / "run"), out=str(tmp_path / "hf")))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == ("LlamaForCausalLM" if "llama" in name else "GPT2LMHeadModel")
    idx = tokens(48)
    torch.testing.assert_close(hf_logits(theirs, idx), all_logits(model, idx), atol=1e-5, rtol=0)

    prompt = idx[:1, :8]
    ours = DecodeEngine(model, max_batch=1).generate(prompt[0].tolist(), SamplingSettings(24, temperature=0))
    generated = theirs.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated[0, 8:].tolist() == list(ours)

    # and back: the exported folder imports into the same model
    back = hf.open_pretrained(str(out)).model().eval()
    torch.testing.assert_close(all_logits(back, idx), all_logits(model, idx), atol=1e-6, rtol=0)


def test_export_writes_the_gpt2_tokenizer_for_autotokenizer(tmp_path, capsys, make_run):
    make_run(tmp_path / "run", ModelConfig(block_size=16, vocab_size=VOCAB, **TINY), GPT2Tokenizer())
    assert (
        cli.main(["export", "--run", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")])
        == 0
    )
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello, world!  Ünïcödé text, 中文 and emoji 🙂\n\n  tabs\tand 1234 numbers"
    assert theirs.encode(text) == GPT2Tokenizer().encode(text)
    assert theirs.encode("<|endoftext|>") == [theirs.eos_token_id] == [GPT2Tokenizer().eot_id]


def test_export_char_run_keeps_weights_and_says_the_tokenizer_is_smallgpt_only(tmp_path, capsys, make_run):
    tokenizer = CharTokenizer("abcdefgh ")
    config = ModelConfig(block_size=16, vocab_size=tokenizer.vocab_size, **TINY)
    model = make_run(tmp_path / "run", config, tokenizer)
    out = export(ExportArgs(run=str(tmp_path / "run"), out=str(tmp_path / "hf")))
    assert "only smallgpt reads this one" in capsys.readouterr().out
    assert not (out / "vocab.json").exists() and not (out / "tokenizer.json").exists()
    back = hf.open_pretrained(str(out))
    assert back.tokenizer.fingerprint() == tokenizer.fingerprint()
    idx = torch.randint(0, tokenizer.vocab_size, (1, 16))
    torch.testing.assert_close(all_logits(back.model().eval(), idx), all_logits(model, idx))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(pos_emb="rope"), "norm='layernorm' with pos_emb=rope"),
        (dict(norm="rmsnorm"), "norm='rmsnorm' with pos_emb=learned"),
        (dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", qk_norm=True), "qk_norm=True"),
        (dict(mlp="relu2"), "mlp='relu2'"),
        (dict(logit_softcap=30.0), "logit_softcap=30.0"),
    ],
)
def test_export_refuses_options_transformers_lacks(tmp_path, options, named, make_run):
    make_run(
        tmp_path / "run", ModelConfig(block_size=16, vocab_size=VOCAB, **TINY, **options), GPT2Tokenizer()
    )
    with pytest.raises(UserError, match=f"cannot export {named}"):
        export(ExportArgs(run=str(tmp_path / "run"), out=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()


def test_offline_download_is_one_line_user_error(monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError(
            "Cannot find the requested files in the disk cache and outgoing traffic is off."
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert cli.main(["sample", "--init-from", "gpt2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download openai-community/gpt2") and "local folder" in err
    assert err.count("\n") == 1


def test_sample_from_a_hugging_face_folder_is_greedy_transformers(hf_gpt2):
    reference, folder = hf_gpt2
    out = io.StringIO()
    options = dict(max_new_tokens=6, temperature=0.0, device="cpu")
    sample(SampleArgs(init_from=str(folder), start="Hello there", num_samples=1, **options), out)
    prompt = torch.tensor([GPT2Tokenizer().encode("Hello there")])
    generated = reference.generate(
        prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out.getvalue().startswith(GPT2Tokenizer().decode(generated[0].tolist()) + "\n---")
    with pytest.raises(UserError, match="either --run DIR or --init-from"):
        sample(SampleArgs(max_new_tokens=2))


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:40_000]
    folder = tmp_path_factory.mktemp("gpt2data")
    (folder / "input.txt").write_text(text, encoding="utf-8")
    run_prepare(PrepareArgs(input=str(folder / "input.txt"), tokenizer="gpt2", out=str(folder / "data")))
    return folder / "data"


def train_args(data, out_dir, *extra):
    common = ["--batch_size=4", "--eval_iters=2", "--eval_interval=4", "--progress=false", "--device=cpu"]
    return ["train", f"--dataset={data}", f"--out_dir={out_dir}", *common, *extra]


def test_fine_tune_from_a_hugging_face_folder(hf_gpt2, gpt2_data, tmp_path):
    reference, folder = hf_gpt2
    args = train_args(gpt2_data, tmp_path / "ft", f"--init_from={folder}", "--block_size=32", "--dropout=0.1")
    assert (
        cli.main([*args, "--max_iters=8", "--learning_rate=1e-3", "--warmup_iters=0", "--log_interval=1"])
        == 0
    )
    tuned = checkpoint.load_model(tmp_path / "ft" / "ckpt" / "last")
    c = tuned.config
    assert (c.n_layer, c.n_embd, c.block_size, c.dropout, c.gelu_approx) == (2, 32, 32, 0.1, "tanh")
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    # fine-tuned from the pretrained weights (8 small Adam steps away), not re-initialised (~0.1 away)
    pairs = [
        (tuned.transformer.wpe.weight, reference.transformer.wpe.weight[:32]),
        (tuned.transformer.h[0].attn.c_attn.weight, reference.transformer.h[0].attn.c_attn.weight.t()),
    ]
    for ours, theirs in pairs:
        assert 0 < (ours - theirs).abs().max() < 0.02


def test_fine_tune_needs_the_models_tokenizer(hf_gpt2, tmp_path, char_data):
    _, folder = hf_gpt2
    with pytest.raises(UserError, match="--tokenizer gpt2"):
        train(load_config(None, train_args(char_data, tmp_path / "x", f"--init_from={folder}")[1:]))


def test_init_from_must_name_a_model_or_folder(tmp_path):
    config = load_config(None, [f"--dataset={tmp_path}", "--init_from=gpt3"])
    with pytest.raises(UserError, match="init_from must be scratch, resume, gpt2"):
        config.validate()
