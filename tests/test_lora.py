"""LoRA (model/lora.py): adapters on a frozen model, their small checkpoints, exact resume, and the
one loading path (runs.load_run) merging them for sample, serve, export and classify."""

import asyncio
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_classify import make_backbone_run, quick_args, synthetic_rows, write_csv  # noqa: F401, F811
from test_serve import sampled

from smallgpt.classify.evaluate import load_classifier
from smallgpt.classify.train import train_classifier
from smallgpt.cli import main
from smallgpt.config import load_config
from smallgpt.export import ExportArgs, export
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.model.lora import LORA_LAYERS, LoRAConfig, LoRALinear, add_lora, merge_lora
from smallgpt.runs import load_run
from smallgpt.train import checkpoint
from smallgpt.train.run import train

QUIET = ["--progress=false", "--device=cpu", "--eval_iters=2", "--log_interval=1", "--batch_size=4"]
ALL_LAYERS = ",".join(LORA_LAYERS)
CPU = torch.device("cpu")


def lora_args(data, out_dir, base, *extra):
    return [
        f"--dataset={data}",
        f"--out_dir={out_dir}",
        f"--init_from={base}",
        "--lora_rank=4",
        *QUIET,
        *extra,
    ]


def all_logits(model, idx):
    return model.lm_head(model.hidden_states(idx))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_run, char_data):
    """Adapters on every Linear of the base's blocks, trained far enough to move the logits."""
    out = tmp_path_factory.mktemp("lora") / "lora"
    args = lora_args(char_data, out, base_run, f"--lora_layers={ALL_LAYERS}", "--max_iters=6")
    assert main(["train", *args, "--eval_interval=3", "--learning_rate=3e-2", "--warmup_iters=0"]) == 0
    return out


def test_fresh_adapters_leave_the_model_as_it_was_and_merging_keeps_its_function():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 50, (2, 16))
    before = all_logits(model, idx)
    add_lora(model, LoRAConfig(rank=2, layers=ALL_LAYERS))
    assert torch.equal(all_logits(model, idx), before)  # B starts at zero
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b, std=0.1)
    unmerged = all_logits(model, idx)
    assert not torch.allclose(unmerged, before, atol=1e-3)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(all_logits(model, idx), unmerged, atol=1e-5, rtol=0)


def test_only_the_adapters_train_and_the_checkpoint_holds_them_alone(lora_run, base_run):
    weights = load_file(str(lora_run / "ckpt" / "last" / checkpoint.WEIGHTS))
    # rank 4 on the (in, out) sizes of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; 2 blocks
    per_block = sum(4 * (fan_in + fan_out) for fan_in, fan_out in ((32, 96), (32, 32), (32, 128), (128, 32)))
    assert sum(t.numel() for t in weights.values()) == 2 * per_block
    assert {name.rsplit(".", 1)[1] for name in weights} == {"lora_a", "lora_b"}
    assert all(t.abs().max() > 0 for t in weights.values())  # every one of them trained
    state = checkpoint.load_state(lora_run / "ckpt" / "last")
    assert len(state["optimizer"]["state"]) == len(weights)  # AdamW keeps state for the adapters alone
    size = (lora_run / "ckpt" / "last" / checkpoint.WEIGHTS).stat().st_size
    assert size < (base_run / "ckpt" / "best" / checkpoint.WEIGHTS).stat().st_size / 3
    # the merged model's weights without adapters are the base's, bit for bit
    base = checkpoint.load_model(base_run / "ckpt" / "best").state_dict()
    merged, _ = load_run(lora_run, CPU, "last")
    for name, tensor in merged.state_dict().items():
        adapted = name.endswith("weight") and (".attn.c_" in name or ".mlp.c_" in name)
        assert torch.equal(tensor, base[name]) != adapted, name


def test_merged_and_unmerged_logits_agree(lora_run):
    ckpt = lora_run / "ckpt" / "last"
    unmerged = checkpoint.load_model(ckpt, merge=False)
    assert any(isinstance(m, LoRALinear) for m in unmerged.modules())
    merged, _ = load_run(lora_run, CPU, "last")
    idx = torch.randint(0, merged.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(merged, idx), all_logits(unmerged, idx), atol=1e-5, rtol=0)


def test_resume_reproduces_the_uninterrupted_lora_run(base_run, char_data, tmp_path):
    common = [
        "--eval_interval=4",
        "--lora_dropout=0.1",
        "--dropout=0.1",
        "--lr_decay_iters=8",
        "--warmup_iters=2",
    ]
    train(load_config(None, lora_args(char_data, tmp_path / "full", base_run, "--max_iters=8", *common)))
    train(load_config(None, lora_args(char_data, tmp_path / "split", base_run, "--max_iters=4", *common)))
    resume = lora_args(char_data, tmp_path / "split", "resume", "--max_iters=8", *common)
    train(load_config(None, resume))

    def losses(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["event"] == "train"]

    assert len(losses(tmp_path / "full")) == 8
    assert losses(tmp_path / "full") == losses(tmp_path / "split")  # bit for bit
    full = load_file(str(tmp_path / "full" / "ckpt" / "last" / checkpoint.WEIGHTS))
    split = load_file(str(tmp_path / "split" / "ckpt" / "last" / checkpoint.WEIGHTS))
    assert full.keys() == split.keys()
    assert all(torch.equal(full[k], split[k]) for k in full)


