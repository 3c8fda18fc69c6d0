"""Where training metrics go: the console, `metrics.jsonl`, and TensorBoard / wandb when asked for."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallgpt.errors import UserError
from smallgpt.io import atomic_write_text, cannot_write, read_user_text


def _need(package: str, extra: str) -> Any:
    try:
        return __import__(package)
    except ImportError:
        raise UserError(f"{package} is not installed: pip install {package} (or smallgpt[{extra}])") from None


def check_backends(tensorboard: bool, wandb: bool) -> None:
    """UserError now, before the run writes anything, if a logging backend asked for is missing."""
    if tensorboard:
        _need("tensorboard", "tensorboard")
    if wandb:
        _need("wandb", "wandb")


def json_value(value: Any) -> Any:
    """NaN and inf as null: JSON has no spelling for them (json.dumps would write a bare NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def drop_records_after(path: Path, iter_num: int, evaluated: bool) -> None:
    """Before a resumed run appends to metrics.jsonl: drop what it will write again, the records
    from after its checkpoint at `iter_num` (a kill left them), and a line the kill cut short.
    The evaluation at `iter_num` itself stays when it is not repeated (`evaluated`)."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        at = record.get("iter", -1)
        return at < iter_num or (at == iter_num and evaluated and record.get("event") == "eval")

    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and keep(line)]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


@dataclass
class WandbRun:
    """A wandb run to log to: its project, name and the settings shown with it."""

    project: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)


class MetricsLogger:
    """Appends one JSON object per event to metrics.jsonl and forwards scalars to the backends."""

    def __init__(
        self,
        run_dir: str | Path,
        resume: bool = False,
        tensorboard: bool = False,
        wandb_run: WandbRun | None = None,
    ):
        self._tensorboard: Any = None
        self._wandb: Any = None
        if tensorboard:
            _need("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb_run is not None:
            wandb = _need("wandb", "wandb")
            # WANDB_MODE=offline works with no network; wandb sync uploads later
            wandb.init(
                project=wandb_run.project,
                name=wandb_run.name,
                config=wandb_run.settings,
                dir=str(run_dir),
                resume="allow" if resume else None,
            )
            self._wandb = wandb
        # opened last: a missing backend package stops the run before anything is written
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if resume else "w", encoding="utf-8")

    def log(self, event: str, **values: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **values}
        line = json.dumps({k: json_value(v) for k, v in record.items()}, allow_nan=False)
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:
            raise cannot_write(self.path, e) from None
        step = values.get("iter", 0)
        scalars = {k: v for k, v in values.items() if k != "iter" and isinstance(json_value(v), (int, float))}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"{event}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{event}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a smallgpt run folder?")
    records = []
    for n, line in enumerate(read_user_text(path).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not valid JSON") from None
    return records
