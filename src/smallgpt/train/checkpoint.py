"""Checkpoints: weights in safetensors, training state in a weights_only-loadable torch file.

A checkpoint is a folder (`ckpt/last`, `ckpt/best`) written whole through `atomic_dir`, so a kill
at any moment leaves the previous checkpoint usable. Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, cast

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from smallgpt.errors import TrainingDiverged, UserError
from smallgpt.io import atomic_dir, resolve_dir
from smallgpt.model.gpt import GPT, TIED_HEAD, ModelConfig
from smallgpt.train.distributed import is_sharded

WEIGHTS = "model.safetensors"
STATE = "state.pt"


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
    state = unwrap(model).state_dict()
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
    missing = [k for k in missing if not _is_tied(k)]
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


def load_model(ckpt_dir: str | Path, device: torch.device | str = "cpu") -> GPT:
    """A GPT with the checkpoint's architecture and weights, in eval mode."""
    model = GPT(read_model_config(ckpt_dir))
    load_weights(ckpt_dir, model)
    return model.to(device).eval()
