import argparse
import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smallgpt.classify.data import (
    ClassifyBatches,
    Windows,
    collate,
    collate_windows,
    encode_texts,
    label_ids,
    read_examples,
    sorted_labels,
    stratified_split,
)
from smallgpt.classify.evaluate import (
    confusion_matrix,
    ensemble_probabilities,
    load_classifier,
    load_ensemble,
    predict_logits,
    scores,
)
from smallgpt.classify.model import ClassifierConfig, GPTClassifier, echo, pool
from smallgpt.classify.train import ClassifyTrainArgs, layer_lr_groups, load_splits, train_classifier
from smallgpt.cli import main
from smallgpt.data.tokenizers import CharTokenizer
from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.train import checkpoint

ALPHABET = "abcxyz .,"
TINY = dict(block_size=24, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="session")
def make_backbone_run(make_run):
    """A run folder with a random tiny char GPT over ALPHABET, as `smallgpt train` would leave it."""

    def make(run_dir, **overrides):
        tokenizer = CharTokenizer(ALPHABET)
        make_run(run_dir, ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY, **overrides}), tokenizer)
        return run_dir

    return make


def synthetic_rows(n, seed=0):
    """Separable: class 'abc' texts use only a/b/c, class 'xyz' only x/y/z; 3 to 30 characters,
    so some exceed block_size 24 and are truncated."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "abc" if i % 2 else "xyz"
        rows.append((label, "".join(rng.choice(label) for _ in range(rng.randint(3, 30)))))
    return rows


def quick_args(data, backbone_run, out, **overrides) -> ClassifyTrainArgs:
    """Fine-tuning settings for the tiny backbone: batches of 8 on the CPU, no progress bar."""
    return ClassifyTrainArgs(
        data=str(data), init_from=str(backbone_run), out_dir=str(out), batch_size=8, progress=False,
        device="cpu", **overrides,
    )  # fmt: skip


def write_csv(path, rows, header=("label", "review"), delimiter=","):
    lines = [delimiter.join(header)] + [delimiter.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_backbone_run):
    """A classifier trained through the CLI on the synthetic task, with its backbone and data."""
    root = tmp_path_factory.mktemp("classify")
    backbone = make_backbone_run(root / "backbone")
    data = write_csv(root / "reviews.csv", synthetic_rows(300) + [("abc", "")])  # one empty text
    run = root / "cls"
    code = main(
        [
            "classify",
            "train",
            "--data",
            str(data),
            "--text-column",
            "review",
            "--init-from",
            str(backbone),
            "--out-dir",
            str(run),
            "--epochs",
            "4",
            "--learning-rate",
            "3e-3",
            "--batch-size",
            "16",
            "--no-progress",
            "--device",
            "cpu",
            "--group-by-length",
            "--dropout",
            "0.05",
        ]  # fmt: skip
    )
    assert code == 0
    return {"root": root, "backbone": backbone, "data": data, "run": run}


# ---- the model -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "padding_side,pos_emb,pooling",
    [
        ("right", "learned", "last"),
        ("left", "rope", "last"),
        ("right", "learned", "mean"),
        ("left", "rope", "mean"),
        ("right", "learned", "meanmax"),
        ("left", "rope", "meanmax"),
    ],
)
def test_masked_padding_gives_the_unpadded_logits(padding_side, pos_emb, pooling):
    # with right padding real tokens keep their positions; left padding shifts them, which rotary
    # (relative) positions do not notice, so both sides must match a lone forward pass exactly
    torch.manual_seed(0)
    backbone = GPT(ModelConfig(vocab_size=12, pos_emb=pos_emb, **TINY))
    model = GPTClassifier(backbone, ClassifierConfig(3, pooling, padding_side=padding_side)).eval()
    texts = [np.array([3, 4, 5, 6, 7, 8, 9]), np.array([2, 5]), np.array([11, 10, 9, 8])]
    x, real = collate(texts, pad_id=0, padding_side=padding_side, device=torch.device("cpu"))
    assert real.sum(1).tolist() == [7, 2, 4]
    with torch.no_grad():
        batched = model(x, real)
        for row, ids in enumerate(texts):
            alone = torch.from_numpy(ids)[None]
            torch.testing.assert_close(
                batched[row], model(alone, torch.ones_like(alone, dtype=torch.bool))[0]
            )


def test_meanmax_pools_the_mean_and_the_max_of_the_real_tokens():
    hidden = torch.tensor([[[1.0, -4.0], [3.0, -2.0], [50.0, 50.0]]])  # the third position is padding
    real = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pool(hidden, real, "meanmax"), torch.tensor([[2.0, -3.0, 3.0, -2.0]]))
    model = GPTClassifier(GPT(ModelConfig(vocab_size=12, **TINY)), ClassifierConfig(2, "meanmax"))
    assert model.head.in_features == 2 * TINY["n_embd"]


def test_without_mask_padding_changes_the_logits():
    # the seed's "no mask" variant: the model is not told where padding is, so padding matters
    torch.manual_seed(0)
    model = GPTClassifier(
        GPT(ModelConfig(vocab_size=12, **TINY)), ClassifierConfig(2, mask_padding=False)
    ).eval()
    texts = [np.array([3, 4, 5, 6, 7]), np.array([2, 5])]
    x, real = collate(texts, pad_id=0, padding_side="right", device=torch.device("cpu"))
    with torch.no_grad():
        padded = model(x, real)[1]
        alone = model(x[1:, :2], real[1:, :2])[0]
    assert not torch.allclose(padded, alone)


# without a mask, left pads are context to the text after them; right pads come after it and causal
# attention keeps them out, so those three cases must give the unpadded loss
@pytest.mark.parametrize("padding_side, mask_padding", [("right", True), ("left", True), ("right", False)])
def test_next_token_loss_is_the_language_model_loss_over_the_texts(padding_side, mask_padding):
    torch.manual_seed(0)
    backbone = GPT(ModelConfig(vocab_size=12, pos_emb="rope", **TINY))
    config = ClassifierConfig(2, padding_side=padding_side, mask_padding=mask_padding)
    model = GPTClassifier(backbone, config).eval()
    texts = [np.array([3, 4, 5, 6, 7, 8, 9]), np.array([2, 5]), np.array([11, 10, 9, 8])]
    x, real = collate(texts, pad_id=0, padding_side=padding_side, device=torch.device("cpu"))
    with torch.no_grad():
        logits, lm_loss = model(x, real, with_lm_loss=True)
        torch.testing.assert_close(logits, model(x, real))
        # the mean over every (text token -> next text token) pair: each text's own LM loss,
        # weighted by its number of pairs
        alone = [backbone(torch.from_numpy(t[:-1])[None], torch.from_numpy(t[1:])[None])[1] for t in texts]
    pairs = torch.tensor([len(t) - 1 for t in texts], dtype=torch.float32)
    torch.testing.assert_close(lm_loss, (torch.stack(alone) * pairs).sum() / pairs.sum())


def test_echo_reads_text_separator_text_and_pools_each_token_once():
    texts = [np.array([3, 4, 5, 6, 7]), np.array([2, 5]), np.array([9])]
    for side in ("right", "left"):
        x, real = collate(texts, pad_id=0, padding_side=side, device=torch.device("cpu"))
        echoed = echo(x, real, separator=1, block_size=8)
        # the 5-token text leaves room for the repeat of its first 2 tokens only
        assert echoed.ids.tolist() == [
            [3, 4, 5, 6, 7, 1, 3, 4],
            [2, 5, 1, 2, 5, 1, 1, 1],
            [9, 1, 9, 1, 1, 1, 1, 1],
        ]
        assert echoed.text.sum(1).tolist() == [8, 5, 3]
        assert echoed.first.sum(1).tolist() == [5, 2, 1]
        for row, ids in enumerate(texts):  # pooling reads every text token once, none twice
            assert sorted(echoed.ids[row][echoed.pooled[row]].tolist()) == sorted(ids.tolist())
        assert echoed.pooled[0].tolist() == [False, False, True, True, True, False, True, True]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_echo_keeps_padding_invisible_and_the_lm_loss_on_the_text(padding_side):
    torch.manual_seed(0)
    backbone = GPT(ModelConfig(vocab_size=12, pos_emb="rope", **TINY))
    plain = GPTClassifier(backbone, ClassifierConfig(2, padding_side=padding_side)).eval()
    echoing = GPTClassifier(backbone, ClassifierConfig(2, padding_side=padding_side, echo_separator=0)).eval()
    echoing.head = plain.head
    texts = [np.array([3, 4, 5, 6, 7, 8, 9]), np.array([2, 5]), np.array([11, 10, 9, 8])]
    x, real = collate(texts, pad_id=0, padding_side=padding_side, device=torch.device("cpu"))
    with torch.no_grad():
        logits, lm_loss = echoing(x, real, with_lm_loss=True)
        plain_logits, plain_lm_loss = plain(x, real, with_lm_loss=True)
        for row, ids in enumerate(texts):
            alone = torch.from_numpy(ids)[None]
            lone = echoing(alone, torch.ones_like(alone, dtype=torch.bool))[0]
            torch.testing.assert_close(logits[row], lone)
    # the first copy is the text as the plain model reads it; the repeat changes what is pooled
    torch.testing.assert_close(lm_loss, plain_lm_loss)
    assert not torch.allclose(logits, plain_logits)


def test_echo_trains_and_reloads(tmp_path, make_backbone_run):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(120), header=("label", "text"))
    out = tmp_path / "cls"
    args = quick_args(data, backbone_run, out, echo=True, epochs=4, learning_rate=3e-3)
    assert train_classifier(args)["accuracy"] == 1.0
    model = load_classifier(out, torch.device("cpu"))[0]
    assert model.config.echo_separator == CharTokenizer(ALPHABET).eot_id


def test_lm_loss_weight_keeps_the_backbone_a_language_model(tmp_path, make_backbone_run):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    rows = synthetic_rows(120)
    data = write_csv(tmp_path / "d.csv", rows, header=("label", "text"))
    tokenizer = CharTokenizer(ALPHABET)
    texts = [torch.tensor(tokenizer.encode(text))[None, :24] for _, text in rows]

    def lm_loss_after(weight: float) -> float:
        out = tmp_path / f"cls_{weight}"
        args = quick_args(data, backbone_run, out, lm_loss_weight=weight, epochs=4, learning_rate=3e-3)
        assert train_classifier(args)["accuracy"] == 1.0
        backbone = load_classifier(out, torch.device("cpu"), "last")[0].backbone
        with torch.no_grad():
            return float(torch.stack([backbone(t[:, :-1], t[:, 1:])[1] for t in texts]).mean())

    # a random backbone starts near log(9) = 2.2 nats; only the auxiliary loss teaches it the texts
    assert lm_loss_after(1.0) < lm_loss_after(0.0) - 0.5


def test_layer_lr_groups_scale_each_depth_below_the_head(make_backbone_run, tmp_path):
    backbone = checkpoint.load_model(make_backbone_run(tmp_path / "backbone", n_layer=3) / "ckpt" / "best")
    model = GPTClassifier(backbone, ClassifierConfig(num_classes=2))
    groups = layer_lr_groups(model, weight_decay=0.01, layer_lr_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert sorted(map(id, model.parameters())) == sorted(scale_of)  # each parameter once
    blocks = model.backbone.transformer.h
    expected = {
        "head": (model.head, 1.0),
        "final norm": (model.backbone.transformer.ln_f, 1.0),
        "top block": (blocks[2], 0.5),
        "bottom block": (blocks[0], 0.125),
        "embeddings": (model.backbone.transformer.wte, 0.0625),
    }
    for name, (module, scale) in expected.items():
        assert {scale_of[id(p)] for p in module.parameters()} == {scale}, name
    assert groups[0]["lr_scale"] == 1.0  # the group whose lr the trainer logs runs at the schedule's lr
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.head.weight) in decayed and id(model.head.bias) not in decayed


def test_layer_lr_decay_moves_the_embeddings_less(tmp_path, make_backbone_run):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(80), header=("label", "text"))
    before = checkpoint.load_model(backbone_run / "ckpt" / "best").transformer.wte.weight.detach()

    def embedding_change(layer_lr_decay: float) -> float:
        out = tmp_path / f"cls_{layer_lr_decay}"
        args = quick_args(
            data, backbone_run, out, layer_lr_decay=layer_lr_decay, max_iters=10, learning_rate=3e-3
        )
        train_classifier(args)
        after = load_file(str(out / "ckpt" / "last" / "model.safetensors"))["backbone.transformer.wte.weight"]
        return float((after - before).abs().max())

    # three levels below the head (two blocks, then the embeddings): 0.1 ** 3 of the lr
    assert embedding_change(0.1) < embedding_change(1.0) / 100


def eval_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "eval"]


def test_adapt_iters_trains_the_backbone_on_the_training_texts_only(tmp_path, make_backbone_run, capsys):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(200), header=("label", "text"))
    out = tmp_path / "cls"
    args = quick_args(data, backbone_run, out, adapt_iters=40, adapt_learning_rate=1e-2, epochs=1)
    train_classifier(args)
    train_texts = load_splits(args).train.texts  # the seeded split: val and test texts left out
    tokens = sum(len(text) + 1 for text in train_texts)  # chars, each text closed by end-of-text
    assert f"on {tokens:,} tokens of training text: 40 steps" in capsys.readouterr().out
    adapted = out / "adapted"
    losses = [r["train_loss"] for r in eval_records(adapted)]
    assert losses[-1] < losses[0] - 0.5  # a random backbone starts near log(9) = 2.2 nats
    assert checkpoint.read_tags(out / "ckpt" / "best")["backbone"] == str(adapted)
    assert main(["sample", "--run", str(adapted), "--start", "abc", "--max-new-tokens", "5"]) == 0


def test_ablate_adapts_once_for_every_variant(tmp_path, make_backbone_run, capsys):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(80), header=("label", "text"))
    out = tmp_path / "ablate"
    flags = ["--data", str(data), "--init-from", str(backbone_run), "--out-dir", str(out)]
    assert main(["classify", "ablate", *flags, "--adapt-iters", "3", "--epochs", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("adapting ") == 1  # one adaptation, not one per variant
    for variant in ("nomask_full", "mask_full", "mask_frozen"):
        tags = checkpoint.read_tags(out / variant / "ckpt" / "last")
        assert tags["backbone"] == str(out / "adapted")
        assert not (out / variant / "adapted").exists()


def test_a_classify_run_is_replaced_only_with_overwrite(tmp_path, make_backbone_run, folder_hashes):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(80), header=("label", "text"))
    out = tmp_path / "cls"
    train_classifier(quick_args(data, backbone_run, out, max_iters=2, adapt_iters=2))
    half = tmp_path / "half"  # a run cut short after adapting its backbone
    shutil.copytree(out / "adapted", half / "adapted")
    before = folder_hashes(tmp_path)
    for args in (quick_args(data, backbone_run, out, max_iters=3), quick_args(data, backbone_run, half)):
        with pytest.raises(UserError, match="already holds a classify run: pass --overwrite"):
            train_classifier(args)
    flags = ["--data", str(data), "--init-from", str(backbone_run), "--out-dir", str(out), "--device", "cpu"]
    assert main(["classify", "ablate", *flags, "--max-iters", "1"]) == 2  # ablate into it too
    assert folder_hashes(tmp_path) == before
    # --overwrite: a run without adaptation replaces the adapted one, none of which is left
    train_classifier(quick_args(data, backbone_run, out, max_iters=3, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            ".lock",
            "ckpt",
            "classify.json",
            "eval.json",
            "labels.json",
            "metrics.jsonl",
            "test.jsonl",
            "tokenizer.json",
        ]
    )
    assert checkpoint.load_state(out / "ckpt" / "last")["iter_num"] == 3


def test_frozen_backbone_is_bit_identical_after_training(tmp_path, make_backbone_run):
    backbone_run = make_backbone_run(tmp_path / "backbone", dropout=0.1)
    data = write_csv(tmp_path / "d.csv", synthetic_rows(80), header=("label", "text"))
    before = checkpoint.load_model(backbone_run / "ckpt" / "best").state_dict()
    args = quick_args(
        data, backbone_run, tmp_path / "cls", freeze_backbone=True, epochs=2, learning_rate=1e-2
    )
    train_classifier(args)
    # the saved classifier's backbone.* tensors must equal the pretrained run's, bit for bit
    weights = load_file(str(tmp_path / "cls" / "ckpt" / "last" / "model.safetensors"))
    assert "head.weight" in weights
    for name, tensor in before.items():
        if name != "lm_head.weight":
            assert torch.equal(weights[f"backbone.{name}"], tensor), name
    head_init = torch.zeros(2)  # the head's bias starts at zero; training must have moved it
    assert not torch.equal(weights["head.bias"], head_init)


def test_patience_stops_when_val_accuracy_stops_improving(tmp_path, make_backbone_run):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(80), header=("label", "text"))
    args = quick_args(
        data, backbone_run, tmp_path / "cls", max_iters=400, eval_interval=4, patience=2, learning_rate=3e-3
    )
    train_classifier(args)
    events = [json.loads(line) for line in (tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["iter"] < 400
    errors = [e["val_error"] for e in evals]
    # it stopped two evaluations after the last new best (a tie is no improvement)
    last_best = errors.index(min(errors))
    assert len(evals) - 1 - last_best == 2


# ---- training, eval and predict through the CLI ------------------------------------------------
def test_separable_task_reaches_full_accuracy(trained, capsys):
    run = trained["run"]
    result = json.loads((run / "eval.json").read_text())
    assert result["split"] == "test" and result["accuracy"] >= 0.97
    assert json.loads((run / "labels.json").read_text()) == {"labels": ["abc", "xyz"]}
    assert checkpoint.read_model_config(run / "ckpt" / "best").dropout == 0.05  # --dropout reached the model
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["event"] == "eval"]
    assert evals[-1]["val_accuracy"] >= 0.97 and "val_macro_f1" in evals[-1]
    # tokens count the texts (3 to 24 tokens, about 16 on average), not batch_size x block_size (16 x 24)
    last = [m for m in metrics if m["event"] == "train"][-1]
    assert 16 * 12 < last["tokens"] / (last["iter"] + 1) < 16 * 20
    assert main(["classify", "eval", "--run", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "true \\ predicted" in out
    assert json.loads((run / "eval.json").read_text())["confusion"]


def test_predict_a_text_and_a_file(trained, capsys, tmp_path):
    run = str(trained["run"])
    assert main(["classify", "predict", "--run", run, "--device", "cpu", "abcabcab"]) == 0
    label, probs, text = capsys.readouterr().out.strip().split("\t")
    assert label == "abc" and text == "abcabcab" and probs.startswith("abc=")
    lines = tmp_path / "texts.txt"
    lines.write_text("xyzzyx\n\nacbca\nxyq\n", encoding="utf-8")  # 'q' is unseen: <|unk|>
    assert main(["classify", "predict", "--run", run, "--device", "cpu", "--file", str(lines)]) == 0
    out = capsys.readouterr().out
    labels = [line.split("\t")[0] for line in out.splitlines() if "\t" in line]
    assert labels[:2] == ["xyz", "abc"] and len(labels) == 3
    assert "1 with unseen characters" in out


def test_an_ensemble_averages_its_members_probabilities(trained, tmp_path, capsys, make_backbone_run):
    run = str(trained["run"])
    data = write_csv(tmp_path / "d.csv", synthetic_rows(60, seed=1), header=("label", "text"))
    other = tmp_path / "other"  # a second member: another backbone, two epochs
    train_classifier(quick_args(data, make_backbone_run(tmp_path / "backbone"), other, epochs=2))
    cpu = torch.device("cpu")
    members, names, _ = load_ensemble(f"{run},{other}", cpu)
    texts = ["abcab", "xyzzy", "abxyz"]
    each = [ensemble_probabilities([member], texts, 8, cpu) for member in members]
    torch.testing.assert_close(ensemble_probabilities(members, texts, 8, cpu), (each[0] + each[1]) / 2)
    assert not torch.allclose(each[0], each[1])

    test = str(trained["run"] / "test.jsonl")
    capsys.readouterr()
    assert main(["classify", "eval", "--run", run, "--device", "cpu"]) == 0
    alone = capsys.readouterr().out
    # a run beside itself is the run: the same metrics; an ensemble writes them only with --out
    before = (trained["run"] / "eval.json").read_text()
    assert main(["classify", "eval", "--run", f"{run},{run}", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2 runs" in out and out.split(": accuracy")[1] == alone.split(": accuracy")[1]
    assert (trained["run"] / "eval.json").read_text() == before
    metrics = tmp_path / "ensemble.json"
    argv = ["classify", "eval", "--run", f"{run},{other}", "--data", test, "--out", str(metrics)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert json.loads(metrics.read_text())["runs"] == [run, str(other)]
    capsys.readouterr()
    assert main(["classify", "predict", "--run", f"{run},{other}", "--device", "cpu", "xyzxy"]) == 0
    assert capsys.readouterr().out.startswith("xyz\t")

    relabelled = write_csv(tmp_path / "r.csv", [(label.upper(), text) for label, text in synthetic_rows(60)])
    upper = tmp_path / "upper"
    train_classifier(quick_args(relabelled, trained["backbone"], upper, max_iters=2, text_column="review"))
    assert main(["classify", "predict", "--run", f"{run},{upper}", "--device", "cpu", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: an ensemble needs the same classes") and str(upper) in err


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    run, backbone, data = str(trained["run"]), str(trained["backbone"]), str(trained["data"])
    cases = []
    missing = ["classify", "train", "--data", data, "--text-column", "text", "--init-from", backbone]
    cases.append((missing, ["'text'", "'label', 'review'", data]))
    unknown = write_csv(tmp_path / "unknown.csv", [("abc", "abc"), ("neutral", "cab")])
    cases.append((["classify", "eval", "--run", run, "--data", str(unknown)], ["'neutral'", str(unknown)]))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases.append(
        (["classify", "train", "--data", str(empty), "--init-from", backbone], [str(empty), "empty"])
    )
    negative = ["classify", "train", "--data", data, "--init-from", backbone, "--lm-loss-weight", "-0.5"]
    cases.append((negative, ["lm-loss-weight must not be negative", "-0.5"]))
    decay = ["classify", "train", "--data", data, "--init-from", backbone, "--layer-lr-decay", "0"]
    cases.append((decay, ["layer-lr-decay must be in (0, 1]", "got 0.0"]))
    for argv, needles in cases:
        assert main([*argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        for needle in needles:
            assert needle in err


# ---- reading labelled data -------------------------------------------------------------------
def test_reads_other_delimiters_tsv_and_jsonl_with_string_or_int_labels(tmp_path):
    rows = [("2", "第一条;好"), ("10", "第二条"), ("2", "  "), ("1", "第三条")]
    semicolon = tmp_path / "d.csv"
    semicolon.write_text("label|review\n" + "\n".join("|".join(r) for r in rows) + "\n", encoding="utf-8")
    examples = read_examples(semicolon, "review", "label")
    assert examples.texts == ["第一条;好", "第二条", "第三条"] and examples.empty_skipped == 1
    assert sorted_labels(examples.labels) == ["1", "2", "10"]  # integers sort as numbers
    tsv = write_csv(tmp_path / "d.tsv", [("pos", "good, nice"), ("neg", "bad")], delimiter="\t")
    assert read_examples(tsv, "review", "label").texts == ["good, nice", "bad"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"t": "好", "y": 1}\n\n{"t": "坏", "y": 0}\n{"t": "", "y": 0}\n', encoding="utf-8")
    examples = read_examples(jsonl, "t", "y")
    assert examples.labels == ["1", "0"] and examples.empty_skipped == 1
    assert label_ids(examples, sorted_labels(examples.labels)).tolist() == [1, 0]
    with pytest.raises(UserError, match="'label' not found .* line 2"):
        jsonl.write_text('{"t": "a", "label": 1}\n{"t": "b"}\n')
        read_examples(jsonl, "t", "label")


def test_stratified_split_keeps_class_proportions():
    labels = np.array([0] * 80 + [1] * 20)
    train, val, test = stratified_split(labels, (0.1, 0.2), seed=3)
    assert (np.bincount(labels[val]).tolist(), np.bincount(labels[test]).tolist()) == ([8, 2], [16, 4])
    assert len(set(train) | set(val) | set(test)) == 100
    again = stratified_split(labels, (0.1, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))


def make_batches(group_by_length, n=1000, batch_size=10, seed=5):
    rng = np.random.default_rng(0)
    ids = [np.arange(1, 1 + rng.integers(1, 200)) for _ in range(n)]
    labels = np.arange(n)  # the label names the example, so a batch tells which texts it holds
    cpu = torch.device("cpu")
    return ClassifyBatches(ids, labels, batch_size, seed, 0, "right", cpu, group_by_length)


def epoch_of_batches(batches):
    return [batches.next_batch() for _ in range(len(batches.ids) // batches.batch_size)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_an_epoch_holds_every_text_once_and_resumes_exactly(group_by_length):
    batches = make_batches(group_by_length, n=1005)  # 5 texts over whole batches: dropped this epoch
    epoch = epoch_of_batches(batches)
    seen = np.concatenate([batch.labels.numpy() for batch in epoch])
    assert all(batch.tokens == int(batch.real.sum()) for batch in epoch)  # text tokens, not padding
    assert len(seen) == len(set(seen.tolist())) == 1000
    for _ in range(3):  # into the next epoch
        batches.next_batch()
    resumed = make_batches(group_by_length, n=1005)
    resumed.load_state_dict(batches.state_dict())
    for a, b in zip(epoch_of_batches(batches), epoch_of_batches(resumed)):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.real, b.real) and torch.equal(a.labels, b.labels)


def test_grouping_by_length_cuts_padding_and_keeps_batches_mixed():
    def padding_and_first_batch(group_by_length):
        epoch = epoch_of_batches(make_batches(group_by_length))
        return sum(int((~batch.real).sum()) for batch in epoch), epoch[0].labels.tolist()

    plain_padding, plain_first = padding_and_first_batch(False)
    grouped_padding, grouped_first = padding_and_first_batch(True)
    assert grouped_padding < plain_padding / 5
    # batches are still drawn at random: a batch is not a run of neighbouring examples
    assert max(grouped_first) - min(grouped_first) > 100 and grouped_first != plain_first


def test_encoding_truncates_to_the_start_and_counts_unknown_characters():
    tokenizer = CharTokenizer("abc")
    encoded = encode_texts(["abcabc", "ab", "aq"], tokenizer, Windows(size=4, stride=2))
    assert encoded.long == 1 and encoded.unknown_texts == 1
    assert tokenizer.decode(encoded.ids[0].tolist()) == "abca"
    assert "1 truncated to their first 4 tokens" in encoded.report("x")
    # with more windows a long text is kept whole: its windows are cut when it is batched
    encoded = encode_texts(["abcabcabcab", "ab"], tokenizer, Windows(size=4, stride=2, count=3))
    assert tokenizer.decode(encoded.ids[0].tolist()) == "abcabcabcab" and encoded.gapped == 1
    assert "1 longer than 4 tokens, read in up to 3 windows, 1 of them with gaps" in encoded.report("x")


def test_metrics_accuracy_macro_f1_confusion():
    confusion = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    result = scores(confusion)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_repeated_rows_across_splits_are_reported(tmp_path, capsys):
    rows = synthetic_rows(40, seed=1)
    data = write_csv(tmp_path / "twice.csv", rows + rows)  # every text twice: splits share texts
    splits = load_splits(ClassifyTrainArgs(data=str(data), text_column="review", init_from="unused"))
    out = capsys.readouterr().out
    train_texts = set(splits.train.texts)
    val_repeats = sum(text in train_texts for text in splits.val.texts)
    assert val_repeats > 0
    assert f"warning: {val_repeats} of the {len(splits.val.texts)} val texts are also training texts" in out
    unique_rows = [(label, f"{text}{i}") for i, (label, text) in enumerate(rows)]
    distinct = write_csv(tmp_path / "once.csv", unique_rows)
    load_splits(ClassifyTrainArgs(data=str(distinct), text_column="review", init_from="unused"))
    assert "warning" not in capsys.readouterr().out


# ---- long texts read in windows ----------------------------------------------------------------
def test_windows_are_spread_from_the_start_to_the_end_at_most_stride_apart():
    windows = Windows(size=4, stride=2, count=3)
    assert windows.starts(3) == [0] and windows.starts(4) == [0]
    assert windows.starts(6) == [0, 2]  # two windows cover it: 0-3 and 2-5
    assert windows.starts(7) == [0, 2, 3]  # three windows, evenly spaced, the last ends the text
    assert windows.starts(20) == [0, 8, 16]  # beyond the cap: still the start and the end, with gaps
    assert Windows(size=4, stride=2).starts(20) == [0]  # one window: the first block only
    batch = collate_windows([np.arange(1, 8), np.array([9])], windows, 0, "right", torch.device("cpu"))
    assert batch.ids.tolist() == [[1, 2, 3, 4], [3, 4, 5, 6], [4, 5, 6, 7], [9, 0, 0, 0]]
    assert batch.text_of.tolist() == [0, 0, 0, 1] and batch.tokens == 13


def windowed_model(pooling="mean", padding_side="right", max_windows=4, **config):
    torch.manual_seed(0)
    backbone = GPT(ModelConfig(vocab_size=12, pos_emb="rope", **{**TINY, "block_size": 8}))
    classifier = ClassifierConfig(
        3, pooling, padding_side=padding_side, max_windows=max_windows, window_stride=4, **config
    )
    return GPTClassifier(backbone, classifier).eval()


def windowed_logits(model, texts):
    batch = collate_windows(texts, model.windows, 0, model.config.padding_side, torch.device("cpu"))
    with torch.no_grad():
        return model(batch.ids, batch.real, text_of=batch.text_of)


@pytest.mark.parametrize("pooling", ["last", "mean", "meanmax"])
def test_a_long_text_is_the_average_of_its_windows_and_its_end_counts(pooling):
    model = windowed_model(pooling)
    text = np.arange(20) % 11 + 1  # 20 tokens, block 8, stride 4: windows at 0, 4, 8, 12
    # the head is linear, so the logits of the averaged pooled windows are the windows' mean logits
    each = [windowed_logits(model, [text[start : start + 8]])[0] for start in (0, 4, 8, 12)]
    torch.testing.assert_close(windowed_logits(model, [text])[0], torch.stack(each).mean(0))
    changed_end = text.copy()
    changed_end[-1] = 0
    assert not torch.allclose(windowed_logits(model, [text]), windowed_logits(model, [changed_end]))
    first_only = windowed_model(pooling, max_windows=1)  # the same weights, the first block only
    torch.testing.assert_close(
        windowed_logits(first_only, [text]), windowed_logits(first_only, [changed_end])
    )


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["last", "mean", "meanmax"])
def test_windows_keep_padding_invisible(padding_side, pooling):
    model = windowed_model(pooling, padding_side)
    texts = [np.arange(19) % 11 + 1, np.array([2, 5]), np.arange(13) % 7 + 3, np.array([4, 3, 2, 1, 5])]
    batched = windowed_logits(model, texts)
    for row, ids in enumerate(texts):
        torch.testing.assert_close(batched[row], windowed_logits(model, [ids])[0])


@pytest.mark.parametrize("mask_padding", [True, False])
def test_a_text_that_fits_one_window_reads_exactly_as_the_plain_path(mask_padding):
    windowed = windowed_model(mask_padding=mask_padding)
    plain = windowed_model(max_windows=1, mask_padding=mask_padding)
    texts = [np.array([3, 4, 5, 6, 7, 8, 9, 10]), np.array([2, 5]), np.array([11, 10, 9])]
    batch = collate_windows(texts, windowed.windows, 0, "right", torch.device("cpu"))
    assert batch.text_of is None  # one row per text: no averaging at all
    x, real = collate(texts, 0, "right", torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(windowed(x, real, with_lm_loss=True)[0], plain(x, real, with_lm_loss=True)[0])
        assert torch.equal(windowed(x, real, with_lm_loss=True)[1], plain(x, real, with_lm_loss=True)[1])
    cpu = torch.device("cpu")
    assert torch.equal(predict_logits(windowed, texts, 2, 0, cpu), predict_logits(plain, texts, 2, 0, cpu))


def signal_at_the_end_rows(n, seed=0):
    """Every text opens with the same 30 characters; only its last 10 tell the class (a/b/c or
    x/y/z), beyond the first 24-token block."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "abc" if i % 2 else "xyz"
        rows.append((label, "abcxyz ." * 4 + "".join(rng.choice(label) for _ in range(10))))
    return rows


