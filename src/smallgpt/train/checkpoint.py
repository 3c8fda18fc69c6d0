"""Checkpoints: weights in safetensors, training state in a weights_only-loadable torch file.

A checkpoint is a folder (`ckpt/last`, `ckpt/best`) written whole through `atomic_dir`, so a kill
at any moment leaves the previous checkpoint usable. Nothing here unpickles arbitrary objects.

A run fine-tuned from another run records it in its checkpoints' tags (`base_run`, relative to its
own folder, `base_checkpoint`, `base_fingerprint`). A LoRA run's checkpoints (tag `lora`) hold the
trainable weights alone (adapters, a classifier's head); `load_model` rebuilds the model from the
base run, checked against its fingerprint, plus those weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, cast

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from smallgpt.errors import TrainingDiverged, UserError
from smallgpt.io import atomic_dir, resolve_dir, sha256_file
from smallgpt.model.gpt import GPT, TIED_HEAD, ModelConfig
from smallgpt.model.lora import LoRAConfig, add_lora, has_lora, is_adapter_key, merge_lora
from smallgpt.train.distributed import is_sharded

WEIGHTS = "model.safetensors"
STATE = "state.pt"
CHECKPOINTS = ("best", "last")  # ckpt/best: lowest validation loss; ckpt/last: the latest evaluation


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """`ckpt/best` (or `last`) of a run, falling back to the other one; UserError if neither exists."""
    if which not in CHECKPOINTS:
        raise UserError(f"checkpoint must be best or last, got {which!r}")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder (the folder with ckpt/ that train made)")
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    for name in (which, *(c for c in CHECKPOINTS if c != which)):
        path = resolve_dir(run_dir / "ckpt" / name)
        if (path / WEIGHTS).is_file():
            return path
    raise UserError(f"run {run_dir} has no checkpoint yet (ckpt/last or ckpt/best): train it first")


def _is_tied(key: str) -> bool:
    """The tied head, also inside a wrapper model (the classifier's `backbone.lm_head.weight`)."""
    return key == TIED_HEAD or key.endswith("." + TIED_HEAD)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP/FSDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = cast(nn.Module, model._orig_mod)
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: every weight, or with LoRA only those that train (the base's are
    in the base run)."""
    model = unwrap(model)
    if has_lora(model):
        state = {k: p for k, p in model.named_parameters() if p.requires_grad}
    else:
        state = model.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if not _is_tied(k)}


def write_checkpoint(
    ckpt_dir: str | Path,
    weights: dict[str, torch.Tensor],
    model_config: ModelConfig,
    state: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> None:
    """Write model weights and `state` (optimizer, RNG, counters: tensors and plain values only).

    `weights` are `model_weights(model)`, or `full_training_state`'s gathered under FSDP. `tags`
    (e.g. the tokenizer fingerprint) go into the safetensors header, readable without the state.
    """
    bad = non_finite(weights)
    if bad is not None:
        raise TrainingDiverged(f"not writing {ckpt_dir}: weight {bad} holds NaN or inf (training diverged)")
    metadata = {"format": "pt", "model_config": json.dumps(vars(model_config)), **(tags or {})}
    try:
        with atomic_dir(ckpt_dir) as tmp:
            # written through Python files, so a full disk surfaces as the OSError it is
            (tmp / WEIGHTS).write_bytes(safetensors.torch.save(weights, metadata))
            with open(tmp / STATE, "wb") as f:
                _save_state(state, f)
    except OSError as e:
        raise UserError(
            f"cannot write checkpoint {ckpt_dir}: {e.strerror or e}; the previous one is kept"
        ) from None


def _save_state(state: dict[str, Any], file: BinaryIO) -> None:
    try:
        torch.save(state, file)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):  # torch's zip writer wraps the failed write
            raise e.__context__ from None
        raise


def non_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or inf, or None."""
    return next((k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()), None)


def full_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, is_main: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) CPU weights and optimizer state for rank 0 to save; empty on other ranks.

    Under FSDP this is a collective that every rank must call: each contributes its shards, and the
    result loads into a single-process model like any other checkpoint. The optimizer state is then
    keyed by parameter name rather than position.
    """
    if is_sharded(model):  # imported here: torch.distributed.checkpoint takes seconds to import
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        return {k: v.contiguous() for k, v in weights.items() if k != TIED_HEAD}, optimizer_state
    if not is_main:
        return {}, {}
    return model_weights(model), optimizer.state_dict()


def load_training_state(
    ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict
) -> None:
    """Load weights and optimizer state saved by `full_training_state`, sharding them under FSDP."""
    if not is_sharded(model):
        load_weights(ckpt_dir, model)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights: dict[str, Any] = read_weights(ckpt_dir)
    if TIED_HEAD in model.state_dict():
        weights[TIED_HEAD] = weights["transformer.wte.weight"]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def _checkpoint_dir(ckpt_dir: str | Path) -> Path:
    path = resolve_dir(ckpt_dir)
    if not (path / WEIGHTS).is_file():
        raise UserError(f"no checkpoint at {ckpt_dir}: train first (smallgpt train) or pick another run")
    return path


def read_tags(ckpt_dir: str | Path) -> dict[str, str]:
    """The safetensors header metadata: model_config (JSON) and the tags given to write_checkpoint."""
    path = _checkpoint_dir(ckpt_dir) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            tags = f.metadata() or {}
        json.loads(tags["model_config"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path} is truncated or corrupted ({e})") from None
    return tags


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    return ModelConfig(**json.loads(read_tags(ckpt_dir)["model_config"]))


def read_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    path = _checkpoint_dir(ckpt_dir) / WEIGHTS
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {path} is truncated or corrupted ({e})") from None
    bad = non_finite(weights)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds NaN or inf in {bad}: it comes from a diverged run")
    return weights


def load_weights(ckpt_dir: str | Path, model: nn.Module) -> None:
    path = _checkpoint_dir(ckpt_dir) / WEIGHTS
    weights = read_weights(ckpt_dir)
    target = unwrap(model)
    missing, unexpected = target.load_state_dict(weights, strict=False)
    adapters_only = "lora" in read_tags(ckpt_dir)  # the other weights came from the base run
    missing = [k for k in missing if not _is_tied(k) and (is_adapter_key(k) or not adapters_only)]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def load_state(ckpt_dir: str | Path) -> dict[str, Any]:
    path = _checkpoint_dir(ckpt_dir) / STATE
    if not path.is_file():
        raise UserError(f"checkpoint {path.parent} has no {STATE}: it cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; all mean the same here
        raise UserError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__})") from None


def fingerprint(ckpt_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights: what a run fine-tuned from it checks it against."""
    return sha256_file(_checkpoint_dir(ckpt_dir) / WEIGHTS)


