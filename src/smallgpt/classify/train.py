"""`smallgpt classify train` and `ablate`: fine-tune a pretrained smallgpt run as a text classifier.

The shared Trainer runs the loop (optimizer, lr schedule, AMP, checkpoints, metrics.jsonl, progress
bar); this module supplies the batches, the cross-entropy loss, and an evaluation over the whole
validation split whose error (1 - accuracy) picks ckpt/best and drives early stopping.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from smallgpt.classify.adapt import adapt_backbone
from smallgpt.classify.data import (
    ClassifyBatch,
    ClassifyBatches,
    Examples,
    encode_texts,
    label_ids,
    read_examples,
    save_labels,
    shared_texts,
    sorted_labels,
    stratified_split,
)
from smallgpt.classify.evaluate import (
    LABELS,
    SETTINGS,
    TEST_SPLIT,
    evaluate_ids,
    load_classifier,
    report,
)
from smallgpt.classify.model import ClassifierConfig, GPTClassifier
from smallgpt.device import resolve_device
from smallgpt.errors import UserError
from smallgpt.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    refuse_to_replace,
)
from smallgpt.model.lora import LoRAConfig, add_lora
from smallgpt.runs import load_run
from smallgpt.train.checkpoint import base_tags, find_checkpoint
from smallgpt.train.distributed import DistInfo
from smallgpt.train.optim import adamw, decay_groups
from smallgpt.train.run import RUN_FILES, clear_run, holds_checkpoint
from smallgpt.train.schedule import LRSchedule
from smallgpt.train.trainer import LoopSettings, LossFn, Trainer

ADAPTED = "adapted"  # the backbone adapted by --adapt-iters, a run folder inside OUT_DIR
CLASSIFY_FILES = (*RUN_FILES, LABELS, SETTINGS, TEST_SPLIT, "eval.json", ADAPTED)  # what train writes


@dataclass
class ClassifyOptions:
    """What `train` and `ablate` share: data, backbone and optimization flags."""

    data: str = field(default="", metadata={"help": "labelled CSV/TSV/JSONL file", "required": True})
    init_from: str = field(
        default="",
        metadata={"help": "pretrained smallgpt run folder (its checkpoint and tokenizer)", "required": True},
    )
    text_column: str = field(default="text", metadata={"help": "column (or JSON key) holding the text"})
    label_column: str = field(default="label", metadata={"help": "column (or JSON key) holding the label"})
    delimiter: str | None = field(
        default=None, metadata={"help": "CSV delimiter (default: sniffed; .tsv: tab)"}
    )
    val_data: str | None = field(
        default=None, metadata={"help": "validation file (default: split from --data)"}
    )
    test_data: str | None = field(default=None, metadata={"help": "test file (default: split from --data)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of --data held out for validation"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of --data held out for testing"})
    out_dir: str = field(default="runs/classify", metadata={"help": "where the classify run is written"})
    pooling: str = field(
        default="mean",
        metadata={"help": "last (last real token) | mean (over real tokens) | meanmax (mean and max)"},
    )
    padding_side: str = field(default="right", metadata={"help": "right | left"})
    echo: bool = field(
        default=False,
        metadata={
            "help": "read each text twice (text, end-of-text, text) and pool over the repeat, whose "
            "tokens have seen the whole text (1.35x the fine-tuning time on the review benchmark)"
        },
    )
    max_windows: int = field(
        default=1,
        metadata={
            "help": "read a text longer than the backbone's block in up to this many windows of "
            "block-size tokens, spread from its start to its end, their pooled vectors averaged "
            "(1: its first block-size tokens only)"
        },
    )
    window_stride: int | None = field(
        default=None,
        metadata={"help": "tokens between window starts at most (default: half the block size)"},
    )
    batch_size: int = field(default=32, metadata={"help": "texts per step"})
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "batch training texts of similar length: less padding, faster steps, but batches "
            "lean to one class where text length follows the label"
        },
    )
    epochs: float = field(default=2.0, metadata={"help": "passes over the training split"})
    max_iters: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (cosine decay to 1/10)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    layer_lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "discriminative fine-tuning (ULMFiT): each block trains at this times the lr of the "
            "one above it, the head at the full lr (1: one lr for all)"
        },
    )
    dropout: float | None = field(
        default=None, metadata={"help": "dropout while fine-tuning (default: the backbone's own)"}
    )
    lm_loss_weight: float = field(
        default=0.5,
        metadata={
            "help": "add this times the next-token loss on the training texts (GPT-1 used 0.5; "
            "not with a frozen backbone)"
        },
    )
    warmup_iters: int = field(default=0, metadata={"help": "linear warmup steps"})
    adapt_iters: int = field(
        default=0,
        metadata={
            "help": "first continue next-token training of the backbone on the training texts (never "
            "val/test) for this many steps of --batch-size windows, into OUT_DIR/adapted (0: off)"
        },
    )
    adapt_learning_rate: float = field(
        default=1e-3, metadata={"help": "peak learning rate of --adapt-iters (cosine decay to 1/10)"}
    )
    eval_interval: int = field(default=0, metadata={"help": "steps between evaluations (0: once per epoch)"})
    patience: int = field(
        default=0, metadata={"help": "stop after this many evaluations without gain (0: off)"}
    )
    seed: int = field(default=1337, metadata={"help": "seed of the split, the shuffle and the head"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace the classify run already in --out-dir (refused without it)"}
    )

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"batch-size must be positive, got {self.batch_size}")
        for name in (
            "epochs", "max_iters", "learning_rate", "weight_decay", "lm_loss_weight", "warmup_iters",
            "eval_interval", "adapt_iters", "adapt_learning_rate",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.layer_lr_decay <= 1:
            raise UserError(f"layer-lr-decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.epochs == 0 and self.max_iters == 0:
            raise UserError("give --epochs or --max-iters a positive value")
        if not (
            0 <= self.val_fraction < 1
            and 0 <= self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1
        ):
            raise UserError("val-fraction and test-fraction must be in [0, 1) and leave some training data")
        if self.val_data is None and self.val_fraction == 0:
            raise UserError("training needs validation data: --val-data FILE or a positive --val-fraction")
        # pooling, padding side and windows fail now, before an adaptation or a run is written
        ClassifierConfig(
            2,
            self.pooling,
            padding_side=self.padding_side,
            echo_separator=0 if self.echo else None,
            max_windows=self.max_windows,
            window_stride=self.window_stride,
        ).validate()


@dataclass
class ClassifyTrainArgs(ClassifyOptions):
    freeze_backbone: bool = field(default=False, metadata={"help": "train the head only (much faster)"})
    lora_rank: int | None = field(
        default=None,
        metadata={"help": "train rank-N LoRA adapters on the backbone (and the head), not all its weights"},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale: updates times alpha / rank"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA adapters' input"})
    lora_layers: str = field(
        default="attn.c_attn,attn.c_proj",
        metadata={"help": "block layers with adapters: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"},
    )
    mask_padding: bool = field(
        default=True,
        metadata={
            "help": "hide padding from attention and pooling (--no-mask-padding: the seed's 'no mask')"
        },
    )

    def lora(self) -> LoRAConfig | None:
        """The backbone's LoRA adapters, or None (every backbone weight trains, unless frozen)."""
        if self.lora_rank is None:
            return None
        lora = LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_layers)
        lora.validate()
        if self.freeze_backbone:
            raise UserError("--lora-rank trains adapters in the backbone: it cannot be frozen too")
        return lora

    def classifier(self, num_classes: int, separator: int) -> ClassifierConfig:
        """The classifier's settings; separator: the token between a text and its echo."""
        config = ClassifierConfig(
            num_classes,
            self.pooling,
            self.mask_padding,
            self.freeze_backbone,
            self.padding_side,
            echo_separator=separator if self.echo else None,
            max_windows=self.max_windows,
            window_stride=self.window_stride,
        )
        config.validate()
        return config


