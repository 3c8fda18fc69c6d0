"""`smallgpt classify eval` and `predict`: load a classify run, score labelled data or label new text.

`--run A,B` loads an ensemble: every run scores each text and their class probabilities are averaged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smallgpt.classify.data import (
    collate_windows,
    encode_texts,
    label_ids,
    load_labels,
    read_examples,
)
from smallgpt.classify.model import ClassifierConfig, GPTClassifier
from smallgpt.data.tokenizers import Tokenizer
from smallgpt.device import resolve_device
from smallgpt.errors import UserError
from smallgpt.io import atomic_write_json, read_user_text
from smallgpt.model.gpt import GPT
from smallgpt.model.lora import add_lora, merge_lora
from smallgpt.runs import find_checkpoint, run_tokenizer
from smallgpt.train import checkpoint

SETTINGS = "classify.json"  # the run's data columns and training flags
LABELS = "labels.json"  # class names in id order
TEST_SPLIT = "test.jsonl"  # the held-out split, when train made one


# ---- metrics ---------------------------------------------------------------------------------
def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p]: examples of class t predicted as p."""
    flat = np.bincount(true * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def scores(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; a class never seen nor predicted
    scores 0)."""
    tp = np.diag(confusion).astype(float)
    denominator = confusion.sum(0) + confusion.sum(1)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"accuracy": float(tp.sum() / confusion.sum()), "macro_f1": float(f1.mean())}


def format_confusion(confusion: np.ndarray, names: list[str]) -> str:
    """A plain-text table: one row per true class, one column per predicted class."""
    header = ["true \\ predicted", *names]
    rows = [[name, *map(str, counts)] for name, counts in zip(names, confusion)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


# ---- a loaded classifier -----------------------------------------------------------------------
@torch.no_grad()
def predict_logits(
    model: GPTClassifier, ids: list[np.ndarray], batch_size: int, pad_id: int, device: torch.device
) -> torch.Tensor:
    """Logits (N, num_classes) on the CPU, in the order of `ids`, each text read in the model's windows.

    Texts are batched by length, so batches carry little padding.
    """
    was_training = model.training
    model.eval()
    order = np.argsort([len(x) for x in ids], kind="stable")
    logits = torch.empty(len(ids), model.config.num_classes)
    for start in range(0, len(ids), batch_size):
        rows = order[start : start + batch_size]
        texts = [ids[i] for i in rows]
        batch = collate_windows(texts, model.windows, pad_id, model.config.padding_side, device)
        logits[torch.from_numpy(rows)] = model(batch.ids, batch.real, text_of=batch.text_of).float().cpu()
    model.train(was_training)
    return logits


def evaluate_ids(
    model: GPTClassifier,
    ids: list[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy and macro-F1 over every example, and the confusion matrix."""
    logits = predict_logits(model, ids, batch_size, pad_id, device)
    return probability_metrics(logits.softmax(-1), labels)


def probability_metrics(probs: torch.Tensor, labels: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of class probabilities (N, num_classes): loss (mean negative log-likelihood of the
    true class), accuracy and macro-F1 of the most likely class, and the confusion matrix."""
    targets = torch.from_numpy(labels)
    confusion = confusion_matrix(labels, probs.argmax(-1).numpy(), probs.size(1))
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), targets).item()
    return {"loss": loss, **scores(confusion)}, confusion


def load_classifier(
    run_dir: str | Path, device: torch.device, which: str = "best"
) -> tuple[GPTClassifier, Tokenizer, list[str], dict]:
    """The model of a classify run's checkpoint, its tokenizer, class names and settings."""
    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    tags = checkpoint.read_tags(ckpt)
    if "classifier" not in tags:
        raise UserError(f"{ckpt} is not a classifier checkpoint: train one with smallgpt classify train")
    lora = checkpoint.lora_config(ckpt)
    if lora is None:
        backbone = GPT(checkpoint.read_model_config(ckpt))
    else:  # the adapters and head go onto the backbone run they were trained on
        backbone = add_lora(checkpoint.load_model(checkpoint.base_checkpoint(ckpt)), lora)
    model = GPTClassifier(backbone, ClassifierConfig(**json.loads(tags["classifier"])))
    checkpoint.load_weights(ckpt, model)
    merge_lora(model)
    tokenizer = run_tokenizer(run_dir, ckpt)
    names = load_labels(run_dir / LABELS)
    if len(names) != model.config.num_classes:
        raise UserError(
            f"{run_dir}/{LABELS} names {len(names)} classes, the checkpoint has {model.config.num_classes}"
        )
    settings = json.loads((run_dir / SETTINGS).read_text(encoding="utf-8"))
    return model.to(device).eval(), tokenizer, names, settings


Member = tuple[GPTClassifier, Tokenizer]


def run_folders(run: str) -> list[str]:
    """`--run A,B` -> ["A", "B"]."""
    runs = [part.strip() for part in run.split(",") if part.strip()]
    if not runs:
        raise UserError("--run needs a classify run folder (several, comma-separated, for an ensemble)")
    return runs


def load_ensemble(
    run: str, device: torch.device, which: str = "best", max_windows: int | None = None
) -> tuple[list[Member], list[str], dict]:
    """The classifiers of one run or several (`A,B`), their shared class names, the first's settings;
    max_windows, when given, replaces the windows each was trained to read a long text in."""
    runs = run_folders(run)
    loaded = [load_classifier(run_dir, device, which) for run_dir in runs]
    if max_windows is not None:
        for model, _, _, _ in loaded:
            model.read_in(max_windows)
    _, _, names, settings = loaded[0]
    for run_dir, (_, _, other_names, _) in zip(runs[1:], loaded[1:]):
        if other_names != names:
            raise UserError(
                f"an ensemble needs the same classes: {run_dir} has {other_names}, {runs[0]} has {names}"
            )
    return [(model, tokenizer) for model, tokenizer, _, _ in loaded], names, settings


def ensemble_probabilities(
    members: list[Member], texts: list[str], batch_size: int, device: torch.device
) -> torch.Tensor:
    """Class probabilities (N, num_classes): the mean over the members, each reading the texts
    through its own tokenizer and block size."""
    total = torch.zeros(())
    for model, tokenizer in members:
        ids = encode_texts(texts, tokenizer, model.windows).ids
        total = total + predict_logits(model, ids, batch_size, tokenizer.eot_id, device).softmax(-1)
    return total / len(members)


# ---- verbs -----------------------------------------------------------------------------------
@dataclass
class LoadedRunArgs:
    run: str = field(
        default="",
        metadata={
            "help": "run folder made by smallgpt classify train; several, comma-separated, average "
            "their class probabilities (an ensemble)",
            "required": True,
        },
    )
    batch_size: int = field(default=64, metadata={"help": "texts per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    checkpoint: str = field(default="best", metadata={"help": "which checkpoint of the run: best | last"})
    max_windows: int | None = field(
        default=None,
        metadata={"help": "read a long text in up to this many windows (default: as the run was trained)"},
    )


@dataclass
class ClassifyEvalArgs(LoadedRunArgs):
    data: str | None = field(
        default=None, metadata={"help": "labelled CSV/TSV/JSONL (default: the run's held-out test split)"}
    )
    text_column: str | None = field(default=None, metadata={"help": "text column (default: the run's)"})
    label_column: str | None = field(default=None, metadata={"help": "label column (default: the run's)"})
    delimiter: str | None = field(default=None, metadata={"help": "CSV delimiter (default: sniffed)"})
    out: str | None = field(
        default=None,
        metadata={"help": "metrics JSON file (default: RUN/eval.json; an ensemble's only with --out)"},
    )


def report(metrics: dict[str, float], confusion: np.ndarray, names: list[str], what: str) -> str:
    return (
        f"{what}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"loss {metrics['loss']:.4f} ({int(confusion.sum())} examples)\n{format_confusion(confusion, names)}"
    )


def run_eval(args: ClassifyEvalArgs) -> dict[str, float]:
    device = resolve_device(args.device)
    members, names, settings = load_ensemble(args.run, device, args.checkpoint, args.max_windows)
    runs = run_folders(args.run)
    data = args.data or str(Path(runs[0]) / TEST_SPLIT)
    if args.data is None and not Path(data).is_file():
        raise UserError(f"run {runs[0]} has no held-out test split: pass --data FILE")
    columns = (
        settings["columns"]
        if args.data is None
        else settings["columns"]
        | {k: v for k, v in (("text", args.text_column), ("label", args.label_column)) if v}
    )
    examples = read_examples(data, columns["text"], columns["label"], args.delimiter or settings["delimiter"])
    if examples.empty_skipped:
        print(f"{data}: skipped {examples.empty_skipped} rows with empty text")
    model, tokenizer = members[0]
    print(encode_texts(examples.texts, tokenizer, model.windows).report(data))
    probs = ensemble_probabilities(members, examples.texts, args.batch_size, device)
    metrics, confusion = probability_metrics(probs, label_ids(examples, names))
    what = data if len(runs) == 1 else f"{data}, ensemble of {len(runs)} runs"
    print(report(metrics, confusion, names, what))
    # an ensemble's metrics belong to no one run folder, so they are written only where asked
    out = Path(args.out) if args.out else Path(runs[0]) / "eval.json" if len(runs) == 1 else None
    if out is not None:
        record = {"data": data, "runs": runs, **metrics, "labels": names, "confusion": confusion.tolist()}
        atomic_write_json(out, record)
    return metrics


@dataclass
class ClassifyPredictArgs(LoadedRunArgs):
    text: str | None = field(default=None, metadata={"help": "the text to classify", "positional": True})
    file: str | None = field(default=None, metadata={"help": "classify every line of this file instead"})


def run_predict(args: ClassifyPredictArgs) -> list[str]:
    """Print `label<TAB>class=probability ...<TAB>text` per text; returns the labels."""
    if (args.text is None) == (args.file is None):
        raise UserError("give a text to classify or --file FILE (one text per line), not both")
    if args.file is not None:
        texts = [line.strip() for line in read_user_text(args.file).splitlines() if line.strip()]
        if not texts:
            raise UserError(f"file {args.file} has no text to classify")
    elif args.text is not None and args.text.strip():
        texts = [args.text]
    else:
        raise UserError("the text to classify is empty")
    device = resolve_device(args.device)
    members, names, _ = load_ensemble(args.run, device, args.checkpoint, args.max_windows)
    model, tokenizer = members[0]
    encoded = encode_texts(texts, tokenizer, model.windows)
    if encoded.long or encoded.unknown_texts:
        print(encoded.report("input"))
    probs = ensemble_probabilities(members, texts, args.batch_size, device)
    labels = [names[i] for i in probs.argmax(-1).tolist()]
    for text, label, row in zip(texts, labels, probs.tolist()):
        print(f"{label}\t" + " ".join(f"{n}={p:.3f}" for n, p in zip(names, row)) + f"\t{text}")
    return labels
