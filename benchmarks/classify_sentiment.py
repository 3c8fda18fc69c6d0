"""The seed's classification ablation on Chinese review sentiment, beside tuned TF-IDF baselines.

1. Sample a seeded, class-balanced labelled set from sentiment_zh/{pos,neg}.txt (train, val and a
   test split kept apart) and write it as CSVs. Half the lines of those files are repeats (16,548
   positive lines hold 8,379 distinct reviews, 18,576 negative ones 9,079, and 47 reviews are in
   both): each review is kept once and the 47 contradictory ones are dropped, so no test review is
   also a training review.
2. Pre-train a small char GPT (RoPE, RMSNorm, SwiGLU) on CPU on the shared Chinese text: THUCNews
   articles (text column), 西游记, and the reviews' text without labels, weighted 3x
   (--review-repeats) as the domain the classifier works in. The val and test reviews are left out.
3. Domain adaptation, when asked for (--adapt-iters N, as `classify train --adapt-iters`): more
   next-token training on the labelled training texts alone. Off by default: the corpus already
   holds those texts, and 300 steps measured -0.3 to +0.75 points (docs/benchmarks.md).
4. `smallgpt classify ablate` from the (adapted) backbone for each fine-tuning seed (--seeds): the
   seed's three variants (no mask & full, mask & full, mask & frozen), length-grouped batches and
   GPT-1's auxiliary next-token loss (--lm-loss-weight 0.5); with adaptation, then the best variant
   from the backbone before it, to show what adaptation buys.
   --ensemble N (2; 1: off) adds a row: each seed's no-mask full run beside N-1 more fine-tunes of
   it (seeds seed+1000, ...), class probabilities averaged (`classify eval --run A,B`).
5. TF-IDF + logistic regression (scikit-learn, `pip install smallgpt[bench]`) on the same splits, with
   default settings and tuned on val over C x char n-gram range x sublinear tf.
Prints Markdown tables (mean ± std over the seeds, macro-F1, times), the best variant's margin over
the tuned baseline, and an exact McNemar test against it per seed on the same test texts. Runs and
results are kept in --work; a second call reuses what is there (a recipe off the defaults, such as
--layer-lr-decay 0.8, has its own run folders), so once one call has adapted the backbone, calls
with other --seeds or recipes can run beside it (one per core, OMP_NUM_THREADS=1).

    python benchmarks/classify_sentiment.py --work /tmp/cls   # 6 x 192, 1750 s pre-training; ~95 min
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def read_lines(path: Path) -> list[str]:
    """The distinct non-empty lines of a file, in their first order."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def write_pretraining_corpus(
    data: Path, out: Path, review_repeats: int, held_out: set[str], chunk: int = 2000
) -> None:
    """One .txt of <|endoftext|>-separated documents: news articles, novel chunks, and the reviews
    that are not in `held_out` (the val and test texts: the backbone never reads them)."""
    news = [line.split("\t", 1)[1] for line in read_lines(data / "chinese_news" / "cnews.sample1000.txt")]
    novel = (data / "chinese_novel" / "xiyouji.txt").read_text(encoding="utf-8-sig")
    chunks = [novel[i : i + chunk] for i in range(0, len(novel), chunk)]
    reviews = read_lines(data / "sentiment_zh" / "pos.txt") + read_lines(data / "sentiment_zh" / "neg.txt")
    reviews = [text for text in dict.fromkeys(reviews) if text not in held_out]
    rng = random.Random(0)
    groups = []
    # Reviews in groups of 20, so documents are long enough to fill a training window. A group is
    # repeated (reshuffled) inside its own document to weight the target domain: the prepare step
    # splits train/val by document, so no review is on both sides.
    for i in range(0, len(reviews), 20):
        group = reviews[i : i + 20]
        repeats = [rng.sample(group, len(group)) for _ in range(review_repeats)]
        groups.append("\n".join(line for repeat in repeats for line in repeat))
    out.write_text("\n<|endoftext|>\n".join(news + chunks + groups), encoding="utf-8")