@dataclass
class Splits:
    train: Examples
    val: Examples
    test: Examples | None
    names: list[str]  # class names in id order


def load_splits(args: ClassifyOptions) -> Splits:
    """Train/val/test examples: given files, else a stratified seeded split of --data."""

    def read(path: str) -> Examples:
        examples = read_examples(path, args.text_column, args.label_column, args.delimiter)
        if examples.empty_skipped:
            print(f"{path}: skipped {examples.empty_skipped} rows with empty text")
        return examples

    data = read(args.data)
    names = sorted_labels(data.labels)
    if len(names) < 2:
        raise UserError(f"{args.data} has a single label ({names[0]!r}): a classifier needs two or more")
    given = {"val": args.val_data, "test": args.test_data}
    fractions = {"val": args.val_fraction, "test": args.test_fraction}
    held_out = [split for split in ("val", "test") if given[split] is None and fractions[split] > 0]
    parts = stratified_split(label_ids(data, names), tuple(fractions[s] for s in held_out), args.seed)
    splits = {"train": data.subset(parts[0]), **{s: data.subset(p) for s, p in zip(held_out, parts[1:])}}
    for split, path in given.items():
        if path is not None:
            splits[split] = read(path)
            label_ids(splits[split], names)  # an unknown label is an error now, not after training
    if not splits["val"].texts:
        raise UserError(f"{args.data} is too small to hold out a validation split: pass --val-data")
    for split in ("val", "test"):
        repeated = shared_texts(splits["train"], splits[split]) if split in splits else 0
        if repeated:
            total = len(splits[split].texts)
            print(
                f"warning: {repeated} of the {total} {split} texts are also training texts "
                f"(repeated rows in the data); {split} accuracy counts them"
            )
    return Splits(splits["train"], splits["val"], splits.get("test"), names)