def test_train_eval_and_predict_read_every_window(tmp_path, make_backbone_run, capsys):
    backbone_run = make_backbone_run(tmp_path / "backbone")
    data = write_csv(tmp_path / "d.csv", signal_at_the_end_rows(160), header=("label", "text"))

    def train(max_windows):
        out = tmp_path / f"cls_{max_windows}"
        args = quick_args(data, backbone_run, out, max_windows=max_windows, epochs=4, learning_rate=3e-3)
        return out, train_classifier(args)["accuracy"]

    windowed, accuracy = train(3)
    assert accuracy == 1.0
    assert "16 longer than 24 tokens, read in up to 3 windows" in capsys.readouterr().out  # test split
    # the first block is the same for every text: the classifier can only guess one class
    assert train(1)[1] == 0.5
    run = ["--run", str(windowed), "--device", "cpu"]
    assert main(["classify", "eval", *run]) == 0
    assert json.loads((windowed / "eval.json").read_text())["accuracy"] == 1.0
    assert main(["classify", "eval", *run, "--max-windows", "1"]) == 0  # eval's override
    assert json.loads((windowed / "eval.json").read_text())["accuracy"] == 0.5
    capsys.readouterr()
    text = "abcxyz ." * 4 + "zyxzyxzyxz"
    assert main(["classify", "predict", *run, text]) == 0
    out = capsys.readouterr().out
    assert "1 longer than 24 tokens, read in up to 3 windows" in out and out.splitlines()[-1].startswith(
        "xyz\t"
    )


