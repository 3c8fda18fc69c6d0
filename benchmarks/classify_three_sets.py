"""The classifier recipe, fixed in advance, against a tuned TF-IDF on three Chinese review sets.

The question (issue 33): does the recipe chosen on sentiment_zh's val split beat a tuned
bag-of-n-grams on review sets it never saw? One command, one table:

1. Splits, each fixed and seeded: sentiment_zh keeps classify_sentiment.py's balanced split;
   reviews_zh/waimai_10k.csv (1/3 positive) and reviews_zh/online_shopping_9_cats.csv (label
   column; the 9 categories pooled) get a stratified val/test split in their natural class
   proportions. Texts are compared normalised (NFKC, no whitespace, lower case): each set keeps a
   text once and drops texts given both labels, a new set's val/test texts are drawn only from
   texts no other set holds (about 6,900 online-shopping reviews are also in sentiment_zh), and no
   set's train split, nor the pre-training corpus, holds any set's val/test text.
2. One backbone for all three sets: a char GPT pre-trained (<= --pretrain-seconds, 1750 s on two
   threads) on the shared Chinese prose (THUCNews, 西游记, 鲁迅, Common Voice Wikipedia and chat
   sentences) and every review of the three sets outside any val/test split, without labels,
   weighted --review-repeats (3) times. Prints the tokens it saw and its val loss.
3. Per set: TF-IDF + logistic regression tuned on that set's val split (classify_sentiment.py's grid
   of 30 settings); the recipe fine-tuned once per seed (--seeds), each run also averaged with the
   next seed's run (the last with the first: three seeds give three pairs); McNemar per seed
   against the tuned TF-IDF; and, on the set whose test split holds the most texts longer than the
   block, the recipe with its first window only (--max-windows 1), on all test texts and on the
   long ones.

The recipe (classify_sentiment.py's defaults, chosen on sentiment_zh's val split): mean pooling, peak
lr 1e-3, 2 epochs, --lm-loss-weight 0.5, length-grouped batches, padding not masked (the no-mask
runs the ensemble rows used), and long texts read in up to --max-windows 8 windows of the block.

Runs and results are kept in --work; a second call reuses the backbone, the baselines and every
finished run, so a stopped benchmark resumes (a folder holds one setting: others are refused).
--smoke runs every step end to end on a tiny backbone and a few hundred texts per set: its figures
are no results.

    python benchmarks/classify_three_sets.py --work /tmp/cls3         # hours on two cores
    python benchmarks/classify_three_sets.py --work /tmp/cls3s --smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
import unicodedata
from pathlib import Path
from typing import Any

from classify_sentiment import (
    SHARED,
    best_val_accuracy,
    cached_baselines,
    ensemble_scores,
    labelled_splits,
    mcnemar,
    mean_std,
    pretrain,
    pretraining_arguments,
    read_lines,
    write_csv,
)

Rows = list[tuple[str, str]]  # (label, text)
SETS = ("sentiment_zh", "waimai_10k", "online_shopping")
SMOKE = dict(
    n_layer=2, n_head=2, n_embd=64, block_size=64, pretrain_seconds=40, pretrain_iters=60,
    train_size=300, val_size=100, test_size=200, seeds="1337,1338", corpus_chars=1_000_000,
    max_iters=16, dtype="float32",
)  # fmt: skip


def normalise(text: str) -> str:
    """The form texts are compared in: NFKC (full-width to half-width), no whitespace, lower case."""
    return "".join(unicodedata.normalize("NFKC", text).split()).lower()


def read_labelled_csv(path: Path) -> Rows:
    """(label, review) rows of a reviews_zh CSV, each normalised text once; texts given both labels
    are dropped."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = [(r["label"].strip(), r["review"].strip()) for r in csv.DictReader(f) if r["review"].strip()]
    labels: dict[str, set[str]] = {}
    for label, text in rows:
        labels.setdefault(normalise(text), set()).add(label)
    kept, seen = [], set()
    for label, text in rows:
        key = normalise(text)
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            kept.append((label, text))
    return kept


def stratified_sample(rows: Rows, size: int, rng: random.Random) -> tuple[Rows, Rows]:
    """`size` rows in the classes' proportions, and the rest (both in a seeded order)."""
    by_class: dict[str, Rows] = {}
    for row in rows:
        by_class.setdefault(row[0], []).append(row)
    taken: Rows = []
    rest: Rows = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        share = round(size * len(members) / len(rows))
        taken += members[:share]
        rest += members[share:]
    rng.shuffle(taken)
    rng.shuffle(rest)
    return taken, rest


