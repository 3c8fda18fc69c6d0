"""The training loop, shared by pretraining, chat and classifier fine-tuning.

Step order, as in nanoGPT: set lr -> (eval, checkpoint) -> micro-steps (gradient sync only on the
last) -> clip -> finiteness check -> optimizer step -> zero grads -> log. Everything that decides which
batch comes next (iteration, sampler and RNG states) goes into the checkpoint, so `init_from=resume`
continues a run exactly as if it had never stopped, also after a kill -9 at any moment.

The host waits for the GPU only on log steps and before checkpoints, as nanoGPT (whose loop syncs on
log steps alone): the divergence guard keeps the first NaN or inf step's iteration on the device and
reads it there, so a non-finite weight never reaches a checkpoint (`nan_policy=stop`). `skip` must
know before each step whether to take it, so it reads it every step. Ctrl-C stops between steps,
after writing ckpt/last.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from smallgpt.data.loader import Batch
from smallgpt.device import cpu_can_compile, cpu_has_bf16
from smallgpt.errors import TrainingDiverged, UserError
from smallgpt.model.gpt import ModelConfig
from smallgpt.progress import progress_bar
from smallgpt.train import checkpoint, distributed
from smallgpt.train.distributed import DistInfo
from smallgpt.train.logging import MetricsLogger, WandbRun, drop_records_after
from smallgpt.train.schedule import LRSchedule, lr_at

# Dense (no sparsity) peak FLOP/s of GPUs we can name, from NVIDIA's datasheets: (16-bit training:
# bf16, or fp16 on GPUs without bf16; fp32 training: TF32, which the Trainer turns on, or plain fp32
# on GPUs without it). MFU is reported only for these. A key matches whole words of the device's
# name and the longest match wins: "NVIDIA L40" is an L40, not an L4; "H100" alone is the SXM part.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H100": (989e12, 495e12),  # e.g. "NVIDIA H100 80GB HBM3"
    "H100 PCIe": (756e12, 378e12),
    "H100 NVL": (835e12, 418e12),
    "H200": (989e12, 495e12),
    "H200 NVL": (835e12, 418e12),
    "A100": (312e12, 156e12),  # e.g. "NVIDIA A100-SXM4-80GB"
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
    "V100": (125e12, 15.7e12),  # SXM2; fp16 tensor cores, no TF32
    "V100 PCIe": (112e12, 14e12),
    "T4": (65e12, 8.1e12),
}
NO_BAD_STEP = 2**62  # Trainer.first_bad while every step since the last check was finite


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...  # a Batch for language modelling; whatever loss_fn reads otherwise
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> mean loss
EvaluateFn = Callable[[nn.Module], dict[str, float]]  # the model (in eval mode) -> metrics
CountTokens = Callable[[Any], int]  # batch -> tokens it holds (logged as tokens and tokens_per_sec)


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y, mask = batch
    return model(x, y, loss_mask=mask)[1]


def window_tokens(batch: Batch) -> int:
    return batch[0].numel()


@dataclass
class LoopSettings:
    """What the training loop needs to know; pretraining builds it from its Config (train/run.py),
    classify from its own flags. Nothing else of a job's settings reaches the Trainer."""

    max_iters: int
    eval_interval: int
    schedule: LRSchedule
    eval_iters: int = 1  # batches per split in the default evaluation
    max_seconds: float = 0.0  # stop after this much training time (0: no limit)
    eval_only: bool = False
    always_save_checkpoint: bool = True  # ckpt/last at every evaluation, not only on improvement
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0  # 0: no clipping
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    parallel: str = "ddp"  # ddp | fsdp, under torchrun
    log_interval: int = 10
    progress: bool = True
    tensorboard: bool = False
    wandb_run: WandbRun | None = None
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    nan_policy: str = "stop"  # a non-finite loss or gradient norm: stop the run | skip the step
    nan_max_consecutive: int = 10  # skip: stop after this many non-finite steps in a row


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The training dtype: `auto` is bfloat16 on GPUs that have it (else float16), float32 elsewhere.

    On a CPU, bfloat16 must be asked for: autocast runs the Linear layers in bf16 (weights stay
    fp32), faster than fp32 on CPUs with AVX512-BF16 or AMX at the same val loss on nanoGPT's CPU
    quick start; but a tiny model memorising at a high lr converged slower with bf16 (test_chat's
    fixture), so it is not the default. The figures: docs/benchmarks.md.
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # emulated bf16 (V100, T4) counts by default: it would train slowly and without a GradScaler
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The GPU's dense peak FLOP/s for training in `dtype` (PEAK_FLOPS), None if it is not listed."""
    if device.type != "cuda":
        return None
    words = torch.cuda.get_device_name(device).lower().replace("-", " ").split()

    def matches(key: str) -> bool:
        key_words = key.lower().split()
        return any(words[i : i + len(key_words)] == key_words for i in range(len(words)))

    keys = [key for key in PEAK_FLOPS if matches(key)]
    if not keys:
        return None
    half, fp32 = PEAK_FLOPS[max(keys, key=lambda key: len(key.split()))]
    return fp32 if dtype == torch.float32 else half


