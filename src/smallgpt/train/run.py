"""`smallgpt train`: wire a prepared dataset, a GPT, an optimizer and the Trainer together."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from smallgpt.config import Config, save_config
from smallgpt.data.loader import BatchSampler, open_dataset, open_mask, open_split
from smallgpt.data.nanogpt import is_nanogpt_folder
from smallgpt.data.tokenizers import Tokenizer, load_tokenizer, save_tokenizer
from smallgpt.errors import UserError
from smallgpt.io import atomic_write_json, folder_lock, refuse_to_replace, resolve_dir
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.model.hub import HUB_MODELS
from smallgpt.model.lora import LoRAConfig, add_lora
from smallgpt.train import checkpoint
from smallgpt.train.distributed import DistInfo, init_distributed, shutdown_distributed
from smallgpt.train.logging import WandbRun, check_backends
from smallgpt.train.optim import build_optimizer, check_optimizer
from smallgpt.train.schedule import LRSchedule
from smallgpt.train.trainer import LoopSettings, Trainer

EVAL_SEED_OFFSET = 10_000  # eval samplers draw from their own seeds, apart from training's
# what `train` writes into a run folder: an overwritten run loses all of it before the new one starts
RUN_FILES = ("ckpt", "metrics.jsonl", "config.yaml", "tokenizer.json", "data_meta.json", "tensorboard")


def holds_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a trained run: anything under ckpt/ (best, last, a swap's copy)."""
    ckpt = Path(run_dir) / "ckpt"
    return ckpt.is_dir() and any(ckpt.iterdir())


def check_out_dir(config: Config) -> None:
    """A trained run in out_dir is continued (init_from=resume) or replaced (overwrite), never lost
    silently; evaluating (eval_only) writes nothing, so it may read any run."""
    t = config.train
    if t.init_from != "resume" and not t.eval_only and holds_checkpoint(t.out_dir):
        refuse_to_replace(t.out_dir, "a trained run (continue it with --init_from=resume)", t.overwrite)
        if Path(t.init_from).resolve().is_relative_to(Path(t.out_dir).resolve()):
            # overwriting would delete the base the new run's checkpoints refer to
            raise UserError(
                f"init_from {t.init_from} is the run in out_dir: fine-tune it into another out_dir"
            )


def clear_run(run_dir: Path, names: tuple[str, ...] = RUN_FILES) -> None:
    """Remove an overwritten run's files, so its checkpoints and metrics never mix with the new run's."""
    for name in names:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def resolve_dataset(dataset: str) -> Path:
    """A prepared (or nanoGPT) data folder: the path itself, or nanoGPT's `data/<name>`."""
    for candidate in (Path(dataset), Path("data") / dataset):
        if (candidate / "meta.json").is_file() or is_nanogpt_folder(candidate):
            return candidate
    raise UserError(
        f"dataset {dataset!r} not found (no meta.json nor nanoGPT's train.bin there or in data/{dataset}): "
        "run smallgpt prepare"
    )


def fit_vocab(model: ModelConfig, vocab_size: int, data_dir: Path) -> None:
    """Take the vocabulary size from the data unless the config pads it larger (e.g. 50304)."""
    if model.vocab_size == 0:
        model.vocab_size = vocab_size
    elif model.vocab_size < vocab_size:
        raise UserError(
            f"config vocab_size {model.vocab_size} is smaller than the tokenizer's {vocab_size} in {data_dir}"
        )