def all_splits(data: Path, args: argparse.Namespace) -> tuple[dict[str, dict[str, Rows]], list[str]]:
    """Per set its train/val/test rows, and every review of the three sets outside any val/test split
    (the pre-training corpus's reviews), with the leaks of step 1 of the docstring ruled out."""
    sizes = {"train": args.train_size, "val": args.val_size, "test": args.test_size}
    sentiment = labelled_splits(data, sizes, args.seed)  # the old set keeps its split
    sentiment_all = read_lines(data / "sentiment_zh" / "pos.txt") + read_lines(
        data / "sentiment_zh" / "neg.txt"
    )
    new = {
        "waimai_10k": read_labelled_csv(data / "reviews_zh" / "waimai_10k.csv"),
        "online_shopping": read_labelled_csv(data / "reviews_zh" / "online_shopping_9_cats.csv"),
    }
    owners: dict[str, set[str]] = {}  # normalised text -> the sets that hold it
    for name, texts in [("sentiment_zh", sentiment_all)] + [(n, [t for _, t in r]) for n, r in new.items()]:
        for text in texts:
            owners.setdefault(normalise(text), set()).add(name)
    splits = {"sentiment_zh": sentiment}
    rng = random.Random(args.seed)
    for name, rows in new.items():
        own = [row for row in rows if owners[normalise(row[1])] == {name}]
        val, rest = stratified_sample(own, args.val_size, rng)
        test, _ = stratified_sample(rest, args.test_size, rng)
        splits[name] = {"val": val, "test": test}
    held_out = {normalise(t) for s in splits.values() for split in ("val", "test") for _, t in s[split]}
    for name, rows in new.items():
        pool = [row for row in rows if normalise(row[1]) not in held_out]
        train = stratified_sample(pool, args.train_size, rng)[0] if len(pool) > args.train_size else pool
        splits[name]["train"] = train
    leaks = [t for t, _ in splits["sentiment_zh"]["train"] if normalise(t) in held_out]
    if leaks:  # the old split is fixed: a new set's val/test never holds one of its texts
        raise SystemExit(f"{len(leaks)} sentiment_zh training texts are another set's val/test texts")
    texts = sentiment_all + [t for rows in new.values() for _, t in rows]
    unlabelled = list({normalise(t): t for t in texts if normalise(t) not in held_out}.values())
    return splits, unlabelled


def write_corpus(data: Path, out: Path, reviews: list[str], args: argparse.Namespace) -> None:
    """One .txt of <|endoftext|>-separated documents: prose in chunks of about 2,000 characters, and
    the reviews in groups of 20, each group repeated (reshuffled) --review-repeats times inside its own
    document (the prepare step splits train/val by document, so no review is on both sides).
    --corpus-chars keeps a seeded sample of the documents (smoke)."""
    rng = random.Random(0)

    def chunks(text: str, size: int = 2000) -> list[str]:
        return [text[i : i + size] for i in range(0, len(text), size)]

    news = [line.split("\t", 1)[1] for line in read_lines(data / "chinese_news" / "cnews.sample1000.txt")]
    prose = [
        data / "chinese_novel" / "xiyouji.txt",
        data / "luxun" / "luxun_stories_essays.txt",
    ]
    sentences = [
        data / "chinese_wiki" / name
        for name in (
            "wiki_sentences_zh_cn.txt",
            "sentence_collector_zh_cn.txt",
            "cn_chat_sentences_zh_cn.txt",
        )
    ]
    documents = news + [c for path in prose for c in chunks(path.read_text(encoding="utf-8-sig"))]
    documents += [c for path in sentences for c in chunks("\n".join(read_lines(path)))]
    reviews = list(reviews)
    rng.shuffle(reviews)
    for i in range(0, len(reviews), 20):
        group = reviews[i : i + 20]
        documents.append(
            "\n".join(line for _ in range(args.review_repeats) for line in rng.sample(group, len(group)))
        )
    if args.corpus_chars:
        rng.shuffle(documents)
        kept, total = [], 0
        for document in documents:
            if total >= args.corpus_chars:
                break
            kept.append(document)
            total += len(document)
        documents = kept
    out.write_text("\n<|endoftext|>\n".join(documents), encoding="utf-8")
    print(f"pre-training corpus: {len(documents):,} documents, {out.stat().st_size / 1e6:.1f} MB")