class InterruptFlag:
    """Between `catch()` and `release()`, Ctrl-C (SIGINT) only sets `pressed`, which the loop reads
    between steps: a step cut in half could not be saved. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def catch(self) -> None:
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._press)

    def _press(self, signum: int, frame: Any) -> None:
        self.pressed = True
        self.release()

    def release(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@dataclass
class Window:
    """Iterations and tokens since the last log line, for its ms/iter and tokens/s."""

    start: float = field(default_factory=time.perf_counter)
    iters: int = 0
    tokens: int = 0


@dataclass
class Trainer:
    settings: LoopSettings
    model: nn.Module  # the plain model; the trainer wraps it (compile, DDP) itself
    model_config: ModelConfig  # the GPT's (a classifier's backbone's), written with every checkpoint
    optimizer: torch.optim.Optimizer
    train_source: BatchSource
    eval_sources: dict[str, Callable[[], BatchSource]]  # a fresh, fixed-seed sampler per split
    run_dir: Path
    dist: DistInfo
    loss_fn: LossFn = lm_loss
    count_tokens: CountTokens = window_tokens
    checkpoint_info: dict[str, Any] = field(default_factory=dict)  # saved with every checkpoint
    bytes_per_token: dict[str, float] = field(default_factory=dict)  # for bits-per-byte metrics
    monitor: str = "val_loss"  # the metric that picks ckpt/best (lower is better)
    evaluate_fn: EvaluateFn | None = None  # replaces the mean loss over eval_iters batches
    iter_num: int = 0
    best_metric: float = math.inf
    tokens_seen: int = 0
    train_seconds: float = 0.0
    stale_evals: int = 0  # evaluations since the monitored metric last improved
    nonfinite_streak: int = 0  # non-finite steps in a row (nan_policy=skip)

    def __post_init__(self) -> None:
        t = self.settings
        self.device = self.dist.device
        self.dtype = autocast_dtype(t.dtype, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.autocast: Callable[[], contextlib.AbstractContextManager]
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not cpu_has_bf16():
            # emulated bf16 would be several times slower than fp32
            if self.dist.is_main:
                print(
                    "note: this CPU has no native bfloat16 (AVX512-BF16 or AMX): dtype=bfloat16 "
                    "trains in float32 here",
                    file=sys.stderr,
                )
            self.dtype = torch.float32
        self.compile = t.compile
        if t.compile and self.device.type == "cpu" and not cpu_can_compile():
            if self.dist.is_main:
                print(
                    "note: no C++ compiler found (torch.compile builds C++ on a CPU): compile=true "
                    "trains without compiling here",
                    file=sys.stderr,
                )
            self.compile = False
        if self.dtype == torch.float32:
            self.autocast = contextlib.nullcontext
        else:
            self.autocast = lambda: torch.autocast(self.device.type, dtype=self.dtype)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # the global batch is the same whatever the process count: ranks split the micro-steps
        if t.gradient_accumulation_steps % self.dist.world_size:
            raise UserError(
                f"gradient_accumulation_steps ({t.gradient_accumulation_steps}) must be divisible by "
                f"the number of processes ({self.dist.world_size})"
            )
        self.accum_steps = t.gradient_accumulation_steps // self.dist.world_size
        # ranks split the evaluation batches too: each draws world_size batches and keeps its own
        self.eval_iters = math.ceil(t.eval_iters / self.dist.world_size)
        self.wrapped = distributed.wrap_model(self.model, self.optimizer, self.dist, t.parallel, self.compile)
        self.peak_flops = peak_flops(self.device, self.dtype)
        # the first non-finite step since the last check; on the device, so that no step waits for it
        self.first_bad = torch.full((), NO_BAD_STEP, device=self.device)
        self.stop_agreed = False  # under torchrun: a Ctrl-C that every rank knows of (at a check)
        self.resumed = False
        self.evaluated_at_resume = False  # the checkpoint was written right after an evaluation
        self.interrupt = InterruptFlag()

    # ---- state -------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "sampler": self.train_source.state_dict(),
        }

    def _all_ranks(self, value: Any) -> list[Any]:
        if not self.dist.ddp:
            return [value]
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def save(self, name: str, evaluated: bool = True) -> None:
        self.stop_if_diverged()  # a non-finite step's weights never reach a checkpoint
        rng = self._all_ranks(self._rng_state())  # every rank's RNG, so all of them resume exactly
        main = self.dist.is_main
        weights, optimizer_state = checkpoint.full_training_state(self.model, self.optimizer, main)
        if not main:
            return
        state = {
            "iter_num": self.iter_num,
            "best_metric": self.best_metric,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "parallel": self.settings.parallel,
            "evaluated": evaluated,
            "nonfinite_streak": self.nonfinite_streak,
            **self.checkpoint_info,
        }
        tags = {k: v for k, v in self.checkpoint_info.items() if isinstance(v, str)}
        checkpoint.write_checkpoint(self.run_dir / "ckpt" / name, weights, self.model_config, state, tags)

    def resume(self, ckpt_dir: Path) -> dict[str, Any]:
        """Load weights and the full training state from a checkpoint written by `save`."""
        state = checkpoint.load_state(ckpt_dir)
        # per-rank RNG states and the optimizer state's layout (FSDP's is keyed by name) must match
        # (checkpoints older than the "parallel" key kept it in a config dict, "ddp" unless set)
        parallel = state.get("parallel") or state.get("config", {}).get("train", {}).get("parallel", "ddp")
        saved = (len(state["rng"]), parallel)
        if saved != (self.dist.world_size, self.settings.parallel):
            raise UserError(
                f"checkpoint {ckpt_dir} was written by {saved[0]} processes with parallel={saved[1]}: "
                "resume it with as many processes and the same parallel"
            )
        checkpoint.load_training_state(ckpt_dir, self.model, self.optimizer, state["optimizer"])
        if state["scaler"]:  # {} from a run that did not train in float16: the scaler starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.iter_num, self.best_metric = state["iter_num"], state["best_metric"]
        self.tokens_seen, self.train_seconds = state["tokens_seen"], state["train_seconds"]
        self.evaluated_at_resume = state.get("evaluated", True)
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.train_source.load_state_dict(rng["sampler"])
        self.resumed = True
        return state

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split (and bits per byte), or evaluate_fn's."""
        self.model.eval()
        if self.evaluate_fn is not None:
            with self.autocast():
                metrics = self.evaluate_fn(self.model)
            self.model.train()
            return metrics
        results: dict[str, float] = {}
        for split, make_source in self.eval_sources.items():
            source = make_source()
            losses = torch.zeros(self.eval_iters, device=self.device)
            for k in range(self.eval_iters):
                with self.autocast():
                    losses[k] = self.loss_fn(self.model, source.next_batch()).float()
            loss = distributed.mean_over_ranks(losses.mean(), self.dist)
            results[f"{split}_loss"] = loss.item()
            if split in self.bytes_per_token:
                results[f"{split}_bpb"] = loss.item() / math.log(2) / self.bytes_per_token[split]
        self.model.train()
        return results

    # ---- the loop ----------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def train_step(self) -> tuple[torch.Tensor, int, bool]:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean loss,
        the tokens this process trained on, and whether the step was taken (all of it finite)."""
        steps, tokens = self.accum_steps, 0
        total = torch.zeros((), device=self.device)
        for micro in range(steps):
            batch = self.train_source.next_batch()
            tokens += self.count_tokens(batch)
            if self.dist.ddp:  # reduce gradients only once, in the last micro-step's backward
                distributed.set_grad_sync(self.wrapped, micro == steps - 1)
            with self.autocast():
                loss = self.loss_fn(self.wrapped, batch) / steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        finite = torch.isfinite(total)
        grad_norm = self.clip_gradients()
        if grad_norm is not None:
            finite &= torch.isfinite(grad_norm)
        self.first_bad = torch.minimum(self.first_bad, torch.where(finite, NO_BAD_STEP, self.iter_num))
        # stop: a non-finite step is found at the next check, before anything is saved; skip must
        # know now, before the step: one wait for the GPU per step
        step_ok = self.settings.nan_policy != "skip" or self.check() is None
        if step_ok:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.scaler.is_enabled():  # end the scaler's step (clipping unscaled the gradients)
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.optimizer.zero_grad(set_to_none=True)
        after_step = getattr(self.optimizer, "after_step", None)  # e.g. SophiaG's Hessian estimate
        if after_step is not None and step_ok:
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            after_step(self.iter_num + 1, self.wrapped, batch, self.autocast, scale)
        return total, tokens, step_ok

    def clip_gradients(self) -> torch.Tensor | None:
        """The gradient norm, for the finiteness check, after clipping to grad_clip if it is set.
        None under fp16, whose scaler skips inf gradients itself."""
        fp16, max_norm = self.scaler.is_enabled(), self.settings.grad_clip
        if fp16 and max_norm == 0:
            return None
        if fp16:
            self.scaler.unscale_(self.optimizer)
        norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if max_norm > 0:  # without clipping, nanoGPT's grad_clip=0, the gradients stay as they are
            nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, replicated; a plain tensor for the check
            norm = norm.full_tensor()
        return None if fp16 else norm

    def check(self) -> int | None:
        """The first non-finite iteration since the last check (None: all finite), on the host: one
        wait for the GPU. Under torchrun one all_reduce, which also shares a Ctrl-C seen by any rank,
        so all ranks stop at the same step."""
        flags = torch.stack([self.first_bad, torch.tensor(-int(self.interrupt.pressed), device=self.device)])
        if self.dist.ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        first_bad, pressed = flags.tolist()
        self.first_bad = torch.full_like(self.first_bad, NO_BAD_STEP)
        self.stop_agreed = pressed < 0
        return None if first_bad == NO_BAD_STEP else first_bad

    def stop_if_diverged(self) -> None:
        """nan_policy=stop: raise if a step since the last check was not finite."""
        first_bad = self.check()
        if first_bad is not None:
            raise self.diverged("the loss or gradient norm is NaN or inf (nan_policy=stop)", first_bad)

    def interrupted(self) -> bool:
        """Ctrl-C: at once in one process; under torchrun once every rank knows (at the next check)."""
        return self.stop_agreed if self.dist.ddp else self.interrupt.pressed

    def count_skipped(self, step_ok: bool, log: Callable[[str], None]) -> None:
        """nan_policy=skip: a non-finite step was skipped; stop after nan_max_consecutive in a row."""
        if step_ok:
            self.nonfinite_streak = 0
            return
        t = self.settings
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= t.nan_max_consecutive:
            in_a_row = f"nan_policy=skip, {self.nonfinite_streak} steps in a row"
            raise self.diverged(f"the loss or gradient norm is NaN or inf ({in_a_row})", self.iter_num)
        log(
            f"iter {self.iter_num}: the loss or gradient norm is NaN or inf; step skipped "
            f"({self.nonfinite_streak} in a row, the run stops at {t.nan_max_consecutive})"
        )

    def diverged(self, reason: str, iteration: int) -> TrainingDiverged:
        ckpt = self.run_dir / "ckpt"
        kept = f"{ckpt} keeps the checkpoints from before it" if ckpt.is_dir() else "no checkpoint written"
        return TrainingDiverged(
            f"training diverged at iteration {iteration}: {reason}; {kept}; "
            "try a lower learning_rate or a grad_clip"
        )

    def _time_used(self) -> float | None:
        """The fraction of max_seconds trained so far, when the lr schedule runs on time."""
        if self.settings.schedule.lr_decay_by != "seconds":
            return None
        return self.train_seconds / self.settings.max_seconds

    def _done(self) -> bool:
        t = self.settings
        out_of_time = t.max_seconds > 0 and self.train_seconds >= t.max_seconds
        out_of_patience = t.patience > 0 and self.stale_evals >= t.patience
        return self.iter_num >= t.max_iters or out_of_time or out_of_patience

    def _eval_and_save(
        self, logger: MetricsLogger | None, log: Callable[[str], None], save: bool = True
    ) -> dict:
        """Evaluate, log, and write ckpt/best on improvement and ckpt/last; returns the metrics."""
        self.stop_if_diverged()  # a diverged step is named as such, not by the val loss it caused
        metrics = self.evaluate()
        non_finite = [k for k, v in metrics.items() if not math.isfinite(v)]
        improved = metrics.get(self.monitor, math.inf) < self.best_metric
        if improved:
            self.best_metric = metrics[self.monitor]
        self.stale_evals = 0 if improved or self.iter_num == 0 else self.stale_evals + 1
        line = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log(f"step {self.iter_num}: {line}")
        if logger is not None:
            logger.log("eval", iter=self.iter_num, tokens=self.tokens_seen, **metrics)
        if non_finite:  # the weights themselves are broken: keep the checkpoints from before
            raise self.diverged(f"{non_finite[0]} is {metrics[non_finite[0]]}", self.iter_num)
        if save and self.iter_num > 0:  # nothing is learned at step 0; keep any older checkpoint there
            if improved:
                self.save("best")
            if improved or self.settings.always_save_checkpoint or self._done():
                self.save("last")
        return metrics

    def fit(self) -> dict[str, float]:
        """Train until max_iters (or max_seconds); returns the last evaluation's metrics."""
        t, main = self.settings, self.dist.is_main
        # a resumed run was evaluated at its first step before it stopped, unless it is done
        skip_first_eval = self.resumed and self.evaluated_at_resume and not self._done()
        logger = None
        if main and not t.eval_only:  # eval_only prints its metrics; the run's metrics.jsonl stays as it was
            if self.resumed:
                drop_records_after(self.run_dir / "metrics.jsonl", self.iter_num, skip_first_eval)
            logger = MetricsLogger(self.run_dir, self.resumed, t.tensorboard, t.wandb_run)
        bar = progress_bar(main and t.progress, total=t.max_iters, initial=self.iter_num, unit="it")
        log = bar.write if main else (lambda _line: None)
        first, metrics = True, {}
        compiling = self.compile  # the first step of this process compiles the model
        self.model.train()
        window = Window()  # ms/iter and tokens/s are averages over a log window
        try:
            if t.eval_only:
                return self._eval_and_save(logger, log, save=False)
            self.interrupt.catch()
            while True:
                self.set_lr(lr_at(self.iter_num, t.schedule, self._time_used()))
                at_eval = self.iter_num % t.eval_interval == 0 or self._done()
                if at_eval and not (first and skip_first_eval):
                    metrics = self._eval_and_save(logger, log)
                    window = Window()  # eval time is not training
                if self._done():
                    break
                first = False
                step_start = time.perf_counter()
                loss, tokens, step_ok = self.train_step()
                if t.nan_policy == "skip":
                    self.count_skipped(step_ok, log)
                step_seconds = time.perf_counter() - step_start
                if compiling:  # setup, not training: max_seconds and the lr schedule do not spend it
                    log(f"iter {self.iter_num}: compiled the model in {step_seconds:.1f} s")
                    compiling = False
                else:
                    self.train_seconds += step_seconds
                if t.max_seconds > 0:  # every rank must stop at the same iteration
                    self.train_seconds = distributed.rank0_value(self.train_seconds, self.dist)
                tokens *= self.dist.world_size  # every rank's batches are the same size
                self.tokens_seen += tokens
                self.iter_num += 1
                window.iters, window.tokens = window.iters + 1, window.tokens + tokens
                bar.update(1)
                if (self.iter_num - 1) % t.log_interval == 0:
                    self.stop_if_diverged()  # the host waits for the GPU here anyway
                    # the global batch's loss; .item() waits for the GPU, so only when logging
                    loss_value = distributed.mean_over_ranks(loss, self.dist).item()
                    self._log_step(logger, log, loss_value, window)
                    window = Window()
                if self.interrupted():
                    self.save_and_stop(bar)
        finally:
            self.interrupt.release()
            bar.close()
            if logger is not None:
                logger.close()
        return metrics

    def save_and_stop(self, bar: Any) -> None:
        """After Ctrl-C: write ckpt/last at this step boundary and stop (KeyboardInterrupt)."""
        self.save("last", evaluated=False)
        bar.close()
        if self.dist.is_main:
            print(
                f"interrupted at iteration {self.iter_num}: saved {self.run_dir / 'ckpt' / 'last'}; "
                "continue with --init_from=resume",
                file=sys.stderr,
            )
        raise KeyboardInterrupt

    def _log_step(
        self, logger: MetricsLogger | None, log: Callable[[str], None], loss: float, window: Window
    ) -> None:
        seconds = time.perf_counter() - window.start
        elapsed, tokens_per_sec = seconds / window.iters, window.tokens / seconds
        mfu = None
        flops_per_token = getattr(checkpoint.unwrap(self.model), "flops_per_token", None)  # a GPT's
        if self.peak_flops and flops_per_token is not None:
            mfu = flops_per_token() * tokens_per_sec / (self.peak_flops * self.dist.world_size)
        lr = self.optimizer.param_groups[0]["lr"]
        extra: dict[str, float] = getattr(self.optimizer, "log_metrics", dict)()  # e.g. sophiag's win_rate
        mfu_text = f", mfu {100 * mfu:.1f}%" if mfu is not None else ""
        extra_text = "".join(f", {k} {v:.3f}" for k, v in extra.items())
        log(
            f"iter {self.iter_num - 1}: loss {loss:.4f}, lr {lr:.2e}, {1000 * elapsed:.1f} ms, "
            f"{tokens_per_sec:,.0f} tok/s{mfu_text}{extra_text}"
        )
        if logger is not None:
            logger.log(
                "train",
                iter=self.iter_num - 1,
                tokens=self.tokens_seen,
                loss=loss,
                lr=lr,
                ms_per_iter=1000 * elapsed,
                tokens_per_sec=tokens_per_sec,
                mfu=mfu,
                **extra,
            )
