import csv
import json
import sys

import pytest

from smallgpt.cli import main
from smallgpt.errors import UserError
from smallgpt.experiments.compare import CompareArgs, compare
from smallgpt.experiments.metrics import ExportArgs, events, export_metrics
from smallgpt.experiments.plot import PlotArgs, plot

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def config(tmp_path_factory, char_data):
    root = tmp_path_factory.mktemp("compare")
    path = root / "tiny.yaml"
    path.write_text(
        f"dataset: {char_data}\nblock_size: 16\nn_layer: 1\nn_head: 2\nn_embd: 16\nbatch_size: 2\n"
        "max_iters: 4\neval_interval: 2\neval_iters: 2\nlog_interval: 1\nprogress: false\ndevice: cpu\n"
    )
    return path


@pytest.fixture(scope="module")
def compared(config):
    out = config.parent / "runs"
    rows = compare(CompareArgs(str(config), vary=["optimizer=adamw,muon"], seeds=2, out=str(out)))
    return out, rows


def test_compare_trains_every_variant_and_writes_table_csv_and_png(compared, config):
    out, rows = compared
    assert [(r["run"], r["seed"]) for r in rows] == [
        ("optimizer-adamw", 1337),
        ("optimizer-adamw", 1338),
        ("optimizer-muon", 1337),
        ("optimizer-muon", 1338),
        ("optimizer-adamw", "mean"),
        ("optimizer-muon", "mean"),
    ]
    for name in ("optimizer-adamw_seed1337", "optimizer-muon_seed1338"):
        assert (out / name / "ckpt" / "last" / "model.safetensors").is_file()
    for row in rows[:4]:
        assert row["iters"] == 4 and row["best_val_loss"] <= row["final_val_loss"]
        assert row["final_val_bpb"] > 0 and row["tokens_per_sec"] > 0 and row["wall_s"] > 0
    adamw = [r["final_val_loss"] for r in rows[:2]]
    assert rows[4]["final_val_loss"] == pytest.approx(sum(adamw) / 2)
    assert adamw[0] != adamw[1]  # the seeds really differ
    table = list(csv.DictReader((out / "compare.csv").open()))
    assert len(table) == 6 and float(table[0]["final_val_loss"]) == pytest.approx(rows[0]["final_val_loss"])
    markdown = (out / "compare.md").read_text()
    assert markdown.count("| optimizer-") == 6 and "final_val_bpb" in markdown
    assert markdown.startswith(f"`smallgpt compare {config} --vary optimizer=adamw,muon --seeds 2")
    assert (out / "compare.png").read_bytes().startswith(PNG)


def test_plot_draws_many_runs_against_iterations_or_tokens(compared, tmp_path):
    out, _ = compared
    runs = [str(out / "optimizer-adamw_seed1337"), str(out / "optimizer-muon_seed1337")]
    assert plot(PlotArgs(runs)) == out / "optimizer-adamw_seed1337" / "loss.png"
    target = tmp_path / "curves.png"
    assert main(["plot", *runs, "--x", "tokens", "--lr", "--out", str(target)]) == 0
    assert target.read_bytes().startswith(PNG)


def test_plot_errors_are_one_line(compared, tmp_path, monkeypatch, capsys):
    out, _ = compared
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    assert main(["plot", str(out / "optimizer-muon_seed1337"), "--x", "time"]) == 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot(PlotArgs([str(out / "optimizer-muon_seed1337")]))


def test_export_metrics_csv_and_xlsx_hold_every_record(compared, tmp_path):
    run = compared[0] / "optimizer-muon_seed1338"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    path = export_metrics(ExportArgs(str(run), "csv", str(tmp_path / "m.csv")))
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(records) == 4 + 3  # train every iteration, eval at 0, 2, 4
    assert list(rows[0])[:4] == ["event", "iter", "tokens", "time"]
    assert float(rows[0]["loss"]) == pytest.approx(records[1]["loss"])
    openpyxl = pytest.importorskip("openpyxl")  # an optional extra; the CSV path above is the core
    path = export_metrics(ExportArgs(str(run), "xlsx", str(tmp_path / "m.xlsx")))
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["train", "eval"]
    header = [c.value for c in book["eval"][1]]
    val = [row[header.index("val_loss")] for row in book["eval"].iter_rows(min_row=2, values_only=True)]
    assert val == [r["val_loss"] for r in records if r["event"] == "eval"]
    assert main(["export-metrics", str(run), "--format", "json"]) == 2


def test_events_keep_the_last_record_of_an_iteration_logged_twice(tmp_path):
    # a resumed run logs again the iterations after its last checkpoint
    lines = [
        {"event": "train", "iter": 0, "loss": 3.0},
        {"event": "train", "iter": 1, "loss": 2.9},
        {"event": "train", "iter": 1, "loss": 2.8},
        {"event": "eval", "iter": 0, "val_loss": 3.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["loss"] for r in events(tmp_path, "train")] == [3.0, 2.8]


@pytest.mark.parametrize("vary", ["optimizer", "optimizer=", "=adamw"])
def test_compare_rejects_a_malformed_vary(config, vary, capsys):
    assert main(["compare", str(config), "--vary", vary]) == 2
    assert "--vary expects KEY=V1,V2" in capsys.readouterr().err


def test_compare_from_the_command_line_without_set(config, tmp_path):
    """Repeatable flags left out (no --set here) must arrive as empty lists, not None."""
    out = tmp_path / "cli_runs"
    assert main(["compare", str(config), "--vary", "n_layer=1", "--out", str(out)]) == 0
    assert (out / "n_layer-1" / "metrics.jsonl").is_file()
    assert (out / "compare.csv").is_file()


def test_compare_refuses_variants_that_hold_runs_before_training_any(config, tmp_path, capsys, folder_hashes):
    out = tmp_path / "runs"
    argv = ["compare", str(config), "--out", str(out)]
    assert main([*argv, "--vary", "n_layer=1"]) == 0
    before = folder_hashes(out)
    capsys.readouterr()
    assert main([*argv, "--vary", "n_layer=2,1"]) == 2  # n_layer-2 is new, n_layer-1 holds a run
    assert "n_layer-1 already holds a trained run" in capsys.readouterr().err
    assert folder_hashes(out) == before and not (out / "n_layer-2").exists()
    assert main([*argv, "--vary", "n_layer=1", "--overwrite"]) == 0
