"""The seed's classification ablation on Chinese review sentiment, beside a TF-IDF baseline.

1. Pre-train a small char GPT (RoPE, RMSNorm, SwiGLU) on CPU on the shared Chinese text: THUCNews
   articles (text column), 西游记, and the sentiment reviews' text without their labels, the
   reviews weighted 3x (--review-repeats) as the domain the classifier works in.
2. Sample a seeded, class-balanced labelled set from sentiment_zh/{pos,neg}.txt (train, val and a
   test split kept apart) and write it as CSVs. Half the lines of those files are repeats (16,548
   positive lines hold 8,379 distinct reviews, 18,576 negative ones 9,079, and 47 reviews are in
   both): each review is kept once and the 47 contradictory ones are dropped, so no test review is
   also a training review.
3. `smallgpt classify ablate`: the seed's three variants (no mask & full, mask & full, mask & frozen),
   with length-grouped batches (--group-by-length: ~3x faster steps on CPU) and GPT-1's auxiliary
   next-token loss (--lm-loss-weight 0.5).
4. TF-IDF over character 1-3-grams + logistic regression (scikit-learn, `pip install smallgpt[bench]`)
   trained on the same train split and scored on the same test split.
Prints Markdown tables, then an exact McNemar test of the best variant against the baseline on the
same test texts.

    python benchmarks/classify_sentiment.py   # defaults: the README's run (pre-training 4500 s, block 256)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def read_lines(path: Path) -> list[str]:
    """The distinct non-empty lines of a file, in their first order."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def write_pretraining_corpus(data: Path, out: Path, review_repeats: int, chunk: int = 2000) -> None:
    """One .txt of <|endoftext|>-separated documents: news articles, novel chunks, reviews."""
    news = [line.split("\t", 1)[1] for line in read_lines(data / "chinese_news" / "cnews.sample1000.txt")]
    novel = (data / "chinese_novel" / "xiyouji.txt").read_text(encoding="utf-8-sig")
    chunks = [novel[i : i + chunk] for i in range(0, len(novel), chunk)]
    reviews = read_lines(data / "sentiment_zh" / "pos.txt") + read_lines(data / "sentiment_zh" / "neg.txt")
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
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "review"])
        writer.writerows(rows)


def pretrain(corpus: Path, work: Path, args: argparse.Namespace) -> tuple[Path, float]:
    from smallgpt.config import load_config
    from smallgpt.preparation import PrepareArgs, run_prepare
    from smallgpt.train.run import train

    with contextlib.redirect_stdout(io.StringIO()):
        run_prepare(PrepareArgs(input=str(corpus), out=str(work / "data"), val_fraction=0.02))
    run = work / "pretrained"
    overrides = [
        f"--dataset={work / 'data'}", f"--out_dir={run}", "--device=cpu", "--progress=false",
        f"--block_size={args.block_size}", f"--n_layer={args.n_layer}", f"--n_head={args.n_head}",
        f"--n_embd={args.n_embd}", "--bias=false", "--norm=rmsnorm", "--mlp=swiglu", "--pos_emb=rope",
        "--batch_size=16", "--learning_rate=3e-3", "--min_lr=3e-4", "--beta2=0.99",
        "--warmup_iters=50", f"--max_iters={args.pretrain_iters}",
        f"--max_seconds={args.pretrain_seconds}", "--lr_decay_by=seconds", "--eval_interval=250",
        "--eval_iters=20", "--log_interval=50", "--dropout=0.0",
    ]  # fmt: skip
    start = time.perf_counter()
    metrics = train(load_config(None, overrides))
    seconds = time.perf_counter() - start
    print(f"pre-trained {run} in {seconds:.0f} s: val_loss {metrics.get('val_loss', float('nan')):.3f}")
    return run, seconds