def backbone(data: Path, work: Path, reviews: list[str], args: argparse.Namespace) -> tuple[Path, dict]:
    """The pre-trained run (read back when its checkpoint exists) and its tokens seen and val loss."""
    from smallgpt.train.logging import read_metrics

    run = work / "pretrained"
    if (run / "ckpt").is_dir():
        print(f"reusing the pre-trained run {run}")
    else:
        write_corpus(data, work / "corpus.txt", reviews, args)
        run, _ = pretrain(work / "corpus.txt", work, args)
    evals = [r for r in read_metrics(run) if r.get("event") == "eval"]
    stats = {
        "tokens": evals[-1]["tokens"],
        "val_loss": min(r["val_loss"] for r in evals),
        "train_loss": evals[-1].get("train_loss", float("nan")),
    }
    return run, stats


def write_splits(folder: Path, splits: dict[str, Rows]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_csv(folder / f"{split}.csv", rows)


def fine_tune(args: argparse.Namespace, folder: Path, pretrained: Path, seed: int, max_windows: int) -> Path:
    """One fine-tuning run of the recipe into folder/runs/..., read back when its eval.json exists."""
    from smallgpt.classify.train import ClassifyTrainArgs, train_classifier

    out = folder / f"runs_w{max_windows}" / f"seed{seed}"
    if not (out / "eval.json").is_file():
        train_classifier(
            ClassifyTrainArgs(
                data=str(folder / "train.csv"), val_data=str(folder / "val.csv"),
                test_data=str(folder / "test.csv"), init_from=str(pretrained), text_column="review",
                out_dir=str(out), seed=seed, mask_padding=False, max_windows=max_windows,
                epochs=args.epochs, max_iters=args.max_iters, group_by_length=True, progress=False,
                device="cpu", dtype=args.dtype, overwrite=True,  # what a stopped run left
            )
        )  # fmt: skip
    return out


def long_test_texts(pretrained: Path, test: Rows) -> list[int]:
    """Indices of the test texts longer than the backbone's block, in its tokens."""
    import torch

    from smallgpt.runs import load_run

    model, tokenizer = load_run(pretrained, torch.device("cpu"))
    block = model.config.block_size
    return [
        i for i, (_, t) in enumerate(test) if len(tokenizer.encode_to_array(t, unknown="replace")) > block
    ]


def accuracy_on(truth: list[str], predicted: list[str], indices: list[int]) -> float:
    return sum(truth[i] == predicted[i] for i in indices) / max(1, len(indices))


def evaluate_set(
    args: argparse.Namespace,
    name: str,
    folder: Path,
    splits: dict[str, Rows],
    pretrained: Path,
    seeds: list[int],
) -> dict[str, Any]:
    """The set's row: tuned TF-IDF, single fine-tunes, McNemar, and the two-model averages of each
    seed's run with the next seed's (cyclically: n seeds give n pairs from n fine-tunes)."""
    tfidf = cached_baselines(folder / "baselines.json", splits)[-1]
    truth = [label for label, _ in splits["test"]]
    runs = [fine_tune(args, folder, pretrained, seed, args.max_windows) for seed in seeds]
    single, val, p_values, predictions = [], [], [], []
    for run in runs:
        metrics, predicted = ensemble_scores([run], splits["test"])
        single.append(metrics["accuracy"])
        val.append(best_val_accuracy(run))
        p_values.append(mcnemar(truth, predicted, tfidf["predicted"])[2])
        predictions.append(predicted)
    pairs = zip(runs, runs[1:] + runs[:1])
    pair = [ensemble_scores(list(two), splits["test"])[0]["accuracy"] for two in pairs]
    counts = {split: len(rows) for split, rows in splits.items()}
    return {
        "set": name, "counts": counts, "tfidf": tfidf, "single": single, "pair": pair, "val": val,
        "p_values": p_values, "predictions": predictions, "truth": truth,
        "long": long_test_texts(pretrained, splits["test"]),
    }  # fmt: skip


def long_text_effect(
    args: argparse.Namespace, row: dict, folder: Path, test: Rows, pretrained: Path, seeds: list[int]
) -> dict[str, Any]:
    """The recipe with its first window only, on the same set and seeds: all test texts, long ones."""
    first, first_long, windowed_long = [], [], []
    for seed, predicted in zip(seeds, row["predictions"]):
        metrics, first_predicted = ensemble_scores([fine_tune(args, folder, pretrained, seed, 1)], test)
        first.append(metrics["accuracy"])
        first_long.append(accuracy_on(row["truth"], first_predicted, row["long"]))
        windowed_long.append(accuracy_on(row["truth"], predicted, row["long"]))
    tfidf_long = accuracy_on(row["truth"], row["tfidf"]["predicted"], row["long"])
    return {
        "first": first,
        "first_long": first_long,
        "windowed_long": windowed_long,
        "tfidf_long": tfidf_long,
    }


def standard_error(accuracy: float, n: int) -> float:
    return (accuracy * (1 - accuracy) / n) ** 0.5


def report(rows: list[dict], effect: dict, long_row: dict, stats: dict, args: argparse.Namespace) -> None:
    print(
        f"\nbackbone: {args.n_layer} x {args.n_embd}, block {args.block_size}; "
        f"{stats['tokens']:,} tokens seen, best val loss {stats['val_loss']:.3f}"
    )
    print(
        "\n| set | train / val / test | long test texts | tuned TF-IDF | GPT, one fine-tune (val) "
        "| margin | GPT, two averaged | margin | McNemar p (one fine-tune, per seed) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        n = r["counts"]["test"]
        tfidf = r["tfidf"]["accuracy"]
        error = 100 * standard_error(tfidf, n)
        single, pair = statistics.fmean(r["single"]), statistics.fmean(r["pair"])
        counts = " / ".join(f"{r['counts'][s]:,}" for s in ("train", "val", "test"))
        print(
            f"| {r['set']} | {counts} | {len(r['long'])} | {100 * tfidf:.2f}% ± {error:.2f} "
            f"| {mean_std(r['single'])} ({100 * statistics.fmean(r['val']):.2f}%) "
            f"| {100 * (single - tfidf):+.2f} | {mean_std(r['pair'])} | {100 * (pair - tfidf):+.2f} "
            f"| {', '.join(f'{p:.3g}' for p in r['p_values'])} |"
        )
    print(
        "\n(± after TF-IDF: the standard error of a test accuracy, sqrt(p(1 - p) / n); "
        "after GPT: the std over seeds)"
    )
    print("TF-IDF settings: " + "; ".join(f"{r['set']}: {r['tfidf']['setting']}" for r in rows))
    print(
        f"\nlong texts, {long_row['set']} ({len(long_row['long'])} of {long_row['counts']['test']} "
        f"test texts longer than {args.block_size} tokens):"
    )
    print("| reading | test accuracy | on the long texts |")
    print("|---|---:|---:|")
    print(
        f"| up to {args.max_windows} windows | {mean_std(long_row['single'])} "
        f"| {mean_std(effect['windowed_long'])} |"
    )
    print(f"| first window only | {mean_std(effect['first'])} | {mean_std(effect['first_long'])} |")
    print(
        f"| tuned TF-IDF | {100 * long_row['tfidf']['accuracy']:.2f}% | {100 * effect['tfidf_long']:.2f}% |"
    )


def check_settings(args: argparse.Namespace) -> None:
    """A --work folder holds one setting's runs (another seed list adds runs): reusing them under
    other settings would mix two recipes in one table."""
    from smallgpt.io import atomic_write_json

    settings = {k: str(v) for k, v in sorted(vars(args).items()) if k not in ("seeds", "work")}
    path = args.work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise SystemExit(
                f"{args.work} holds runs made with other {', '.join(changed)}: use another --work"
            )
    args.work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="folder of shared corpora")
    parser.add_argument("--work", type=Path, required=True, help="keep the runs here (a rerun resumes)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny backbone, few steps, few texts: no results"
    )
    pretraining_arguments(parser)
    parser.add_argument("--corpus-chars", type=int, default=0, help="cap the pre-training corpus (0: all)")
    parser.add_argument("--train-size", type=int, default=12000, help="at most, per set")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max-iters", type=int, default=0, help="fine-tuning steps (0: from --epochs)")
    parser.add_argument("--max-windows", type=int, default=8, help="windows a long text is read in")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the labelled splits")
    parser.add_argument("--seeds", default="1337,1338,1339", help="fine-tuning seeds, comma-separated")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if args.max_windows < 2:
        parser.error(f"--max-windows must be at least 2 (1 is the comparison row), got {args.max_windows}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(set(seeds)) < 2:
        parser.error(f"--seeds needs at least two seeds (the two-model averages pair them), got {args.seeds}")
    start = time.perf_counter()
    check_settings(args)
    splits, reviews = all_splits(args.data, args)
    pretrained, stats = backbone(args.data, args.work, reviews, args)
    rows = []
    for name in SETS:
        folder = args.work / name
        write_splits(folder, splits[name])
        print(f"\n=== {name} ===")
        rows.append(evaluate_set(args, name, folder, splits[name], pretrained, seeds))
    long_row = max(rows, key=lambda r: len(r["long"]) / r["counts"]["test"])
    folder = args.work / long_row["set"]
    effect = long_text_effect(args, long_row, folder, splits[long_row["set"]]["test"], pretrained, seeds)
    report(rows, effect, long_row, stats, args)
    from smallgpt.io import atomic_write_json

    atomic_write_json(args.work / "table.json", {"rows": rows, "long_texts": effect, "backbone": stats})
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