def test_a_missing_or_changed_base_is_a_one_line_error(lora_run, base_run, char_data, tmp_path, capsys):
    moved = tmp_path / "alone" / "lora"
    shutil.copytree(lora_run, moved)  # without its base next to it
    assert main(["sample", "--run", str(moved), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which is missing" in err[0]
    # a copy of the pair (the base where the adapters' relative path finds it), whose base then
    # trains on: the adapters no longer fit it
    pair = {run: tmp_path / "pair" / run.parent.name / run.name for run in (base_run, lora_run)}
    for run, copy in pair.items():
        shutil.copytree(run, copy)
    base = pair[base_run]
    more = [f"--dataset={char_data}", f"--out_dir={base}", "--init_from=resume", "--max_iters=30", *QUIET]
    assert main(["train", *more, "--eval_interval=10"]) == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(pair[lora_run]), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which has changed since" in err[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_rank=0"], "lora_rank must be positive, got 0"),
        (["--lora_rank=-2"], "lora_rank must be positive, got -2"),
        (["--lora_layers=attn.c_atn"], "no layer 'attn.c_atn' in a block; did you mean 'attn.c_attn'?"),
        (
            ["--init_from=scratch"],
            "LoRA (lora_rank) trains adapters on a model: set init_from to a run folder",
        ),
    ],
)
def test_bad_lora_settings_are_one_line_errors(base_run, char_data, tmp_path, capsys, flags, message):
    args = lora_args(char_data, tmp_path / "out", base_run, "--max_iters=1", *flags)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


def test_export_and_serve_give_the_merged_model(lora_run, tmp_path, capsys):
    from smallgpt.decode import SamplingSettings
    from smallgpt.serve.models import load_models

    unmerged = checkpoint.load_model(checkpoint.find_checkpoint(lora_run), merge=False)
    idx = torch.randint(0, unmerged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    out = export(ExportArgs(run=str(lora_run), out=str(tmp_path / "hf")))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, all_logits(unmerged, idx), atol=1e-5, rtol=0)

    models = load_models([str(lora_run)], "", "best", CPU, 2, 2, max_tokens_limit=12)
    try:
        [served] = models.values()
        prompt, _ = served.encode("ROMEO:")
        text = asyncio.run(served.complete(prompt, SamplingSettings(max_new_tokens=12, temperature=0)).text())
    finally:
        served.scheduler.stop()
    assert len(text) == 12 and text == sampled(capsys, lora_run, "ROMEO:", 12, "--temperature", "0")


def test_classify_trains_the_adapters_and_the_head_alone(tmp_path, make_backbone_run):  # noqa: F811
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(120), header=("label", "text"))
    out = tmp_path / "cls"
    train_classifier(quick_args(data, backbone_run, out, lora_rank=4, epochs=2, learning_rate=1e-2))
    weights = load_file(str(out / "ckpt" / "best" / checkpoint.WEIGHTS))
    assert {k.rsplit(".", 1)[1] for k in weights if not k.startswith("head.")} == {"lora_a", "lora_b"}
    # rank 4 on attn.c_attn (32 -> 96) and attn.c_proj (32 -> 32) of 2 blocks, a 2-class head on 32
    assert sum(t.numel() for t in weights.values()) == 2 * (4 * (32 + 96) + 4 * (32 + 32)) + 32 * 2 + 2
    model = load_classifier(out, CPU)[0]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged for inference
    base = checkpoint.load_model(backbone_run / "ckpt" / "best").state_dict()
    for name, tensor in model.backbone.state_dict().items():
        adapted = name.endswith("weight") and ".attn.c_" in name
        assert torch.equal(tensor, base[name]) != adapted, name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-rank", "0"], "lora_rank must be positive, got 0"),
        (["--lora-rank", "4", "--lora-layers", "mlp.fc"], "no layer 'mlp.fc' in a block"),
        (["--lora-rank", "4", "--freeze-backbone"], "it cannot be frozen too"),
    ],
)
def test_classify_bad_lora_settings_are_one_line_errors(
    tmp_path,
    make_backbone_run,  # noqa: F811
    capsys,
    flags,
    message,  # noqa: F811
):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(40), header=("label", "text"))
    out = tmp_path / "cls"
    args = ["classify", "train", "--data", str(data), "--init-from", str(backbone_run), "--out-dir", str(out)]
    assert main([*args, "--device", "cpu", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not out.exists()