def tfidf_baseline(splits: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
    except ImportError:
        raise SystemExit("the baseline needs scikit-learn: pip install smallgpt[bench]") from None
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    train_x = vectorizer.fit_transform([t for _, t in splits["train"]])
    train_y = [label for label, _ in splits["train"]]
    # C picked on the validation split, as the GPT picks its checkpoint there
    best = None
    for c in (0.3, 1.0, 3.0, 10.0, 30.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(train_x, train_y)
        val = accuracy_score(
            [y for y, _ in splits["val"]], model.predict(vectorizer.transform([t for _, t in splits["val"]]))
        )
        if best is None or val > best[0]:
            best = (val, model)
    predicted = best[1].predict(vectorizer.transform([t for _, t in splits["test"]]))
    truth = [label for label, _ in splits["test"]]
    return {
        "accuracy": accuracy_score(truth, predicted),
        "macro_f1": f1_score(truth, predicted, average="macro"),
        "seconds": time.perf_counter() - start,
        "predicted": list(predicted),
    }


def classifier_predictions(run_dir: Path, texts: list[str]) -> list[str]:
    """The labels ckpt/best of a classify run gives texts."""
    import torch

    from smallgpt.classify.data import encode_texts
    from smallgpt.classify.evaluate import load_classifier, predict_logits

    cpu = torch.device("cpu")
    model, tokenizer, names, _ = load_classifier(run_dir, cpu)
    ids = encode_texts(texts, tokenizer, model.backbone.config.block_size).ids
    return [names[i] for i in predict_logits(model, ids, 64, tokenizer.eot_id, cpu).argmax(-1).tolist()]


def mcnemar(truth: list[str], a: list[str], b: list[str]) -> tuple[int, int, float]:
    """Texts only a gets right, texts only b gets right, and the exact two-sided McNemar p-value:
    how likely a split at least this uneven is if both classifiers were equally accurate."""
    only_a = sum(x == t != y for t, x, y in zip(truth, a, b))
    only_b = sum(y == t != x for t, x, y in zip(truth, a, b))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="folder of shared corpora")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--pretrain-seconds", type=float, default=4500, help="the lr decays over this budget")
    parser.add_argument("--pretrain-iters", type=int, default=100_000, help="an upper bound on steps")
    parser.add_argument(
        "--review-repeats", type=int, default=3, help="weight of the reviews in the pre-training corpus"
    )
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--lm-loss-weight", type=float, default=0.5, help="GPT-1's auxiliary next-token loss in fine-tuning"
    )
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    if args.review_repeats < 1:
        parser.error(f"--review-repeats must be at least 1, got {args.review_repeats}")

    from smallgpt.classify.train import ClassifyAblateArgs, ablation_table, run_ablate

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        pretrained = work / "pretrained"
        if (pretrained / "ckpt").is_dir():
            print(f"reusing the pre-trained run {pretrained}")
        else:
            write_pretraining_corpus(args.data, work / "corpus.txt", args.review_repeats)
            pretrained, _ = pretrain(work / "corpus.txt", work, args)
        sizes = {"train": args.train_size, "val": args.val_size, "test": args.test_size}
        splits = labelled_splits(args.data, sizes, args.seed)
        for split, rows in splits.items():
            write_csv(work / f"{split}.csv", rows)
        baseline = tfidf_baseline(splits)
        rows = run_ablate(
            ClassifyAblateArgs(
                data=str(work / "train.csv"), val_data=str(work / "val.csv"),
                test_data=str(work / "test.csv"), init_from=str(pretrained), text_column="review",
                out_dir=str(work / "ablate"),
                pooling=args.pooling, epochs=args.epochs, learning_rate=args.learning_rate,
                lm_loss_weight=args.lm_loss_weight,
                group_by_length=True,
                progress=False, device="cpu", seed=args.seed,
            )
        )  # fmt: skip
        best = max(rows, key=lambda r: r["accuracy"])
        truth, texts = zip(*splits["test"])
        predicted = classifier_predictions(work / "ablate" / best["variant"], list(texts))
    print(f"\nsentiment_zh: train {args.train_size}, val {args.val_size}, test {args.test_size} (balanced)")
    print(ablation_table(rows))
    print(
        f"| TF-IDF char 1-3-grams + logistic regression | - | {100 * baseline['accuracy']:.1f}% "
        f"| {baseline['macro_f1']:.3f} | {baseline['seconds']:.0f} |"
    )
    margin = 100 * (best["accuracy"] - baseline["accuracy"])
    print(f"\nbest variant {best['variant']}: {margin:+.1f} accuracy points over the TF-IDF baseline")
    only_gpt, only_tfidf, p = mcnemar(list(truth), predicted, baseline["predicted"])
    print(
        f"on the {len(truth)} test texts the GPT alone is right on {only_gpt}, TF-IDF alone on "
        f"{only_tfidf}: exact McNemar p = {p:.3f}"
    )


if __name__ == "__main__":
    main()