def labelled_splits(data: Path, sizes: dict[str, int], seed: int) -> dict[str, list[tuple[str, str]]]:
    """Class-balanced (label, review) rows per split, sampled without overlap."""
    rng = random.Random(seed)
    per_class = {label: read_lines(data / "sentiment_zh" / f"{label}.txt") for label in ("pos", "neg")}
    contradictory = set(per_class["pos"]) & set(per_class["neg"])
    for label, reviews in per_class.items():
        per_class[label] = [text for text in reviews if text not in contradictory]
        rng.shuffle(per_class[label])
        if sum(sizes.values()) // 2 > len(per_class[label]):
            raise SystemExit(f"{label}: {len(per_class[label])} distinct reviews, fewer than the splits need")
    splits, start = {}, 0
    for split, size in sizes.items():
        half = size // 2
        rows = [(label, text) for label in per_class for text in per_class[label][start : start + half]]
        rng.shuffle(rows)
        splits[split] = rows
        start += half
    return splits


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """Written atomically: a run reading it in parallel sees the whole file."""
    import csv

    from smallgpt.io import atomic_write_text

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["label", "review"])
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def pretrain(corpus: Path, work: Path, args: argparse.Namespace) -> tuple[Path, float]:
    from smallgpt.config import load_config
    from smallgpt.preparation import PrepareArgs, run_prepare
    from smallgpt.train.run import train

    with contextlib.redirect_stdout(io.StringIO()):
        # a pre-training stopped before its first checkpoint is started again, data and all
        run_prepare(PrepareArgs(input=str(corpus), out=str(work / "data"), val_fraction=0.02, overwrite=True))
    run = work / "pretrained"
    overrides = [
        f"--dataset={work / 'data'}", f"--out_dir={run}", "--device=cpu", "--progress=false",
        f"--block_size={args.block_size}", f"--n_layer={args.n_layer}", f"--n_head={args.n_head}",
        f"--n_embd={args.n_embd}", "--bias=false", "--norm=rmsnorm", "--mlp=swiglu", "--pos_emb=rope",
        "--batch_size=16", "--learning_rate=3e-3", "--min_lr=3e-4", "--beta2=0.99",
        "--warmup_iters=50", f"--max_iters={args.pretrain_iters}",
        f"--max_seconds={args.pretrain_seconds}", "--lr_decay_by=seconds", "--eval_interval=250",
        "--eval_iters=20", "--log_interval=50", f"--dropout={args.pretrain_dropout}", f"--dtype={args.dtype}",
        f"--seed={args.pretrain_seed}",
    ]  # fmt: skip
    start = time.perf_counter()
    metrics = train(load_config(None, overrides))
    seconds = time.perf_counter() - start
    print(f"pre-trained {run} in {seconds:.0f} s: val_loss {metrics.get('val_loss', float('nan')):.3f}")
    return run, seconds