def base_tags(base_ckpt: Path, run_dir: str | Path) -> dict[str, str]:
    """The tags by which a run in `run_dir` records the checkpoint it started from."""
    return {
        "base_run": os.path.relpath(base_ckpt.parent.parent.resolve(), Path(run_dir).resolve()),
        "base_checkpoint": base_ckpt.name.removesuffix(".old"),
        "base_fingerprint": fingerprint(base_ckpt),
    }


def describe_origin(tags: dict[str, str], run_dir: str | Path) -> str:
    """The base a run started from, for people: `LoRA rank 8 (...) on runs/base ckpt/best (sha256 ...)`."""
    base = os.path.normpath(Path(run_dir) / tags["base_run"])
    where = f"{base} ckpt/{tags['base_checkpoint']} (sha256 {tags['base_fingerprint'][:12]})"
    if "lora" not in tags:
        return f"fine-tuned from {where}"
    lora = LoRAConfig.from_json(tags["lora"])
    return f"LoRA rank {lora.rank} ({lora.layers}) on {where}"


def base_checkpoint(ckpt_dir: str | Path) -> Path:
    """The base run's checkpoint a LoRA checkpoint's adapters go on, as it was when they trained."""
    tags = read_tags(ckpt_dir)
    run_dir = resolve_dir(ckpt_dir).parent.parent
    base = resolve_dir(Path(os.path.normpath(run_dir / tags["base_run"])) / "ckpt" / tags["base_checkpoint"])
    if not (base / WEIGHTS).is_file():
        raise UserError(f"{run_dir} holds LoRA adapters on {base}, which is missing: restore that run")
    if fingerprint(base) != tags["base_fingerprint"]:
        raise UserError(f"{run_dir} holds LoRA adapters on {base}, which has changed since: restore that run")
    return base


def lora_config(ckpt_dir: str | Path) -> LoRAConfig | None:
    tags = read_tags(ckpt_dir)
    return LoRAConfig.from_json(tags["lora"]) if "lora" in tags else None


def load_model(ckpt_dir: str | Path, device: torch.device | str = "cpu", merge: bool = True) -> GPT:
    """A GPT with the checkpoint's architecture and weights, in eval mode. A LoRA checkpoint's
    adapters go onto its base run's model, folded into its weights unless `merge` is False."""
    lora = lora_config(ckpt_dir)
    if lora is None:
        model = GPT(read_model_config(ckpt_dir))
    else:
        model = add_lora(load_model(base_checkpoint(ckpt_dir)), lora)
    load_weights(ckpt_dir, model)
    if lora is not None and merge:
        merge_lora(model)
    return model.to(device).eval()
