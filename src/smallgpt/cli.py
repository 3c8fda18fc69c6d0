"""The `smallgpt` command: one verb per job, each an importable, typed function.

Verbs whose arguments are a dataclass get their flags from its fields (the field's `help` metadata is
the help text). `train` takes a config file and nanoGPT-style `--key=value` overrides instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from smallgpt import __version__, evaluate, export, generate, preparation, serve
from smallgpt.chat import repl
from smallgpt.classify import evaluate as classify_evaluate
from smallgpt.classify import train as classify_train
from smallgpt.config import keys_help, load_config
from smallgpt.errors import UserError
from smallgpt.experiments import compare, metrics, plot
from smallgpt.train.distributed import torchrun_command
from smallgpt.train.run import train


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
    nproc, args = pop_nproc(args)
    if nproc > 1:  # become torchrun, which starts N copies of `smallgpt train` without --nproc
        if "RANK" in os.environ:
            raise UserError("--nproc launches torchrun itself: drop it when starting under torchrun")
        command = torchrun_command(nproc, args)
        sys.stdout.flush()
        os.execv(command[0], command)
    path = args[0] if args and not args[0].startswith("--") else None
    train(load_config(path, args[1:] if path is not None else args))


@dataclasses.dataclass(frozen=True)
class Verb:
    """A verb: `function(args)`, its flags the fields of the dataclass `args`; with `args` None the
    verb reads its own free-form arguments (`train`'s --key=value) and gets the argument list."""

    args: type | None
    function: Callable[[Any], Any]
    help: str


# the dispatch table: verb -> Verb, or a table of sub-verbs (e.g. `smallgpt classify train`)
COMMANDS: dict[str, Verb | dict[str, Verb]] = {
    "prepare": Verb(
        preparation.PrepareArgs,
        preparation.run_prepare,
        "tokenize a corpus into a data folder (train.bin, val.bin, meta.json)",
    ),
    "train": Verb(
        None,
        train_command,
        "train a GPT from a YAML or nanoGPT-style .py config file and --key=value overrides",
    ),
    "sample": Verb(generate.SampleArgs, generate.sample, "print samples from a trained run"),
    "continue": Verb(
        generate.ContinueArgs,
        generate.interactive_continue,
        "interactive: type a beginning, the model continues it",
    ),
    "chat": Verb(repl.ChatArgs, repl.chat, "talk to a model trained on chat data"),
    "eval": Verb(
        evaluate.EvalArgs,
        evaluate.run_eval,
        "score texts with runs or GPT-2: loss, perplexity, bits per byte (one table)",
    ),
    "serve": Verb(
        serve.ServeArgs,
        serve.serve,
        "serve runs over an OpenAI-compatible HTTP API and a web page (pip install 'smallgpt[serve]')",
    ),
    "plot": Verb(plot.PlotArgs, plot.plot, "draw train/val loss curves of runs"),
    "export-metrics": Verb(
        metrics.ExportArgs,
        metrics.export_metrics,
        "write a run's metrics as CSV or XLSX",
    ),
    "compare": Verb(
        compare.CompareArgs,
        compare.compare,
        "train config variants on the same budget; table + loss-curve PNG",
    ),
    "export": Verb(export.ExportArgs, export.export, "write a run as a transformers folder or a GGUF file"),
    "classify": {
        "train": Verb(
            classify_train.ClassifyTrainArgs,
            classify_train.train_classifier,
            "fine-tune a pretrained run as a text classifier on labelled CSV/TSV/JSONL",
        ),
        "eval": Verb(
            classify_evaluate.ClassifyEvalArgs,
            classify_evaluate.run_eval,
            "accuracy, macro-F1 and confusion matrix of a classify run on labelled data",
        ),
        "predict": Verb(
            classify_evaluate.ClassifyPredictArgs,
            classify_evaluate.run_predict,
            "label a text (or every line of --file) with class probabilities",
        ),
        "ablate": Verb(
            classify_train.ClassifyAblateArgs,
            classify_train.run_ablate,
            "train the seed's mask/freeze variants from one pretrained run and print the table",
        ),
    },
}


def _add_verb(verbs: argparse._SubParsersAction, name: str, verb: Verb) -> None:
    if verb.args is None:  # train: its parser only prints --help; train_command reads the arguments
        sub = verbs.add_parser(
            name,
            help=verb.help,
            description=verb.help,
            epilog=keys_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("config", nargs="?", help="a YAML or .py config file")
        sub.add_argument("--nproc", type=int, default=1, help="processes to start on this machine (torchrun)")
        return
    args_class, function = verb.args, verb.function
    sub = verbs.add_parser(name, help=verb.help, description=verb.help)
    add_dataclass_arguments(sub, args_class)

    def handler(ns: argparse.Namespace) -> None:
        function(args_class(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(args_class)}))

    sub.set_defaults(_handler=handler, _parser=sub)  # not `run`: verbs have a --run flag


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError: one line, no usage block, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> UserError:
    """argparse's `unrecognized arguments` of a verb, with the verb's closest flag and its --help."""
    flags = [option for action in parser._actions for option in action.option_strings if option[:2] == "--"]
    typed = next((arg.partition("=")[0] for arg in unknown if arg.startswith("--")), "")
    close = difflib.get_close_matches(typed, flags, n=1, cutoff=0.6) if typed else []
    hint = f"; did you mean {close[0].replace('_', '-')}?" if close else ""
    return UserError(f"unrecognized arguments: {' '.join(unknown)}{hint} (see {parser.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="smallgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"smallgpt {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
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
        verb = COMMANDS.get(argv[0]) if argv else None
        if isinstance(verb, Verb) and verb.args is None and not {"-h", "--help"} & set(argv):
            verb.function(argv[1:])
        else:
            ns, unknown = build_parser().parse_known_args(argv)
            if unknown:
                raise unknown_arguments(ns._parser, unknown)
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
