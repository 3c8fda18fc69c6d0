"""Every verb against a table of bad inputs: each is one `error: ...` line on stderr, exit status 2,
no traceback, and nothing created or changed anywhere on disk. A closed stdout is a quiet exit 0.

To cover a new verb, add its rows to BAD_INPUTS (a test fails until every verb has some).
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smallgpt.cli import COMMANDS, Verb, main

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = [
    "--block_size=16",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--batch_size=2",
    "--eval_iters=1",
    "--eval_interval=1",
    "--max_iters=2",
    "--progress=false",
    "--device=cpu",
]
TRAIN = ["train", "--dataset={data}", "--out_dir={new}", *TINY]  # a valid command to spoil
RESUME = ["train", "--dataset={data}", *TINY, "--init_from=resume"]
SAMPLE = ["--max-new-tokens", "3", "--device", "cpu"]
RUN = ["sample", "--run", "{run}", *SAMPLE]  # a valid sample command to spoil
CLASSIFY = ["--init-from", "{run}", "--out-dir", "{new}", "--data"]
CLS_TRAIN, CLS_EVAL = ["classify", "train", *CLASSIFY], ["classify", "eval", "--run", "{cls_run}", "--data"]
PREDICT = ["classify", "predict", "--run", "{cls_run}"]
EVAL = ["eval", "--run", "{run}", "--input"]
COMPARE = ["compare", "--out", "{new}", "{compare_yaml}"]
ABLATE = ["classify", "ablate", "--init-from", "{run}", "--data", "{labels_csv}", "--out-dir"]

# verb -> (case, arguments, a fragment of the error line). {name} is a path of the `world` fixture;
# {new} is where a run or output would go (it must still not exist afterwards).
BAD_INPUTS: dict[str, list[tuple[str, list[str], str]]] = {
    "prepare": [
        ("missing file", ["prepare", "--input", "{missing}", "--out", "{new}"], "does not exist"),
        ("empty file", ["prepare", "--input", "{empty_txt}", "--out", "{new}"], "is empty"),
        ("whitespace only", ["prepare", "--input", "{blank_txt}", "--out", "{new}"], "no text"),
        ("not UTF-8", ["prepare", "--input", "{latin1_txt}", "--out", "{new}"], "not valid UTF-8"),
        ("empty folder", ["prepare", "--input", "{empty_dir}", "--out", "{new}"], "is empty"),
        ("unknown source", ["prepare", "tinyshakespear"], "did you mean tinyshakespeare"),
        ("unknown tokenizer", ["prepare", "--input", "{good_txt}", "--tokenizer", "chr"], "char"),
        ("bad bpe size", ["prepare", "--input", "{good_txt}", "--tokenizer", "bpe:many"], "bpe"),
        ("val fraction", ["prepare", "--input", "{good_txt}", "--val-fraction", "0.9"], "between 0 and 0.5"),
        ("val fraction nan", ["prepare", "--input", "{good_txt}", "--val-fraction", "nan"], "finite"),
        ("not a number", ["prepare", "--input", "{good_txt}", "--val-fraction", "tenth"], "invalid float"),
        ("unknown flag", ["prepare", "--input", "{good_txt}", "--tokeniser", "char"], "unrecognized"),
        ("unknown format", ["prepare", "--input", "{good_txt}", "--format", "xml"], "unknown --format"),
        ("out is a file", ["prepare", "--input", "{good_txt}", "--out", "{good_txt}"], "not a folder"),
        ("out holds data", ["prepare", "{good_txt}", "--out", "{other_data}"], "holds prepared data"),
        ("chat out holds data", ["prepare", "{chat_jsonl}", "--out", "{other_data}"], "--overwrite"),
        ("out holds files", ["prepare", "--input", "{good_txt}", "--out", "{run}"], "already holds files"),
        ("chat not JSON", ["prepare", "--input", "{broken_jsonl}", "--out", "{new}"], "broken.jsonl"),
        ("chat empty", ["prepare", "--input", "{empty_jsonl}", "--out", "{new}"], "empty"),
        ("chat block size", ["prepare", "--input", "{chat_jsonl}", "--block-size", "0"], "block"),
        ("record without text", ["prepare", "--input", "{no_text_jsonl}", "--out", "{new}"], "text"),
        ("blank records", ["prepare", "--input", "{blank_jsonl}", "--out", "{new}"], "no text"),
        ("truncated gzip", ["prepare", "--input", "{cut_txt_gz}", "--out", "{new}"], "cut_txt.gz"),
        ("tokenizer-from nothing", ["prepare", "{good_txt}", "--tokenizer-from", "{missing}"], "exist"),
    ],
    "train": [
        ("missing config", ["train", "{missing}"], "does not exist"),
        ("config typo", ["train", "{typo_yaml}"], "did you mean 'n_layer'"),
        ("config not YAML", ["train", "{broken_yaml}"], "not valid YAML"),
        ("config not UTF-8", ["train", "{latin1_yaml}"], "not valid UTF-8"),
        ("config a list", ["train", "{list_yaml}"], "mapping"),
        ("config bad type", ["train", "{type_yaml}"], "must be int"),
        ("config raises", ["train", "{raising_py}"], "failed to run"),
        ("config whitespace", ["train", "{blank_yaml}"], "dataset is not set"),
        ("unknown key", [*TRAIN, "--n_layr=2"], "did you mean 'n_layer'"),
        ("not a number", [*TRAIN, "--batch_size=many"], "must be int"),
        ("nan", [*TRAIN, "--learning_rate=nan"], "finite"),
        ("inf", [*TRAIN, "--max_seconds=inf"], "finite"),
        ("zero", [*TRAIN, "--batch_size=0"], "must be positive"),
        ("optimizer typo", [*TRAIN, "--optimizer=adamm"], "did you mean 'adamw'"),
        ("unknown optimizer", [*TRAIN, "--optimizer=lion"], "unknown optimizer 'lion'"),
        ("nan policy", [*TRAIN, "--nan_policy=ignore"], "nan_policy must be stop or skip"),
        ("stray word", [*TRAIN, "fast"], "expected --key=value"),
        ("no dataset", ["train", "--dataset={missing}", *TINY], "not found"),
        ("corrupt dataset", ["train", "--dataset={bad_meta_data}", *TINY], "unreadable"),
        ("dataset not UTF-8", ["train", "--dataset={latin1_meta_data}", *TINY], "unreadable"),
        ("bad init_from", [*TRAIN, "--init_from=gpt5"], "init_from must be"),
        ("resume, no checkpoint", [*RESUME, "--out_dir={empty_run}"], "no ckpt"),
        ("resume, corrupt state", [*RESUME, "--out_dir={bad_state_run}"], "corrupted"),
        ("resume, NaN weights", [*RESUME, "--out_dir={nan_run}"], "NaN or inf"),
        ("resume, other tokenizer", [*RESUME, "--out_dir={run}", "--dataset={other_data}"], "tokenizer"),
        ("out_dir is a file", [*TRAIN[:2], "--out_dir={good_txt}", *TINY], "is not a folder"),
        ("out_dir holds a run", [*TRAIN[:2], "--out_dir={run}", *TINY], "already holds a trained run"),
        ("other shape into a run", [*TRAIN[:2], "--out_dir={run}", *TINY, "--n_layer=2"], "--overwrite"),
        ("resume and overwrite", [*RESUME, "--out_dir={run}", "--overwrite"], "pick one"),
        ("unknown device", [*TRAIN, "--device=tpu"], "unknown device"),
        ("nproc", [*TRAIN, "--nproc=0"], "positive number of processes"),
        ("flag typo", [*TRAIN, "--compil"], "did you mean 'compile'"),
        ("flag without value", [*TRAIN, "--max_iters"], "needs a value"),
    ],
    "sample": [
        ("missing run", ["sample", "--run", "{missing}", *SAMPLE], "does not exist"),
        ("no checkpoint", ["sample", "--run", "{empty_run}", *SAMPLE], "no checkpoint"),
        ("truncated checkpoint", ["sample", "--run", "{truncated_run}", *SAMPLE], "corrupted"),
        ("garbage checkpoint", ["sample", "--run", "{garbage_run}", *SAMPLE], "corrupted"),
        ("NaN checkpoint", ["sample", "--run", "{nan_run}", *SAMPLE], "NaN or inf"),
        ("other tokenizer", ["sample", "--run", "{mismatch_run}", *SAMPLE], "not the tokenizer"),
        ("broken tokenizer", ["sample", "--run", "{bad_tokenizer_run}", *SAMPLE], "tokenizer.json"),
        ("negative temperature", [*RUN, "--temperature", "-1"], "negative"),
        ("nan temperature", [*RUN, "--temperature", "nan"], "finite"),
        ("top-p", [*RUN, "--top-p", "2"], "(0, 1]"),
        ("top-k", [*RUN, "--top-k", "0"], "must be positive"),
        ("no samples", [*RUN, "--num-samples", "0"], "num-samples"),
        ("not a number", ["sample", "--run", "{run}", "--max-new-tokens", "lots"], "invalid int"),
        ("checkpoint name", [*RUN, "--checkpoint", "middle"], "best or last"),
        ("start file missing", [*RUN, "--start", "FILE:{missing}"], "does not exist"),
        ("start not UTF-8", [*RUN, "--start", "FILE:{latin1_txt}"], "UTF-8"),
        ("unknown flag", ["sample", "--run", "{run}", "--tempreature", "1"], "did you mean --temperature?"),
        ("run is a file", ["sample", "--run", "{good_txt}", *SAMPLE], "not a run folder"),
        ("no source", ["sample", *SAMPLE], "pass either --run"),
        ("init-from folder", ["sample", "--init-from", "{empty_dir}", *SAMPLE], "empty"),
        ("unknown device", ["sample", "--run", "{run}", "--device", "tpu"], "unknown device"),
    ],
    "continue": [
        ("missing run", ["continue", "--run", "{missing}"], "does not exist"),
        ("NaN checkpoint", ["continue", "--run", "{nan_run}"], "NaN or inf"),
        ("bad temperature", ["continue", "--run", "{run}", "--temperature", "-2"], "negative"),
    ],
    "chat": [
        ("missing run", ["chat", "--run", "{missing}", "--message", "hi"], "does not exist"),
        ("truncated checkpoint", ["chat", "--run", "{truncated_run}", "--message", "hi"], "corrupted"),
        ("not a chat model", ["chat", "--run", "{run}", "--message", "hi"], "chat"),
        ("no run", ["chat", "--message", "hi"], "--run"),
    ],
    "classify train": [
        ("missing data", [*CLS_TRAIN, "{missing}"], "does not exist"),
        ("empty data", [*CLS_TRAIN, "{empty_csv}"], "empty.csv"),
        ("whitespace data", [*CLS_TRAIN, "{blank_csv}"], "blank.csv"),
        ("data not UTF-8", [*CLS_TRAIN, "{latin1_csv}"], "UTF-8"),
        ("no label column", [*CLS_TRAIN, "{no_label_csv}"], "label"),
        ("one label", [*CLS_TRAIN, "{one_label_csv}"], "single label"),
        ("backbone missing", [*CLS_TRAIN, "{labels_csv}", "--init-from", "{missing}"], "does not exist"),
        ("backbone NaN", [*CLS_TRAIN, "{labels_csv}", "--init-from", "{nan_run}"], "NaN or inf"),
        ("bad pooling", [*CLS_TRAIN, "{labels_csv}", "--pooling", "max"], "pooling"),
        ("zero batch", [*CLS_TRAIN, "{labels_csv}", "--batch-size", "0"], "batch"),
        ("nan lr", [*CLS_TRAIN, "{labels_csv}", "--learning-rate", "nan"], "finite"),
        ("out-dir is a file", [*CLS_TRAIN, "{labels_csv}", "--out-dir", "{good_txt}"], "is not a folder"),
        ("out-dir holds a run", [*CLS_TRAIN, "{labels_csv}", "--out-dir", "{cls_run}"], "a classify run"),
    ],
    "classify eval": [
        ("missing run", ["classify", "eval", "--run", "{missing}"], "does not exist"),
        ("not a classifier", [*CLS_EVAL, "{labels_csv}", "--run", "{run}"], "not a classifier"),
        ("data not UTF-8", [*CLS_EVAL, "{latin1_csv}"], "UTF-8"),
        ("data missing", [*CLS_EVAL, "{missing}"], "does not exist"),
        ("unknown label", [*CLS_EVAL, "{other_labels_csv}"], "label"),
    ],
    "classify predict": [
        ("missing run", ["classify", "predict", "--run", "{missing}", "good"], "does not exist"),
        ("file missing", [*PREDICT, "--file", "{missing}"], "does not exist"),
        ("file not UTF-8", [*PREDICT, "--file", "{latin1_txt}"], "UTF-8"),
        ("file whitespace", [*PREDICT, "--file", "{blank_txt}"], "no text"),
        ("empty text", [*PREDICT, " "], "empty"),
    ],
    "classify ablate": [
        ("missing data", ["classify", "ablate", *CLASSIFY, "{missing}"], "does not exist"),
        ("bad pooling", ["classify", "ablate", *CLASSIFY, "{labels_csv}", "--pooling", "max"], "pooling"),
        ("out-dir holds a run", [*ABLATE, "{cls_run}"], "already holds a classify run: pass --overwrite"),
    ],
    "export": [
        ("missing run", ["export", "--run", "{missing}", "--out", "{new}"], "does not exist"),
        ("NaN checkpoint", ["export", "--run", "{nan_run}", "--out", "{new}"], "NaN or inf"),
        ("garbage checkpoint", ["export", "--run", "{garbage_run}", "--out", "{new}"], "corrupted"),
        ("unknown format", ["export", "--run", "{run}", "--out", "{new}", "--format", "onnx"], "hf"),
        ("out is a file", ["export", "--run", "{run}", "--out", "{good_txt}"], "not a folder"),
        ("no out", ["export", "--run", "{run}"], "--out"),
    ],
    "serve": [
        ("no run", ["serve", "--device", "cpu"], "at least one --run"),
        ("missing run", ["serve", "--run", "{missing}"], "does not exist"),
        ("no checkpoint", ["serve", "--run", "{empty_run}"], "no checkpoint"),
        ("garbage checkpoint", ["serve", "--run", "{garbage_run}"], "corrupted"),
        ("other tokenizer", ["serve", "--run", "{mismatch_run}"], "not the tokenizer"),
        ("two runs, one name", ["serve", "--run", "{run}", "--run", "{run}"], "two models would be named"),
        ("port", ["serve", "--run", "{run}", "--port", "70000"], "port must be"),
        ("max batch", ["serve", "--run", "{run}", "--max-batch", "0"], "max-batch"),
        ("which checkpoint", ["serve", "--run", "{run}", "--checkpoint", "worst"], "best or last"),
        ("device", ["serve", "--run", "{run}", "--device", "tpu"], "unknown device"),
    ],
    "eval": [
        ("missing run", ["eval", "--run", "{missing}", "--input", "{good_txt}"], "does not exist"),
        ("NaN checkpoint", ["eval", "--run", "{nan_run}", "--input", "{good_txt}"], "NaN or inf"),
        ("missing input", [*EVAL, "{missing}"], "does not exist"),
        ("input not UTF-8", [*EVAL, "{latin1_txt}"], "UTF-8"),
        ("input whitespace", [*EVAL, "{blank_txt}"], "no text"),
        ("stride", [*EVAL, "{good_txt}", "--stride", "0"], "stride"),
        ("json is a folder", [*EVAL, "{good_txt}", "--json", "{empty_dir}"], "is a folder"),
        ("json below a file", [*EVAL, "{good_txt}", "--json", "{good_txt}/out.json"], "is a file"),
        ("nothing to score", ["eval", "--input", "{good_txt}"], "--run"),
    ],
    "plot": [
        ("missing run", ["plot", "{missing}", "--out", "{new}"], "does not exist"),
        ("no metrics", ["plot", "{empty_run}", "--out", "{new}"], "metrics.jsonl"),
        ("metrics not JSON", ["plot", "{bad_metrics_run}", "--out", "{new}"], "not valid JSON"),
        ("metrics not UTF-8", ["plot", "{latin1_metrics_run}", "--out", "{new}"], "metrics.jsonl"),
        ("bad axis", ["plot", "{run}", "--out", "{new}", "--x", "time"], "--x must be"),
    ],
    "export-metrics": [
        ("missing run", ["export-metrics", "{missing}", "--out", "{new}"], "does not exist"),
        ("metrics not JSON", ["export-metrics", "{bad_metrics_run}", "--out", "{new}"], "not valid JSON"),
        ("unknown format", ["export-metrics", "{run}", "--out", "{new}", "--format", "pdf"], "csv or xlsx"),
    ],
    "compare": [
        ("no config", ["compare", "--vary", "n_layer=1,2", "--out", "{new}"], "needs a config file"),
        ("missing config", ["compare", "{missing}", "--vary", "n_layer=1,2"], "does not exist"),
        ("vary syntax", [*COMPARE, "--vary", "n_layer"], "KEY=V1,V2"),
        ("vary unknown key", [*COMPARE, "--vary", "n_layr=1,2"], "did you mean"),
        ("vary bad value", [*COMPARE, "--vary", "n_layer=1,two"], "must be int"),
        ("set unknown key", [*COMPARE, "--vary", "n_layer=1,2", "--set", "max_iter=2"], "did you mean"),
        ("seeds", [*COMPARE, "--vary", "n_layer=1,2", "--seeds", "0"], "--seeds"),
        ("config not UTF-8", ["compare", "{latin1_yaml}", "--vary", "n_layer=1,2"], "UTF-8"),
        ("variant holds a run", [*COMPARE[:2], "{compared}", COMPARE[3], "--vary", "n_layer=2,1"], "holds a"),
    ],
}  # fmt: skip


def verbs() -> list[str]:
    """Every verb of the CLI: `train`, `sample`, ..., `classify train`, ..."""
    names = []
    for name, verb in COMMANDS.items():
        names += [name] if isinstance(verb, Verb) else [f"{name} {sub}" for sub in verb]
    return names


def test_every_verb_has_bad_inputs():
    assert sorted(BAD_INPUTS) == sorted(verbs())


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every path under `roots` with its mtime and content hash (folders: mtime only)."""
    seen = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
            seen[str(path)] = (stat.st_mtime_ns, digest)
    return seen


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def break_weights(run: Path, damage) -> None:
    for name in ("best", "last"):
        weights = run / "ckpt" / name / "model.safetensors"
        if weights.is_file():
            damage(weights)