def test_bad_window_options_are_one_line_errors(trained, tmp_path, capsys):
    backbone, data = str(trained["backbone"]), str(trained["data"])
    out = tmp_path / "never"
    train = ["classify", "train", "--data", data, "--text-column", "review", "--init-from", backbone]
    train += ["--out-dir", str(out)]
    cases = [
        ([*train, "--max-windows", "0"], "max-windows must be at least 1, got 0"),
        ([*train, "--window-stride", "0"], "window-stride must be at least 1, got 0"),
        ([*train, "--window-stride", "25"], "window-stride must be in [1, 24] (the block size), got 25"),
        ([*train, "--max-windows", "2", "--echo"], "echo reads a text twice inside one block"),
        ([*train, "--window-stride", "25", "--adapt-iters", "2"], "window-stride must be in [1, 24]"),
        (["classify", "eval", "--run", str(trained["run"]), "--max-windows", "-1"], "max-windows must be"),
    ]
    for argv, needle in cases:
        assert main([*argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {needle}") and err.count("\n") == 1, err
    assert not out.exists()  # nothing written, not even an adapted backbone


# ---- the three-set benchmark's splits ----------------------------------------------------------
def three_set_data(root):
    """A tiny copy of the three review sets' layout: sentiment_zh pos/neg lines, reviews_zh CSVs;
    one shopping review is also a sentiment_zh review (in full-width spelling), one waimai review has
    both labels."""
    (root / "sentiment_zh").mkdir(parents=True)
    (root / "reviews_zh").mkdir()
    pos = [f"好评{i}" for i in range(30)] + ["ＡＢ 很好"]
    (root / "sentiment_zh" / "pos.txt").write_text("\n".join(pos + pos[:5]), encoding="utf-8")
    (root / "sentiment_zh" / "neg.txt").write_text("\n".join(f"差评{i}" for i in range(30)), encoding="utf-8")
    waimai = [("1", f"好吃{i}") for i in range(20)] + [("0", f"难吃{i}") for i in range(40)]
    waimai += [("1", "一般般"), ("0", "一般般")]
    write_csv(root / "reviews_zh" / "waimai_10k.csv", waimai)
    shopping = [("书籍", "1", f"好书{i}") for i in range(40)] + [("书籍", "0", f"烂书{i}") for i in range(40)]
    shopping += [("衣服", "1", "ab很好")]
    write_csv(root / "reviews_zh" / "online_shopping_9_cats.csv", shopping, header=("cat", "label", "review"))
    return root


def test_three_set_splits_keep_every_val_and_test_text_out_of_training(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    import classify_three_sets as bench
    from classify_sentiment import labelled_splits

    data = three_set_data(tmp_path / "data")
    args = argparse.Namespace(train_size=20, val_size=10, test_size=10, seed=3)
    splits, reviews = bench.all_splits(data, args)
    sizes = {"train": 20, "val": 10, "test": 10}
    assert splits["sentiment_zh"] == labelled_splits(data, sizes, 3)  # the old set keeps its split
    held_out = {bench.normalise(t) for s in splits.values() for k in ("val", "test") for _, t in s[k]}
    assert len(held_out) == 60  # no text in two val/test splits
    for name, rows in splits.items():
        assert not held_out & {bench.normalise(t) for _, t in rows["train"]}, name
        assert {label for label, _ in rows["test"]} == {"0", "1"} or name == "sentiment_zh"
    every = {bench.normalise(t) for path in data.rglob("*.*") for t in path.read_text().splitlines()}
    every = {t.split(",")[-1] for t in every} - {"label", "review"}  # CSV rows: their review column
    # pre-training reads every other review once (the one given both labels left out with its set)
    assert sorted(bench.normalise(t) for t in reviews) == sorted(every - held_out - {"一般般"})
    # waimai keeps its 1/3 positive share; the review given both labels is in no split
    assert sum(label == "1" for label, _ in splits["waimai_10k"]["test"]) == 3
    assert all(t != "一般般" for s in splits["waimai_10k"].values() for _, t in s)
    # the shopping review that sentiment_zh also holds (as ＡＢ 很好) is never a shopping val/test text
    assert all(t != "ab很好" for k in ("val", "test") for _, t in splits["online_shopping"][k])
