"""Typed training configuration, filled from YAML or nanoGPT-style .py files and --key=value overrides.

Keys are nanoGPT's where one exists, so a nanoGPT config file runs unchanged. Each key lives in one
section (model, data, train, optim, log); files and overrides may name it flat (`n_layer`) or dotted
(`model.n_layer`). An unknown key or a value of the wrong type is a UserError naming the close match.
The docstring under each field is its help text (`smallgpt train --help`, see `field_docs`).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import textwrap
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from smallgpt.errors import UserError
from smallgpt.io import read_user_text
from smallgpt.model.gpt import ModelConfig
from smallgpt.model.lora import LoRAConfig


@dataclass
class DataConfig:
    dataset: str = ""
    """a prepared data folder, or a name under data/ (nanoGPT's `dataset`)"""
    loss_on: str = "all"
    """all | bot: chat data's loss only on bot turns (its <split>.mask.bin)"""


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    """the run folder: config.yaml, metrics.jsonl, ckpt/last, ckpt/best"""
    init_from: str = "scratch"
    """scratch | resume (out_dir's ckpt/last) | gpt2[-medium|-large|-xl] | a Hugging Face folder | a run
    folder to fine-tune (its ckpt/best, else ckpt/last; or name one: RUN/ckpt/last)"""
    init_from_fingerprint: str = ""
    """written by train: sha256 of the run checkpoint init_from started from; when set, training
    refuses that checkpoint if it has changed since"""
    lora_rank: int | None = None
    """none: train every weight; N > 0: freeze them and train rank-N LoRA adapters (init_from a run)"""
    lora_alpha: float = 16.0
    """LoRA scale: the adapters' update is multiplied by lora_alpha / lora_rank"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input while training"""
    lora_layers: str = "attn.c_attn,attn.c_proj"
    """the Linear layers of each block that get adapters, comma-separated: attn.c_attn (q, k, v),
    attn.c_proj (attention output), mlp.c_fc, mlp.c_proj"""
    overwrite: bool = False
    """replace the trained run already in out_dir (refused without it; resume continues one instead)"""
    batch_size: int = 12
    """sequences per micro-step"""
    gradient_accumulation_steps: int = 1
    """micro-steps per optimizer step (split between processes under torchrun)"""
    max_iters: int = 5000
    """optimizer steps to train for"""
    max_seconds: float = 0.0
    """stop after this much training time (0: no limit)"""
    eval_interval: int = 250
    """steps between evaluations (and checkpoints)"""
    eval_iters: int = 200
    """batches per split in each evaluation"""
    eval_only: bool = False
    """evaluate once, print, and exit; writes nothing into out_dir"""
    always_save_checkpoint: bool = True
    """write ckpt/last at every evaluation, not only on improvement"""
    seed: int = 1337
    """seed of the initial weights and the batches"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps"""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 (auto: bfloat16 on capable GPUs, float32 on CPU; bfloat16 on
    a CPU: matmuls in bf16, everything else fp32, fast on CPUs with AMX)"""
    compile: bool = False
    """torch.compile the model"""
    backend: str = "auto"
    """distributed backend under torchrun: auto | nccl | gloo"""
    parallel: str = "ddp"
    """under torchrun: ddp (a model copy per process) | fsdp (sharded, FSDP2; adamw only)"""
    nan_policy: str = "stop"
    """a step with a NaN/inf loss or gradient norm: stop (exit 3, checkpoints kept) | skip the step"""
    nan_max_consecutive: int = 10
    """nan_policy=skip: stop after this many NaN/inf steps in a row"""


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    """adamw | sophiag | muon"""
    learning_rate: float = 6e-4
    """peak learning rate"""
    weight_decay: float = 0.1
    """decoupled weight decay of the matrices (not of biases and norm gains)"""
    beta1: float | None = None
    """none: the optimizer's default (adamw 0.9, sophiag 0.965)"""
    beta2: float | None = None
    """none: the optimizer's default (adamw 0.95, sophiag 0.99)"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: no clipping)"""
    decay_lr: bool = True
    """warmup then cosine decay; false: a constant learning_rate"""
    warmup_iters: int = 100
    """steps of linear warmup"""
    lr_decay_iters: int = 5000
    """step where the cosine reaches min_lr"""
    lr_decay_by: str = "iters"
    """iters | seconds: the decay ends at lr_decay_iters, or at max_seconds"""
    decay_shape: str = "cosine"
    """cosine | wsd (warmup-stable-decay: hold the peak, then decay linearly over the last cooldown_frac)"""
    cooldown_frac: float = 0.2
    """wsd: the share of the decay span (after warmup) spent cooling down to min_lr"""
    min_lr: float = 6e-5
    """learning rate at the end of the decay"""
    rho: float = 0.04
    """sophiag: clipping threshold of the Hessian-preconditioned step"""
    hessian_interval: int = 10
    """sophiag: steps between Hessian estimates"""
    muon_lr: float = 0.02
    """muon: peak lr of the hidden matrices (scheduled like learning_rate)"""
    muon_momentum: float = 0.95
    """muon: momentum of the hidden matrices"""


@dataclass
class LogConfig:
    log_interval: int = 10
    """steps between log lines (console and metrics.jsonl)"""
    progress: bool = True
    """a progress bar while training"""
    wandb_log: bool = False
    """log to Weights & Biases (pip install 'smallgpt[wandb]')"""
    wandb_project: str = "smallgpt"
    """wandb project"""
    wandb_run_name: str = "run"
    """wandb run name"""
    tensorboard: bool = False
    """write TensorBoard event files to out_dir/tensorboard (pip install 'smallgpt[tensorboard]')"""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def lora(self) -> LoRAConfig | None:
        """The LoRA adapters to train, or None: a full fine-tune (or training from scratch)."""
        t = self.train
        if t.lora_rank is None:
            return None
        return LoRAConfig(t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_layers)

    def validate(self) -> None:
        t, o = self.train, self.optim
        positive: dict[str, float] = {
            "batch_size": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "eval_interval": t.eval_interval,
            "eval_iters": t.eval_iters,
            "log_interval": self.log.log_interval,
            "nan_max_consecutive": t.nan_max_consecutive,
        }
        for key, value in positive.items():
            if value <= 0:
                raise UserError(f"config {key} must be positive, got {value}")
        non_negative: dict[str, float] = {
            "max_iters": t.max_iters,
            "max_seconds": t.max_seconds,
            "learning_rate": o.learning_rate,
            "min_lr": o.min_lr,
            "warmup_iters": o.warmup_iters,
            "weight_decay": o.weight_decay,
            "grad_clip": o.grad_clip,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise UserError(f"config {key} must not be negative, got {value}")
        self.model.validate(vocab_known=False)
        from smallgpt.model.hub import HUB_MODELS

        if t.init_from not in ("scratch", "resume"):
            if t.init_from not in HUB_MODELS and not Path(t.init_from).is_dir():
                raise UserError(
                    f"config init_from must be scratch, resume, {', '.join(HUB_MODELS)}, a run folder or a "
                    f"Hugging Face model folder, got {t.init_from!r}"
                )
        lora = self.lora()
        if lora is not None:
            lora.validate()
            if t.init_from == "scratch" or t.init_from in HUB_MODELS:
                raise UserError("LoRA (lora_rank) trains adapters on a model: set init_from to a run folder")
            if t.parallel == "fsdp":
                raise UserError("LoRA (lora_rank) does not support parallel=fsdp; use ddp")
        if t.overwrite and t.init_from == "resume":
            raise UserError("init_from=resume continues out_dir's run and overwrite replaces it: pick one")
        if t.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"config dtype must be auto, float32, bfloat16 or float16, got {t.dtype!r}")
        if self.data.loss_on not in ("all", "bot"):
            raise UserError(f"config loss_on must be all or bot, got {self.data.loss_on!r}")
        if o.lr_decay_by not in ("iters", "seconds"):
            raise UserError(f"config lr_decay_by must be iters or seconds, got {o.lr_decay_by!r}")
        if o.decay_shape not in DECAY_SHAPES:
            shapes = ", ".join(DECAY_SHAPES)
            raise UserError(f"config decay_shape must be one of {shapes}, got {o.decay_shape!r}")
        if not 0.0 < o.cooldown_frac <= 1.0:
            raise UserError(f"config cooldown_frac must be in (0, 1], got {o.cooldown_frac}")
        if o.lr_decay_by == "seconds" and t.max_seconds <= 0:
            raise UserError("config lr_decay_by=seconds needs a positive max_seconds (the budget)")
        if t.nan_policy not in ("stop", "skip"):
            raise UserError(f"config nan_policy must be stop or skip, got {t.nan_policy!r}")
        if t.parallel not in ("ddp", "fsdp"):
            raise UserError(f"config parallel must be ddp or fsdp, got {t.parallel!r}")
        if t.parallel == "fsdp" and self.optim.optimizer != "adamw":
            # Muon orthogonalises whole matrices and Sophia was not checked on shards: refuse, don't guess
            raise UserError(f"optimizer {self.optim.optimizer} does not support parallel=fsdp; use adamw")
        if not self.data.dataset:
            raise UserError("config dataset is not set: pass --dataset=DATA_DIR (made by smallgpt prepare)")


SECTIONS = tuple(f.name for f in fields(Config))
DECAY_SHAPES = ("cosine", "wsd")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right below the field in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {
        node.target.id: doc.value.value
        for node, doc in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


def _as_typed(value: Any) -> str:
    """A value as it is typed on the command line."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value) if value != "" else '""'


def keys_help(width: int = 100) -> str:
    """Every config key by section with its default and meaning, for `smallgpt train --help`."""
    lines = [
        "config keys, flat (--n_layer=4) or dotted (--model.n_layer=4), with their defaults;",
        "booleans are --compile or --compile=false",
    ]
    for section in fields(Config):
        values = getattr(Config(), section.name)
        docs = field_docs(type(values))
        lines.append(f"{section.name}:")
        for f in fields(values):
            key = f"{f.name}={_as_typed(getattr(values, f.name))}"
            text = textwrap.wrap(docs.get(f.name, ""), width - 33) or [""]
            lines.append(f"  {key:<30} {text[0]}".rstrip())
            lines += [" " * 33 + more for more in text[1:]]
    return "\n".join(lines)


def _key_index() -> dict[str, tuple[str, str]]:
    """Every accepted key -> (section, field): flat names and dotted section.field names."""
    index: dict[str, tuple[str, str]] = {}
    for section in fields(Config):
        for f in fields(getattr(Config(), section.name)):
            assert f.name not in index, f"config key {f.name} is in two sections"
            index[f.name] = (section.name, f.name)
            index[f"{section.name}.{f.name}"] = (section.name, f.name)
    return index


KEYS = _key_index()


def _unknown_key(key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown config key {key!r} in {where}{hint}")


def _field_type(section: str, name: str) -> Any:
    cls = type(getattr(Config(), section))
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check or convert `value` to the field's type; strings from the command line are parsed."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = options[0]
    bad = UserError(f"config {key} in {where} must be {typ.__name__}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)
        except ValueError:
            raise bad from None
        if not math.isfinite(number):
            raise UserError(f"config {key} in {where} must be a finite number, got {value!r}")
        return number
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def apply_values(config: Config, values: dict[str, Any], where: str) -> None:
    """Set every key of `values` (flat, dotted, or nested by section) on `config`."""
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            apply_values(config, {f"{key}.{k}": v for k, v in value.items()}, where)
            continue
        if key not in KEYS:
            raise _unknown_key(key, where)
        section, name = KEYS[key]
        setattr(getattr(config, section), name, _coerce(value, _field_type(section, name), key, where))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Key/values of a YAML file or a nanoGPT-style Python file of assignments."""
    path = Path(path)
    text = read_user_text(path, "config file")
    if path.suffix == ".py":
        namespace: dict[str, Any] = {}
        try:
            exec(compile(text, str(path), "exec"), namespace)
        except Exception as e:  # a user's config file: report where it broke, as one line
            raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
        return {
            k: v
            for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)
        }
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return values


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--key=value` (or `--key value`) pairs from the command line."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"expected --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                name = key.replace("-", "_")
                if name not in KEYS:  # a typo says so, rather than asking for a value
                    raise _unknown_key(name, "the command line")
                if _is_bool_key(name):
                    value = "true"  # a bare boolean flag, e.g. --compile
                else:
                    raise UserError(f"option --{key} needs a value: --{key}=VALUE")
            else:
                i += 1
                value = args[i]
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def _is_bool_key(key: str) -> bool:
    section, name = KEYS[key]
    return _field_type(section, name) is bool


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the config file, then command-line overrides; validated."""
    config = Config()
    if path is not None:
        apply_values(config, read_config_file(path), str(path))
    apply_values(config, parse_overrides(overrides or []), "the command line")
    return config


def save_config(config: Config, path: str | Path) -> None:
    from smallgpt.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