def nan_weights(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        tags = f.metadata()
    weights = load_file(path)
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, path, tags)


@pytest.fixture(scope="module")
def world(tmp_path_factory, char_data) -> dict[str, Path]:
    """One folder of good and bad inputs, made once; the cases only read it."""
    root = tmp_path_factory.mktemp("world")
    w: dict[str, Path] = {"data": char_data, "missing": root / "missing.txt", "new": root / "new"}

    def text(name: str, content: str | bytes) -> None:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        w[name.replace(".", "_")] = path

    text("good.txt", "To be, or not to be, that is the question.\n" * 20)
    text("empty.txt", "")
    text("blank.txt", "  \n\t\n   \n")
    text("latin1.txt", b"caf\xe9 au lait\n")
    text("broken.jsonl", '{"messages": [\n')
    text("empty.jsonl", "")
    text(
        "chat.jsonl",
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        )
        + "\n",
    )
    text("no_text.jsonl", '{"body": "a document"}\n')
    text("blank.jsonl", '{"text": "  "}\n{"text": "\\n"}\n')
    text("cut_txt.gz", gzip.compress(b"a document, cut short\n" * 50)[:-20])
    text("typo.yaml", "n_layr: 2\n")
    text("broken.yaml", "n_layer: [1,\n")
    text("latin1.yaml", b"dataset: caf\xe9\n")
    text("list.yaml", "- 1\n- 2\n")
    text("type.yaml", "batch_size: many\n")
    text("raising.py", "raise ValueError('no')\n")
    text("blank.yaml", "   \n")
    rows = [("good day", "pos"), ("bad day", "neg"), ("so good", "pos"), ("so bad", "neg")] * 6
    text("labels.csv", "text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    text("other_labels.csv", "text,label\ngood day,meh\n")
    text("empty.csv", "")
    text("blank.csv", " \n \n")
    text("latin1.csv", b"text,label\ncaf\xe9,pos\nth\xe9,neg\n")
    text("no_label.csv", "text\ngood day\n")
    text("one_label.csv", "text,label\ngood,pos\nfine,pos\n")
    (root / "empty_dir").mkdir()
    w["empty_dir"] = root / "empty_dir"

    assert main(["prepare", "--input", str(w["good_txt"]), "--out", str(root / "other_data")]) == 0
    w["other_data"] = root / "other_data"
    for name, meta in (("bad_meta_data", b"{not json"), ("latin1_meta_data", b"\xff\xfe")):
        shutil.copytree(char_data, root / name)
        (root / name / "meta.json").write_bytes(meta)
        w[name] = root / name

    run = w["run"] = root / "run"
    assert main(["train", f"--dataset={char_data}", f"--out_dir={run}", *TINY]) == 0
    cls_args = [
        "--data",
        str(w["labels_csv"]),
        "--init-from",
        str(run),
        "--max-iters",
        "2",
        "--device",
        "cpu",
    ]
    assert main(["classify", "train", *cls_args, "--out-dir", str(root / "cls_run"), "--no-progress"]) == 0
    w["cls_run"] = root / "cls_run"
    (root / "empty_run").mkdir()
    w["empty_run"] = root / "empty_run"
    broken = {
        "truncated_run": lambda p: p.write_bytes(p.read_bytes()[:100]),
        "garbage_run": lambda p: p.write_bytes(b"\x00garbage" * 100),
        "nan_run": nan_weights,
    }
    for name, damage in broken.items():
        break_weights(copy_run(run, root / name), damage)
        w[name] = root / name
    w["mismatch_run"] = copy_run(run, root / "mismatch_run")
    shutil.copy(w["other_data"] / "tokenizer.json", w["mismatch_run"] / "tokenizer.json")
    w["bad_tokenizer_run"] = copy_run(run, root / "bad_tokenizer_run")
    (w["bad_tokenizer_run"] / "tokenizer.json").write_text("{")
    w["bad_state_run"] = copy_run(run, root / "bad_state_run")
    (w["bad_state_run"] / "ckpt" / "last" / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    for name, metrics in (("bad_metrics_run", b"NaN\n{"), ("latin1_metrics_run", b"\xff\n")):
        (copy_run(run, root / name) / "metrics.jsonl").write_bytes(metrics)
        w[name] = root / name
    text("compare.yaml", f"dataset: {char_data}\n" + "".join(f"{a[2:].replace('=', ': ')}\n" for a in TINY))
    w["compared"] = root / "compared"  # a compare whose variant n_layer-1 was trained
    copy_run(run, w["compared"] / "n_layer-1")
    return w


CASES = [(verb, *case) for verb, cases in BAD_INPUTS.items() for case in cases]


@pytest.mark.parametrize("verb, case, args, fragment", CASES, ids=[f"{v}: {c}" for v, c, *_ in CASES])
def test_bad_input_is_one_line_and_writes_nothing(
    world, tmp_path, monkeypatch, capsys, verb, case, args, fragment
):
    monkeypatch.chdir(tmp_path)  # default outputs (data/..., runs/...) would land here
    argv = [a.format(**{k: str(v) for k, v in world.items()}) for a in args]
    roots = (world["run"].parent, world["data"], tmp_path)
    before = snapshot(*roots)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert snapshot(*roots) == before


def smallgpt(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "smallgpt", *args], env=env, text=True, **popen)


CLOSED_STDOUT = [
    ["sample", "--run", "{run}", "--num-samples", "50", "--max-new-tokens", "200", "--device", "cpu"],
    [*PREDICT, "--file", "{labels_csv}", "--device", "cpu"],
]


@pytest.mark.parametrize("args", CLOSED_STDOUT, ids=lambda a: " ".join(a[:2]))
def test_a_reader_that_goes_away_is_a_quiet_exit_0(world, args):
    before = snapshot(world["run"].parent)
    argv = [a.format(**{k: str(v) for k, v in world.items()}) for a in args]
    proc = smallgpt(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # `smallgpt ... | head -1`
    assert proc.stdout is not None and proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")
    assert snapshot(world["run"].parent) == before


def test_a_closed_stdout_is_a_quiet_exit_0(world):
    argv = ["sample", "--run", str(world["run"]), "--num-samples", "1", "--max-new-tokens", "5"]
    proc = smallgpt(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    out, err = proc.communicate(timeout=60)  # `smallgpt sample ... >&-`
    assert (proc.returncode, out, err) == (0, "", "")