def tfidf_baselines(splits: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """TF-IDF + logistic regression twice: with default settings (char 1-3-grams, raw tf, C=1), and
    tuned on the validation split only over C x n-gram range x sublinear tf."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
    except ImportError:
        raise SystemExit("the baseline needs scikit-learn: pip install smallgpt[bench]") from None
    texts = {split: [t for _, t in rows] for split, rows in splits.items()}
    truth = {split: [label for label, _ in rows] for split, rows in splits.items()}

    def fit(ngrams: int, sublinear: bool, c: float) -> tuple[float, Any, Any]:
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, ngrams), sublinear_tf=sublinear)
        model = LogisticRegression(C=c, max_iter=3000).fit(
            vectorizer.fit_transform(texts["train"]), truth["train"]
        )
        return (
            accuracy_score(truth["val"], model.predict(vectorizer.transform(texts["val"]))),
            vectorizer,
            model,
        )

    def row(name: str, setting: str, vectorizer: Any, model: Any, seconds: float) -> dict:
        predicted = [str(label) for label in model.predict(vectorizer.transform(texts["test"]))]
        return {
            "name": name, "setting": setting, "seconds": seconds, "predicted": predicted,
            "accuracy": float(accuracy_score(truth["test"], predicted)),
            "macro_f1": float(f1_score(truth["test"], predicted, average="macro")),
        }  # fmt: skip

    start = time.perf_counter()
    _, vectorizer, model = fit(3, False, 1.0)
    rows = [
        row(
            "TF-IDF + LR, default settings",
            "char 1-3-grams, raw tf, C=1",
            vectorizer,
            model,
            time.perf_counter() - start,
        )
    ]
    start, best = time.perf_counter(), None
    for ngrams in (2, 3, 4):
        for sublinear in (False, True):
            for c in (0.3, 1.0, 3.0, 10.0, 30.0):
                val, vectorizer, model = fit(ngrams, sublinear, c)
                if best is None or val > best[0]:
                    setting = f"char 1-{ngrams}-grams, {'sublinear' if sublinear else 'raw'} tf, C={c:g}"
                    best = (val, setting, vectorizer, model)
    assert best is not None
    val, setting, vectorizer, model = best
    tuned = row(
        "TF-IDF + LR, tuned on val (30 settings)", f"{setting} (val {100 * val:.1f}%)", vectorizer, model, 0
    )
    tuned["seconds"] = time.perf_counter() - start
    return rows + [tuned]


def cached_baselines(path: Path, splits: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """tfidf_baselines, read back from `path` when an earlier call on the same splits wrote it (the
    grid takes minutes; parallel calls over different seeds share one)."""
    if path.is_file():
        print(f"reusing the baselines in {path}")
        return json.loads(path.read_text())
    from smallgpt.io import atomic_write_json

    baselines = tfidf_baselines(splits)
    atomic_write_json(path, baselines)
    return baselines


def ensemble_scores(run_dirs: list[Path], labelled: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Accuracy and macro-F1 of ckpt/best of one classify run or several (their class probabilities
    averaged) on (label, text) pairs, and the labels they predict."""
    import numpy as np
    import torch

    from smallgpt.classify.evaluate import ensemble_probabilities, load_ensemble, probability_metrics

    cpu = torch.device("cpu")
    members, names, _ = load_ensemble(",".join(map(str, run_dirs)), cpu)
    truth, texts = zip(*labelled)
    probs = ensemble_probabilities(members, list(texts), 64, cpu)
    metrics, _ = probability_metrics(probs, np.array([names.index(label) for label in truth]))
    return metrics, [names[i] for i in probs.argmax(-1).tolist()]


def mcnemar(truth: list[str], a: list[str], b: list[str]) -> tuple[int, int, float]:
    """Texts only a gets right, texts only b gets right, and the exact two-sided McNemar p-value:
    how likely a split at least this uneven is if both classifiers were equally accurate."""
    only_a = sum(x == t != y for t, x, y in zip(truth, a, b))
    only_b = sum(y == t != x for t, x, y in zip(truth, a, b))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def best_val_accuracy(run_dir: Path) -> float:
    """The val accuracy of a classify run's ckpt/best: the highest of its evaluations."""
    from smallgpt.train.logging import read_metrics

    return max(r["val_accuracy"] for r in read_metrics(run_dir) if "val_accuracy" in r)


def mean_of(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * spread:.2f}%"


# the flags that change what a fine-tuning run learns
RECIPE = ("adapt_iters", "adapt_learning_rate", "epochs", "learning_rate", "dropout", "lm_loss_weight",
          "layer_lr_decay", "pooling", "echo")  # fmt: skip


def recipe_suffix(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Empty for the default recipe, else "_flag=value" for each RECIPE flag off its default, so that
    another recipe's runs go in their own folders (ablate_learning-rate=0.002/) and are never reused
    for this one."""
    changed = (name for name in RECIPE if getattr(args, name) != parser.get_default(name))
    return "".join(f"_{name.replace('_', '-')}={getattr(args, name)}" for name in changed)


def fine_tuning(args: argparse.Namespace, work: Path, backbone: Path) -> dict[str, Any]:
    """The classify flags every fine-tuning run here shares."""
    return dict(
        data=str(work / "train.csv"), val_data=str(work / "val.csv"), test_data=str(work / "test.csv"),
        init_from=str(backbone), text_column="review", pooling=args.pooling, epochs=args.epochs,
        learning_rate=args.learning_rate, lm_loss_weight=args.lm_loss_weight, dropout=args.dropout,
        layer_lr_decay=args.layer_lr_decay, echo=args.echo,
        group_by_length=True, progress=False, device="cpu", dtype=args.dtype,
    )  # fmt: skip


def fine_tune_rows(args: argparse.Namespace, work: Path, backbone: Path, seeds: list[int]) -> list[dict]:
    """The seed's three variants for every fine-tuning seed (split and backbone fixed); a seed whose
    ablation.json exists is read back, so a stopped benchmark picks up where it was."""
    from smallgpt.classify.train import ClassifyAblateArgs, run_ablate

    rows = []
    for seed in seeds:
        out = work / f"ablate{args.recipe}" / f"seed{seed}"
        if (out / "ablation.json").is_file():
            ablation = json.loads((out / "ablation.json").read_text())
        else:
            settings = fine_tuning(args, work, backbone)  # overwrite: what a stopped ablation left
            ablation = run_ablate(ClassifyAblateArgs(**settings, out_dir=str(out), seed=seed, overwrite=True))
        for r in ablation:
            run = out / r["variant"]
            rows.append({**r, "seed": seed, "val": best_val_accuracy(run), "runs": [run]})
    return rows


def no_mask_run(args: argparse.Namespace, work: Path, backbone: Path, out: Path, seed: int) -> dict:
    """A no-mask, full fine-tuning run into `out` (read back when its eval.json exists): its test
    metrics and seconds."""
    from smallgpt.classify.train import ClassifyTrainArgs, train_classifier

    if (out / "eval.json").is_file():
        return json.loads((out / "eval.json").read_text())
    settings = fine_tuning(args, work, backbone)  # overwrite: what a stopped run left
    return train_classifier(
        ClassifyTrainArgs(**settings, out_dir=str(out), seed=seed, mask_padding=False, overwrite=True)
    )


def plain_rows(args: argparse.Namespace, work: Path, pretrained: Path, seeds: list[int]) -> list[dict]:
    """No mask, full fine-tuning from the backbone before adaptation: what adaptation buys."""
    rows = []
    for seed in seeds:
        out = work / f"plain{args.recipe}" / f"seed{seed}"
        result = no_mask_run(args, work, pretrained, out, seed)
        val = best_val_accuracy(out)
        rows.append({**result, "mask": False, "frozen": False, "seed": seed, "val": val, "runs": [out]})
    return rows


def ensemble_rows(
    args: argparse.Namespace, work: Path, backbone: Path, rows: list[dict], splits: dict
) -> list[dict]:
    """Per seed, its no-mask full run beside --ensemble - 1 more (fine-tuning seeds seed + 1000,
    seed + 2000, ...), their class probabilities averaged; seconds add up the members' fine-tuning."""
    ensembles = []
    for row in (r for r in rows if r["variant"] == "nomask_full"):
        runs, seconds = list(row["runs"]), row["seconds"]
        for k in range(1, args.ensemble):
            member_seed = row["seed"] + 1000 * k
            out = runs[0].parent / f"nomask_full_seed{member_seed}"
            seconds += no_mask_run(args, work, backbone, out, member_seed)["seconds"]
            runs.append(out)
        test, _ = ensemble_scores(runs, splits["test"])
        val, _ = ensemble_scores(runs, splits["val"])
        ensembles.append(
            {**test, "variant": f"nomask_full x{args.ensemble}", "mask": False, "frozen": False,
             "seed": row["seed"], "val": val["accuracy"], "seconds": seconds, "runs": runs}
        )  # fmt: skip
    return ensembles


def adapted_backbone(args: argparse.Namespace, work: Path, pretrained: Path, texts: list[str]) -> Path:
    """The pre-trained backbone after --adapt-iters steps on the labelled training texts alone."""
    from smallgpt.classify.adapt import adapt_backbone

    out = work / f"adapted_{args.adapt_iters}_lr{args.adapt_learning_rate}"  # another setting, another run
    if (out / "ckpt" / "best").is_dir():
        print(f"reusing the adapted backbone {out}")
        return out
    start = time.perf_counter()
    adapt_backbone(
        pretrained, texts, out, args.adapt_iters, args.adapt_learning_rate, 32, args.seed, torch_cpu(),
        args.dtype, progress=False,
    )  # fmt: skip
    print(f"adapted in {time.perf_counter() - start:.0f} s")
    return out


def torch_cpu() -> Any:
    import torch

    return torch.device("cpu")


def report(rows: list[dict], plain: list[dict], baselines: list[dict], splits: dict, adapted: bool) -> None:
    """Markdown tables: every variant's mean ± std over the seeds, the baselines, McNemar per seed
    (the classifiers read back from their runs)."""
    print(
        "\n| backbone | mask padding | frozen | val accuracy (mean) | test accuracy (mean ± std) "
        "| macro-F1 | time (s) | seeds |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    if plain:
        groups["nomask_full (no adaptation)"] = plain
    yes_no = {True: "yes", False: "no"}
    for name, group in groups.items():
        backbone = "adapted" if adapted and "no adaptation" not in name else "pre-trained"
        if len(group[0]["runs"]) > 1:
            backbone += f", {len(group[0]['runs'])} fine-tunes averaged"
        print(
            f"| {backbone} | {yes_no[group[0]['mask']]} | {yes_no[group[0]['frozen']]} "
            f"| {100 * mean_of(group, 'val'):.2f}% | {mean_std([r['accuracy'] for r in group])} "
            f"| {mean_of(group, 'macro_f1'):.3f} "
            f"| {mean_of(group, 'seconds'):.0f} | {len(group)} |"
        )
    for b in baselines:
        print(
            f"| {b['name']}: {b['setting']} | - | - | - | {100 * b['accuracy']:.2f}% | {b['macro_f1']:.3f} "
            f"| {b['seconds']:.0f} | - |"
        )
    tuned = baselines[-1]
    best_name = max(  # chosen on val: test accuracy picks nothing here
        (n for n in groups if "no adaptation" not in n), key=lambda n: mean_of(groups[n], "val")
    )
    best = groups[best_name]
    margin = 100 * (mean_of(best, "accuracy") - tuned["accuracy"])
    print(
        f"\nbest variant {best_name}: {margin:+.2f} points (mean of {len(best)} seeds) over the tuned TF-IDF"
    )
    truth = [label for label, _ in splits["test"]]
    for r in best:
        _, predicted = ensemble_scores(r["runs"], splits["test"])
        only_gpt, only_tfidf, p = mcnemar(list(truth), predicted, tuned["predicted"])
        print(
            f"seed {r['seed']}: on the {len(truth)} test texts the GPT alone is right on {only_gpt}, "
            f"tuned TF-IDF alone on {only_tfidf}: exact McNemar p = {p:.3g}"
        )


def pretraining_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `pretrain` reads: the backbone's shape, budget and corpus weighting."""
    parser.add_argument(
        "--pretrain-seconds", type=float, default=1750, help="the lr decays over this budget (two threads)"
    )
    parser.add_argument("--pretrain-iters", type=int, default=100_000, help="an upper bound on steps")
    parser.add_argument(
        "--pretrain-seed", type=int, default=1337, help="seed of the initial weights and the batches"
    )
    parser.add_argument(
        "--pretrain-dropout", type=float, default=0.0, help="dropout in pre-training, against memorising"
    )
    parser.add_argument(
        "--review-repeats", type=int, default=3, help="weight of the reviews in the pre-training corpus"
    )
    parser.add_argument(
        "--dtype", default="bfloat16", help="training dtype (bfloat16: autocast on a CPU that has it)"
    )
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="folder of shared corpora")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    pretraining_arguments(parser)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument(
        "--adapt-iters", type=int, default=0, help="domain adaptation on the training texts (0: off)"
    )
    parser.add_argument("--adapt-learning-rate", type=float, default=1e-3)
    parser.add_argument("--no-plain", action="store_true", help="skip the best variant without adaptation")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="dropout in fine-tuning, whatever the backbone used"
    )
    parser.add_argument(
        "--lm-loss-weight", type=float, default=0.5, help="GPT-1's auxiliary next-token loss in fine-tuning"
    )
    parser.add_argument(
        "--layer-lr-decay", type=float, default=1.0, help="each block's lr over the one above it (1: off)"
    )
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--echo", action="store_true", help="each text is read twice (classify train --echo)")
    parser.add_argument(
        "--ensemble", type=int, default=2, help="average the no-mask full run with N-1 other seeds (1: off)"
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed of the labelled splits")
    parser.add_argument("--seeds", default="1337,1338,1339", help="fine-tuning seeds, comma-separated")
    args = parser.parse_args()
    if args.review_repeats < 1:
        parser.error(f"--review-repeats must be at least 1, got {args.review_repeats}")
    for name in ("pretrain_dropout", "dropout"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.ensemble < 1:
        parser.error(f"--ensemble must be at least 1, got {args.ensemble}")
    if not 0 < args.layer_lr_decay <= 1:
        parser.error(f"--layer-lr-decay must be in (0, 1], got {args.layer_lr_decay}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.recipe = recipe_suffix(args, parser)

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        sizes = {"train": args.train_size, "val": args.val_size, "test": args.test_size}
        splits = labelled_splits(args.data, sizes, args.seed)
        for split, labelled in splits.items():
            write_csv(work / f"{split}.csv", labelled)
        pretrained = work / "pretrained"
        if (pretrained / "ckpt").is_dir():
            print(f"reusing the pre-trained run {pretrained}")
        else:
            held_out = {text for split in ("val", "test") for _, text in splits[split]}
            write_pretraining_corpus(args.data, work / "corpus.txt", args.review_repeats, held_out)
            pretrained, _ = pretrain(work / "corpus.txt", work, args)
        baselines = cached_baselines(work / "baselines.json", splits)
        train_texts = [text for _, text in splits["train"]]
        backbone = adapted_backbone(args, work, pretrained, train_texts) if args.adapt_iters else pretrained
        rows = fine_tune_rows(args, work, backbone, seeds)
        if args.ensemble > 1:
            rows += ensemble_rows(args, work, backbone, rows, splits)
        plain = [] if args.no_plain or not args.adapt_iters else plain_rows(args, work, pretrained, seeds)
        print(
            f"\nsentiment_zh: train {args.train_size}, val {args.val_size}, test {args.test_size} (balanced)"
        )
        report(rows, plain, baselines, splits, args.adapt_iters > 0)


if __name__ == "__main__":
    main()