def samplers(config: Config, data_dir: Path, meta: dict, info: DistInfo):
    """The training sampler and factories for fixed-seed evaluation samplers, per split."""
    t, block = config.train, config.model.block_size

    def sampler(split: str, seed: int) -> BatchSampler:
        tokens = open_split(data_dir, split, meta["dtype"])
        mask = open_mask(data_dir, split, len(tokens)) if config.data.loss_on == "bot" else None
        if config.data.loss_on == "bot" and mask is None:
            raise UserError(f"loss_on=bot needs {data_dir}/{split}.mask.bin: prepare it with --format chat")
        name = str(data_dir / f"{split}.bin")
        return BatchSampler(
            tokens, block, t.batch_size, seed, info.device, mask, name, info.rank, info.world_size
        )

    train_source = sampler("train", t.seed)
    for split in ("train", "val"):  # fail now, not at the first evaluation
        sampler(split, 0)
    eval_sources = {
        split: (lambda split=split: sampler(split, t.seed + EVAL_SEED_OFFSET)) for split in ("train", "val")
    }
    return train_source, eval_sources


def loop_settings(config: Config) -> LoopSettings:
    """The training loop's part of the config."""
    t, log = config.train, config.log
    wandb_run = WandbRun(log.wandb_project, log.wandb_run_name, config.to_dict()) if log.wandb_log else None
    return LoopSettings(
        max_iters=t.max_iters,
        eval_interval=t.eval_interval,
        schedule=LRSchedule.from_optim(config.optim),
        eval_iters=t.eval_iters,
        max_seconds=t.max_seconds,
        eval_only=t.eval_only,
        always_save_checkpoint=t.always_save_checkpoint,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        grad_clip=config.optim.grad_clip,
        dtype=t.dtype,
        compile=t.compile,
        parallel=t.parallel,
        log_interval=log.log_interval,
        progress=log.progress,
        tensorboard=log.tensorboard,
        wandb_run=wandb_run,
        nan_policy=t.nan_policy,
        nan_max_consecutive=t.nan_max_consecutive,
    )


def bytes_per_token(meta: dict) -> dict[str, float]:
    counts = meta.get("counts", {})
    tokens, text_bytes = counts.get("tokens", {}), counts.get("bytes", {})
    return {s: text_bytes[s] / tokens[s] for s in ("train", "val") if tokens.get(s) and text_bytes.get(s)}


