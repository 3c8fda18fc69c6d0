"""The `smallgpt` command: one verb per job, each an importable, typed function.

Verbs whose arguments are a dataclass get their flags from its fields (the field's `help` metadata is
the help text). `train` takes a config file and nanoGPT-style `--key=value` overrides instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from smallgpt.errors import UserError


def finite_float(text: str) -> float:
    """A float flag's value: NaN and infinity are refused here, not deep inside sampling or an optimizer."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _parse_optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field (`--top-k`; `--top_k` works too, unlisted); `positional` fields become
    arguments; a boolean is `--kv-cache` / `--no-kv-cache`."""
    hints, defaults = typing.get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind, optional = next(a for a in typing.get_args(kind) if a is not type(None)), True
        meta = dict(f.metadata)
        default = getattr(defaults, f.name)
        help_text = meta.get("help", "")
        if meta.get("positional"):
            many = kind is list or typing.get_origin(kind) is list
            parser.add_argument(f.name, nargs="*" if many else "?", default=default, help=help_text)
            continue
        if not meta.get("required") and "default" not in help_text:  # some helps explain their default
            help_text = f"{help_text} (default: {default!r})"
        if kind is bool:
            options: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        elif kind is list or typing.get_origin(kind) is list:
            options = {"action": "append"}
        else:
            parse = finite_float if kind is float else kind
            options = {
                "type": _parse_optional(parse) if optional else parse,
                "required": bool(meta.get("required")),
            }
        flag = f"--{f.name.replace('_', '-')}"
        parser.add_argument(flag, dest=f.name, default=default, help=help_text, **options)
        if "_" in f.name:  # nanoGPT-style spelling, accepted but not listed in --help
            alias = {k: v for k, v in options.items() if k != "required"}
            parser.add_argument(f"--{f.name}", dest=f.name, default=default, help=argparse.SUPPRESS, **alias)


@dataclasses.dataclass(frozen=True)
class Verb:
    """A verb whose arguments are the dataclass `args` and whose work is `function(args)`."""

    module: str
    args: str
    function: str
    help: str

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        module = importlib.import_module(self.module)
        return getattr(module, self.args), getattr(module, self.function)


# the dispatch table: verb -> Verb, or a table of sub-verbs (e.g. `smallgpt classify train`)
COMMANDS: dict[str, Verb | dict[str, Verb]] = {
    "prepare": Verb(
        "smallgpt.preparation",
        "PrepareArgs",
        "run_prepare",
        "tokenize a corpus into a data folder (train.bin, val.bin, meta.json)",
    ),
    "sample": Verb("smallgpt.generate", "SampleArgs", "sample", "print samples from a trained run"),
    "continue": Verb(
        "smallgpt.generate",
        "ContinueArgs",
        "interactive_continue",
        "interactive: type a beginning, the model continues it",
    ),
    "chat": Verb("smallgpt.chat.repl", "ChatArgs", "chat", "talk to a model trained on chat data"),
    "eval": Verb(
        "smallgpt.evaluate",
        "EvalArgs",
        "run_eval",
        "score texts with runs or GPT-2: loss, perplexity, bits per byte (one table)",
    ),
    "serve": Verb(
        "smallgpt.serve",
        "ServeArgs",
        "serve",
        "serve runs over an OpenAI-compatible HTTP API and a web page (pip install 'smallgpt[serve]')",
    ),
    "plot": Verb("smallgpt.experiments.plot", "PlotArgs", "plot", "draw train/val loss curves of runs"),
    "export-metrics": Verb(
        "smallgpt.experiments.metrics",
        "ExportArgs",
        "export_metrics",
        "write a run's metrics as CSV or XLSX",
    ),
    "compare": Verb(
        "smallgpt.experiments.compare",
        "CompareArgs",
        "compare",
        "train config variants on the same budget; table + loss-curve PNG",
    ),
    "export": Verb(
        "smallgpt.export", "ExportArgs", "export", "write a run as a transformers folder or a GGUF file"
    ),
    "classify": {
        "train": Verb(
            "smallgpt.classify.train",
            "ClassifyTrainArgs",
            "train_classifier",
            "fine-tune a pretrained run as a text classifier on labelled CSV/TSV/JSONL",
        ),
        "eval": Verb(
            "smallgpt.classify.evaluate",
            "ClassifyEvalArgs",
            "run_eval",
            "accuracy, macro-F1 and confusion matrix of a classify run on labelled data",
        ),
        "predict": Verb(
            "smallgpt.classify.evaluate",
            "ClassifyPredictArgs",
            "run_predict",
            "label a text (or every line of --file) with class probabilities",
        ),
        "ablate": Verb(
            "smallgpt.classify.train",
            "ClassifyAblateArgs",
            "run_ablate",
            "train the seed's mask/freeze variants from one pretrained run and print the table",
        ),
    },
}
TRAIN_HELP = "train a GPT from a YAML or nanoGPT-style .py config file and --key=value overrides"


def pop_nproc(args: list[str]) -> tuple[int, list[str]]:
    """`--nproc N` / `--nproc=N` (processes to launch; not a config key) and the remaining arguments."""
    for i, arg in enumerate(args):
        if arg == "--nproc" or arg.startswith("--nproc="):
            value = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"--nproc needs a positive number of processes, got {value!r}")
            return int(value), args[:i] + args[i + (1 if "=" in arg else 2) :]
    return 1, args


def train_command(args: list[str]) -> None:
    """`smallgpt train [CONFIG] [--key=value ...] [--nproc N]`: argparse would reject the free-form keys."""
    from smallgpt.config import load_config
    from smallgpt.train.run import train

    nproc, args = pop_nproc(args)
    if nproc > 1:  # become torchrun, which starts N copies of `smallgpt train` without --nproc
        from smallgpt.train.distributed import torchrun_command

        if "RANK" in os.environ:
            raise UserError("--nproc launches torchrun itself: drop it when starting under torchrun")
        command = torchrun_command(nproc, args)
        sys.stdout.flush()
        os.execv(command[0], command)
    path = args[0] if args and not args[0].startswith("--") else None
    train(load_config(path, args[1:] if path is not None else args))


def _add_verb(verbs: argparse._SubParsersAction, name: str, verb: Verb) -> None:
    args_class, function = verb.load()
    sub = verbs.add_parser(name, help=verb.help, description=verb.help)
    add_dataclass_arguments(sub, args_class)

    def handler(ns: argparse.Namespace) -> None:
        function(args_class(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(args_class)}))

    sub.set_defaults(_handler=handler)  # not `run`: verbs have a --run flag


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError: one line, no usage block, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from smallgpt import __version__
    from smallgpt.config import keys_help

    parser = ArgumentParser(prog="smallgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"smallgpt {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    train = verbs.add_parser(
        "train",
        help=TRAIN_HELP,
        description=TRAIN_HELP,
        epilog=keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", help="a YAML or .py config file")
    train.add_argument("--nproc", type=int, default=1, help="processes to start on this machine (torchrun)")
    for name, verb in COMMANDS.items():
        if isinstance(verb, Verb):
            _add_verb(verbs, name, verb)
            continue
        group = verbs.add_parser(name, help=f"{name}: " + ", ".join(verb))
        sub_verbs = group.add_subparsers(dest="sub_verb", required=True, metavar="VERB")
        for sub_name, sub_verb in verb.items():
            _add_verb(sub_verbs, sub_name, sub_verb)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so Python's flush at exit does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (tests capture it)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; the exit status is 0, a UserError's code (2; 3 for a diverged training), 130
    after Ctrl-C, and 0 when the reader of our output went away (`smallgpt sample | head -1`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:  # started with stdout closed (`>&-`): output goes nowhere, as to a pipe
        sys.stdout = open(os.devnull, "w")  # also takes descriptor 1, so no file we open lands there
    try:
        if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
            train_command(argv[1:])
        else:
            ns = build_parser().parse_args(argv)
            ns._handler(ns)
        sys.stdout.flush()  # a closed pipe shows up here, not at exit
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # quiet, as Unix tools are; training has said what it saved
        return 128 + signal.SIGINT
    except BrokenPipeError:
        _silence_stdout()
        return 0
    return 0
