"""A run's metrics.jsonl as curves and tables; `smallgpt export-metrics` for spreadsheet users."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallgpt.errors import UserError
from smallgpt.io import atomic_write_bytes, atomic_write_text
from smallgpt.train.logging import read_metrics

FIRST_COLUMNS = ("event", "iter", "tokens", "time")


def events(run_dir: str | Path, event: str) -> list[dict[str, Any]]:
    """Records of one event kind ("train" or "eval"), one per iteration, in iteration order.

    A resumed run logs again the iterations after its last checkpoint: the later record wins.
    """
    by_iter = {r["iter"]: r for r in read_metrics(run_dir) if r.get("event") == event and "iter" in r}
    return [by_iter[i] for i in sorted(by_iter)]


def columns(records: list[dict[str, Any]]) -> list[str]:
    """The known leading columns, then every other key in the order it first appears."""
    keys = dict.fromkeys(k for k in FIRST_COLUMNS if any(k in r for r in records))
    for record in records:
        keys.update(dict.fromkeys(record))
    return list(keys)


def to_csv(records: list[dict[str, Any]], names: list[str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names or columns(records), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def to_xlsx(sheets: dict[str, list[dict[str, Any]]]) -> bytes:
    """One worksheet per event kind, a header row and one row per record."""
    try:
        import openpyxl
    except ImportError:
        raise UserError("xlsx export needs openpyxl: pip install openpyxl (or smallgpt[xlsx])") from None
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, records in sheets.items():
        sheet, names = book.create_sheet(name), columns(records)
        sheet.append(names)
        for record in records:
            sheet.append([record.get(k) for k in names])
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


@dataclass
class ExportArgs:
    run: str | None = field(
        default=None, metadata={"help": "a run folder (with metrics.jsonl)", "positional": True}
    )
    format: str = field(default="csv", metadata={"help": "csv (one table) or xlsx (a sheet per event)"})
    out: str | None = field(default=None, metadata={"help": "output file (default: RUN/metrics.FORMAT)"})


def export_metrics(args: ExportArgs) -> Path:
    """Write a run's metrics as CSV or XLSX; returns the file written."""
    if args.run is None:
        raise UserError("export-metrics needs a run folder: smallgpt export-metrics RUN_DIR")
    if args.format not in ("csv", "xlsx"):
        raise UserError(f"--format must be csv or xlsx, not {args.format!r}")
    out = Path(args.out or Path(args.run) / f"metrics.{args.format}")
    sheets = {event: events(args.run, event) for event in ("train", "eval")}
    if args.format == "csv":
        atomic_write_text(out, to_csv([r for records in sheets.values() for r in records]))
    else:
        atomic_write_bytes(out, to_xlsx(sheets))
    print(f"wrote {out}")
    return out