def check_out_dirs(args: ClassifyOptions, run_dirs: list[Path]) -> None:
    """A classify run (or a backbone adapted for one) already in one of `run_dirs` is replaced only
    with --overwrite."""
    for run_dir in run_dirs:
        if holds_checkpoint(run_dir) or holds_checkpoint(run_dir / ADAPTED):
            refuse_to_replace(run_dir, "a classify run", args.overwrite)


def backbone_run(args: ClassifyOptions, splits: Splits, device: torch.device) -> str:
    """The run to fine-tune: --init-from, or, with --adapt-iters, its adaptation to the training texts."""
    if args.adapt_iters == 0:
        return args.init_from
    adapted = adapt_backbone(
        args.init_from, splits.train.texts, Path(args.out_dir) / ADAPTED, args.adapt_iters,
        args.adapt_learning_rate, args.batch_size, args.seed, device, args.dtype, args.progress,
    )  # fmt: skip
    return str(adapted)


def layer_lr_groups(model: GPTClassifier, weight_decay: float, layer_lr_decay: float) -> list[dict]:
    """decay_groups per depth, each with lr_scale = layer_lr_decay ** (its distance from the top).

    Depth 0 is the embeddings (tied to the LM head), block i is depth i + 1, and the final norm and
    the classifier head are the top: the layers nearest the input hold the most general features,
    so they move least (ULMFiT's discriminative fine-tuning, BERT's layer-wise lr decay).
    """
    transformer = model.backbone.transformer
    blocks = cast(nn.ModuleList, transformer.h)
    top = len(blocks) + 1
    depth = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
    for embedding in (transformer.wte, transformer.wpe):  # wpe is None with RoPE
        if isinstance(embedding, nn.Module):
            depth.update((id(p), 0) for p in embedding.parameters())
    groups = []
    for level in range(top, -1, -1):  # top first: param_groups[0] is the lr the trainer logs
        params = [p for p in model.parameters() if depth.get(id(p), top) == level]
        scale = layer_lr_decay ** (top - level)
        groups += [
            {**group, "lr_scale": scale} for group in decay_groups(params, weight_decay) if group["params"]
        ]
    return groups


def classification_loss(lm_loss_weight: float) -> LossFn:
    """The Trainer's loss: cross-entropy on the labels, plus the weighted next-token loss if any."""

    def loss(model: nn.Module, batch: ClassifyBatch) -> torch.Tensor:
        if lm_loss_weight == 0:
            return F.cross_entropy(model(batch.ids, batch.real, text_of=batch.text_of).float(), batch.labels)
        logits, lm_loss = model(batch.ids, batch.real, with_lm_loss=True, text_of=batch.text_of)
        return F.cross_entropy(logits.float(), batch.labels) + lm_loss_weight * lm_loss

    return loss