def resume_checkpoint(config: Config, run_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint to resume from; `config.model` takes the architecture it was trained with."""
    if config.train.init_from != "resume":
        return None
    ckpt = resolve_dir(run_dir / "ckpt" / "last")
    if not (ckpt / checkpoint.WEIGHTS).is_file():
        raise UserError(f"init_from=resume but {run_dir} has no ckpt/last to resume from")
    state = checkpoint.load_state(ckpt)
    if state.get("tokenizer_fingerprint") != fingerprint:
        raise UserError(
            f"checkpoint {ckpt} was trained with a different tokenizer than dataset {config.data.dataset}"
        )
    # as in nanoGPT: the architecture is the checkpoint's, dropout (a training setting) this run's
    config.model = replace(checkpoint.read_model_config(ckpt), dropout=config.model.dropout)
    return ckpt


def check_chat_windows(meta: dict, block_size: int, data_dir: Path) -> None:
    """Chat data is cut into windows of whole turns that fit `prepare --block-size`; a model with a
    shorter context would see windows in pieces, replies without the message they answer."""
    prepared = meta.get("chat", {}).get("block_size")
    if prepared is not None and block_size < prepared:
        raise UserError(
            f"{data_dir} holds chat windows of up to {prepared} tokens, longer than block_size {block_size}: "
            f"prepare it with --block-size {block_size} or train with block_size={prepared}"
        )


def pretrained_model(config: Config, tokenizer: Tokenizer, data_dir: Path) -> GPT | None:
    """init_from=gpt2... or a Hugging Face folder: its weights, cropped to block_size, our dropout."""
    if config.train.init_from in ("scratch", "resume"):
        return None
    from smallgpt.model import hf  # conversion code only when asked for

    pretrained = hf.open_pretrained(config.train.init_from)
    if pretrained.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise UserError(
            f"init_from={config.train.init_from} needs data prepared with its tokenizer "
            f"(--tokenizer {pretrained.tokenizer.kind}); {data_dir} was prepared with {tokenizer.kind}"
        )
    model = pretrained.model(config.model.block_size, config.model.dropout)
    config.model = model.config  # the architecture is the pretrained model's
    return model


def run_checkpoint(init_from: str) -> Path | None:
    """The checkpoint of init_from=RUN (its ckpt/best, else last) or =RUN/ckpt/NAME; None where
    init_from is not a smallgpt run (scratch, resume, GPT-2, a Hugging Face folder)."""
    if init_from in ("scratch", "resume") or init_from in HUB_MODELS:
        return None
    path = Path(init_from)
    if (path / "ckpt").is_dir():
        return checkpoint.find_checkpoint(path, "best")
    if path.parent.name == "ckpt" and path.name in checkpoint.CHECKPOINTS:
        if not (resolve_dir(path) / checkpoint.WEIGHTS).is_file():
            raise UserError(f"init_from {init_from}: that checkpoint has not been written yet")
        return resolve_dir(path)
    if not (path / "config.json").is_file():
        raise UserError(
            f"init_from {init_from} is neither a smallgpt run (no ckpt/ folder) nor a Hugging Face "
            "model folder (no config.json)"
        )
    return None


def check_run_tokenizer(base_ckpt: Path, tokenizer: Tokenizer, data_dir: Path) -> None:
    """A fine-tune reads its data with the tokenizer its base was trained with, or with that one plus
    special tokens appended (chat's, by `prepare --format chat --tokenizer-from`) at ids the base's
    model already has rows for (a vocab_size padded past its tokenizer's)."""
    base_run = base_ckpt.parent.parent
    base = load_tokenizer(base_run / "tokenizer.json")
    by_id = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.__getitem__)
    base.add_special_tokens(name for name in by_id if name not in base.special_tokens)
    if base.fingerprint() != tokenizer.fingerprint():
        raise UserError(
            f"{data_dir} was prepared with another tokenizer than run {base_run} was trained with: "
            f"prepare the data with --tokenizer-from {base_run}"
        )
    rows = checkpoint.read_model_config(base_ckpt).vocab_size
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"{data_dir} adds special tokens at ids {rows}..{tokenizer.vocab_size - 1}, past the {rows} "
            f"token embeddings of run {base_run}: pre-train the base with room for them (e.g. "
            f"vocab_size={64 * -(-tokenizer.vocab_size // 64)})"
        )


def base_model(
    config: Config, tokenizer: Tokenizer, data_dir: Path, run_dir: Path, resumed: Path | None
) -> tuple[GPT | None, dict[str, str], LoRAConfig | None]:
    """The model a run starts from, the tags recording its base run, and the LoRA adapters to put on
    it: init_from=RUN (its weights and architecture, this run's dropout), the base of a resumed
    LoRA run, or Hugging Face weights. None where the weights are fresh or come from `resumed`."""
    if resumed is not None:
        tags = checkpoint.read_tags(resumed)
        origin = {k: v for k, v in tags.items() if k.startswith("base_")}
        config.train.init_from_fingerprint = origin.get("base_fingerprint", "")  # config.yaml keeps it
        lora = checkpoint.lora_config(resumed)  # a LoRA run goes on with the adapters it has
        if lora is None:
            return None, origin, None
        base = checkpoint.load_model(checkpoint.base_checkpoint(resumed))
    else:
        base_ckpt = run_checkpoint(config.train.init_from)
        if base_ckpt is None:
            return pretrained_model(config, tokenizer, data_dir), {}, None
        check_run_tokenizer(base_ckpt, tokenizer, data_dir)
        origin = checkpoint.base_tags(base_ckpt, run_dir)
        pinned = config.train.init_from_fingerprint
        if pinned and pinned != origin["base_fingerprint"]:
            raise UserError(f"{base_ckpt} has changed since init_from_fingerprint was recorded: not using it")
        config.train.init_from_fingerprint = origin["base_fingerprint"]
        base, lora = checkpoint.load_model(base_ckpt), config.lora()
    base.set_dropout(config.model.dropout)  # before the adapters: their dropout is lora_dropout
    config.model = base.config
    if lora is not None:
        t = config.train  # config.yaml records the adapters the run trains (a resumed run's own)
        t.lora_rank, t.lora_alpha, t.lora_dropout = lora.rank, lora.alpha, lora.dropout
        t.lora_layers = lora.layers
        origin["lora"] = lora.to_json()
    return base, origin, lora


def train(config: Config) -> dict[str, float]:
    """Train per `config`; returns the final evaluation metrics."""
    config.validate()
    check_out_dir(config)
    check_optimizer(config.optim.optimizer)  # the checks that need no data: before loading it
    check_backends(config.log.tensorboard, config.log.wandb_log)
    info = init_distributed(config.train.device, config.train.backend)
    finished = False
    try:
        with contextlib.ExitStack() as held:
            metrics = _train(config, info, held)
        finished = True
        return metrics
    finally:
        shutdown_distributed(info, finished)


def _train(config: Config, info: DistInfo, held: contextlib.ExitStack) -> dict[str, float]:
    """Everything that can fail on the user's input fails before the run folder is written to;
    then rank 0 locks it (`held` releases the lock when training ends) and writes."""
    data_dir = resolve_dataset(config.data.dataset)
    meta, tokenizer = open_dataset(data_dir)
    run_dir = Path(config.train.out_dir)
    ckpt = resume_checkpoint(config, run_dir, tokenizer.fingerprint())
    base, origin, lora = base_model(config, tokenizer, data_dir, run_dir, ckpt)
    fit_vocab(config.model, tokenizer.vocab_size, data_dir)
    check_chat_windows(meta, config.model.block_size, data_dir)
    torch.manual_seed(config.train.seed + info.rank)
    model = base if base is not None else GPT(config.model)
    if lora is not None:
        add_lora(model, lora)  # after the seed: the adapters' initial values are the run's own
    model = model.to(info.device)
    optimizer = build_optimizer(model, config.optim, info.device.type)
    train_source, eval_sources = samplers(config, data_dir, meta, info)
    trainer = Trainer(
        loop_settings(config),
        model,
        config.model,
        optimizer,
        train_source,
        eval_sources,
        run_dir,
        info,
        checkpoint_info={
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "dataset": str(data_dir),
            **origin,
        },
        bytes_per_token=bytes_per_token(meta),
    )
    if ckpt is not None:
        trainer.resume(ckpt)
    if info.is_main and not config.train.eval_only:  # evaluating a run leaves its folder as it was
        held.enter_context(folder_lock(run_dir))  # one writer per run folder
        if config.train.overwrite:
            clear_run(run_dir)
        # overwrite is an order, not a setting: training from this config.yaml again must not replace the run
        save_config(replace(config, train=replace(config.train, overwrite=False)), run_dir / "config.yaml")
        save_tokenizer(tokenizer, run_dir / "tokenizer.json")
        atomic_write_json(run_dir / "data_meta.json", meta)
    if info.is_main:
        print(f"number of parameters: {model.num_params() / 1e6:.2f}M")
        if origin:
            print(checkpoint.describe_origin(origin, run_dir))
        if lora is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"trainable parameters: {trainable:,} (LoRA adapters only)")
        t = config.train
        tokens_per_iter = t.batch_size * config.model.block_size * t.gradient_accumulation_steps
        print(
            f"tokens per iteration: {tokens_per_iter:,} ({t.batch_size} x {config.model.block_size} x "
            f"{t.gradient_accumulation_steps} accumulation); device {info.device}"
        )
        if ckpt is not None:
            print(f"resuming from {ckpt} at iteration {trainer.iter_num}")
    return trainer.fit()