def loop_settings(args: ClassifyOptions, train_size: int) -> LoopSettings:
    """The shared Trainer's settings: epochs become max_iters, evaluation defaults to once per epoch,
    the lr decays (cosine) to a tenth by the last step."""
    steps_per_epoch = max(1, train_size // args.batch_size)
    max_iters = args.max_iters or math.ceil(args.epochs * steps_per_epoch)
    schedule = LRSchedule(args.learning_rate, args.learning_rate / 10, args.warmup_iters, max_iters)
    return LoopSettings(
        max_iters=max_iters,
        eval_interval=args.eval_interval or steps_per_epoch,
        schedule=schedule,
        dtype=args.dtype,
        compile=args.compile,
        log_interval=max(1, min(50, max_iters // 20)),
        progress=args.progress,
        patience=args.patience,
    )


def write_run_files(args: ClassifyTrainArgs, splits: Splits, run_dir: Path, tokenizer_bytes: bytes) -> None:
    """What eval/predict need besides the checkpoint: tokenizer, labels, settings, the test split."""
    atomic_write_bytes(run_dir / "tokenizer.json", tokenizer_bytes)
    save_labels(run_dir / LABELS, splits.names)
    settings: dict[str, Any] = {
        "columns": {"text": args.text_column, "label": args.label_column},
        "delimiter": args.delimiter,
        "args": asdict(args),
        "sizes": {"train": len(splits.train.texts), "val": len(splits.val.texts)},
    }
    atomic_write_json(run_dir / SETTINGS, settings)
    if splits.test is not None and args.test_data is None:  # keep the held-out split for `classify eval`
        column = settings["columns"]
        lines = (
            json.dumps({column["text"]: t, column["label"]: label}, ensure_ascii=False)
            for t, label in zip(splits.test.texts, splits.test.labels)
        )
        atomic_write_text(run_dir / TEST_SPLIT, "".join(line + "\n" for line in lines))


def train_classifier(args: ClassifyTrainArgs) -> dict[str, Any]:
    """Fine-tune, then score ckpt/best on the test split (else val); returns those metrics + seconds."""
    args.validate()
    lora = args.lora()
    run_dir = Path(args.out_dir)
    check_out_dirs(args, [run_dir])
    device = resolve_device(args.device)
    backbone, tokenizer = load_run(args.init_from, device)
    splits = load_splits(args)
    classifier = args.classifier(len(splits.names), tokenizer.eot_id)
    windows = classifier.windows(backbone.config.block_size)  # a bad stride fails before adapting
    if args.overwrite:  # the data was read: the old run goes before anything of the new one is written
        with folder_lock(run_dir):
            clear_run(run_dir, CLASSIFY_FILES)
    init_from = backbone_run(args, splits, device)
    if init_from != args.init_from:
        backbone, tokenizer = load_run(init_from, device)
    if args.dropout is not None:
        backbone.set_dropout(args.dropout)
    encoded = {}
    for split in ("train", "val", "test"):
        examples = getattr(splits, split)
        if examples is not None:
            encoded[split] = encode_texts(examples.texts, tokenizer, windows)
            print(encoded[split].report(split))
    labels = {s: label_ids(getattr(splits, s), splits.names) for s in encoded}
    print(f"classes: {', '.join(splits.names)}; train counts {np.bincount(labels['train']).tolist()}")

    settings = loop_settings(args, len(labels["train"]))
    torch.manual_seed(args.seed)
    origin = {}
    if lora is not None:  # checkpoints then hold the adapters and the head, the backbone stays in its run
        add_lora(backbone, lora)
        origin = {**base_tags(find_checkpoint(init_from), args.out_dir), "lora": lora.to_json()}
    model = GPTClassifier(backbone, classifier).to(device)
    eot = tokenizer.eot_id
    train_source = ClassifyBatches(
        encoded["train"].ids,
        labels["train"],
        args.batch_size,
        args.seed,
        eot,
        args.padding_side,
        device,
        args.group_by_length,
        windows,
    )

    def evaluate_val(m: nn.Module) -> dict[str, float]:
        assert isinstance(m, GPTClassifier)  # the Trainer passes back the model it was given
        metrics, _ = evaluate_ids(m, encoded["val"].ids, labels["val"], 2 * args.batch_size, eot, device)
        return {**{f"val_{k}": v for k, v in metrics.items()}, "val_error": 1 - metrics["accuracy"]}

    trainer = Trainer(
        settings,
        model,
        backbone.config,
        adamw(
            layer_lr_groups(model, args.weight_decay, args.layer_lr_decay), args.learning_rate, device.type
        ),
        train_source,
        eval_sources={},
        run_dir=run_dir,
        dist=DistInfo(False, 0, 0, 1, device),
        # a frozen backbone cannot learn from the next-token loss: skip its cost
        loss_fn=classification_loss(0.0 if args.freeze_backbone else args.lm_loss_weight),
        count_tokens=lambda batch: batch.tokens,  # the texts' tokens, not their padding
        checkpoint_info={
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "classifier": json.dumps(classifier.to_dict()),
            "backbone": init_from,
            **origin,
        },
        monitor="val_error",
        evaluate_fn=evaluate_val,
    )
    with folder_lock(run_dir):  # one writer per run folder, from here to the end
        write_run_files(args, splits, run_dir, (Path(init_from) / "tokenizer.json").read_bytes())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"trainable parameters: {trainable / 1e6:.3f}M; {settings.max_iters} steps on {device}")
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start

        best, _, _, _ = load_classifier(run_dir, device)
        final = "test" if "test" in encoded else "val"
        metrics, confusion = evaluate_ids(
            best, encoded[final].ids, labels[final], 2 * args.batch_size, eot, device
        )
        print(report(metrics, confusion, splits.names, f"{final} (ckpt/best)"))
        result = {**metrics, "seconds": seconds, "split": final}
        atomic_write_json(
            run_dir / "eval.json", {**result, "labels": splits.names, "confusion": confusion.tolist()}
        )
        return result


# ---- ablate ----------------------------------------------------------------------------------
SEED_VARIANTS = ((False, False), (True, False), (True, True))  # (mask_padding, freeze_backbone)
GRID_VARIANTS = ((False, False), (True, False), (False, True), (True, True))


@dataclass
class ClassifyAblateArgs(ClassifyOptions):
    grid: bool = field(
        default=False, metadata={"help": "all four mask x freeze variants, not the seed's three"}
    )


def variant_name(mask: bool, frozen: bool) -> str:
    return f"{'mask' if mask else 'nomask'}_{'frozen' if frozen else 'full'}"


def run_ablate(args: ClassifyAblateArgs) -> list[dict]:
    """Train each variant from the same pretrained run into OUT_DIR/<variant>; print a Markdown table."""
    args.validate()
    rows = []
    shared = {f.name: getattr(args, f.name) for f in fields(ClassifyOptions)}
    out = Path(args.out_dir)
    variants = GRID_VARIANTS if args.grid else SEED_VARIANTS
    check_out_dirs(args, [out, *(out / variant_name(mask, frozen) for mask, frozen in variants)])
    if args.adapt_iters:  # one adapted backbone for every variant
        device = resolve_device(args.device)
        splits = load_splits(args)
        if args.overwrite:
            with folder_lock(out):
                clear_run(out, (ADAPTED,))
        shared.update(init_from=backbone_run(args, splits, device), adapt_iters=0)
    for mask, frozen in variants:
        name = variant_name(mask, frozen)
        print(f"\n=== {name} ===")
        variant = ClassifyTrainArgs(
            **{**shared, "out_dir": str(out / name)}, mask_padding=mask, freeze_backbone=frozen
        )
        rows.append({"variant": name, "mask": mask, "frozen": frozen, **train_classifier(variant)})
    print("\n" + ablation_table(rows))
    atomic_write_json(out / "ablation.json", rows)
    return rows


def ablation_table(rows: list[dict]) -> str:
    lines = [
        "| mask padding | frozen backbone | accuracy | macro-F1 | time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        yes_no = {True: "yes", False: "no"}
        lines.append(
            f"| {yes_no[r['mask']]} | {yes_no[r['frozen']]} | {100 * r['accuracy']:.1f}% "
            f"| {r['macro_f1']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)
