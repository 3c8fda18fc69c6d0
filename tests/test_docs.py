"""The docs stay true to the repo: README.md and docs/*.md link only to files and headings that exist,
the README stays short, and every `smallgpt ...` command in their bash blocks parses with today's CLI.
The README's own prepare, train, serve, curl and `openai` commands run, in order."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from smallgpt.cli import COMMANDS, build_parser, pop_nproc
from smallgpt.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(\S*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each block as (info string, its lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence = ""  # the opening fence while inside a block
    for line in text.splitlines():
        match = FENCE.match(line)
        if not fence:
            if match:
                fence = match.group(1)
                blocks.append((match.group(2), []))
            else:
                prose.append(line)
        elif (
            match
            and match.group(1)[0] == fence[0]
            and len(match.group(1)) >= len(fence)
            and not match.group(2)
        ):
            fence = ""
        else:
            blocks[-1][1].append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in split_fences(path.read_text(encoding="utf-8"))[0]:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(path: Path) -> list[str]:
    """Link targets in a Markdown file's prose (not in code), without external URLs."""
    targets = []
    for line in split_fences(path.read_text(encoding="utf-8"))[0]:
        line = INLINE_CODE.sub("", line)
        targets += LINK.findall(line) + REFERENCE_DEFINITION.findall(line)
    return [t for t in targets if not SCHEME.match(t)]


def broken_links(path: Path, root: Path) -> list[str]:
    """'file: target (why)' for each relative link of `path` that does not resolve inside `root`."""
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not linked.is_relative_to(root.resolve()):
            problems.append(f"{path.name}: {target} (outside the repository)")
        elif not linked.exists():
            problems.append(f"{path.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.name}: {target} (no such heading)")
    return problems


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_relative_link_in_readme_and_docs_resolves():
    assert len(DOCS) > 1  # the README and at least one docs page
    problems = [problem for path in DOCS for problem in broken_links(path, REPO)]
    assert problems == []


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Training on CPU: nanoGPT's quick start", "training-on-cpu-nanogpts-quick-start"),
        ("`smallgpt chat`", "smallgpt-chat"),
        ("DDP or FSDP (`parallel: ddp | fsdp`)", "ddp-or-fsdp-parallel-ddp--fsdp"),
        ("snake_case and 中文 [link](x.md)", "snake_case-and-中文-link"),
    ],
)
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_link_check_finds_broken_links_and_ignores_code(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n## Repeated\n## Repeated\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n"
        "[ok](other.md) [ok](other.md#other-page) [ok](other.md#repeated-1) [ok](#title) "
        "[web](https://example.com/missing.md) ![img](other.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) `[in code](missing-inline.md)`\n"
        "```bash\n[in a fence](missing-fenced.md)\n# not a heading\n```\n"
        "[out](../outside.md)\n"
        "[ref]: other.md#nope-either\n"
    )
    (tmp_path.parent / "outside.md").write_text("x")
    assert broken_links(page, tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nope (no such heading)",
        "page.md: ../outside.md (outside the repository)",
        "page.md: other.md#nope-either (no such heading)",
    ]
    assert "not-a-heading" not in anchors(page)


def smallgpt_commands(path: Path) -> list[list[str]]:
    """The arguments of every `smallgpt ...` (or `python -m smallgpt`, `torchrun ... -m smallgpt`)
    command in a file's bash blocks; backslash continuations joined, `&&`/`;`/`|` split."""
    commands = []
    for info, lines in split_fences(path.read_text(encoding="utf-8"))[1]:
        if info != "bash":
            continue
        for line in "\n".join(lines).replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            command: list[str] = []
            for token in [*lexer, ";"]:
                if token not in ("&&", "||", ";", "|"):
                    command.append(token)
                    continue
                words = [w for w in command if not re.match(r"^[A-Z_]+=", w)]  # env assignments
                if words[:1] == ["smallgpt"]:
                    commands.append(words[1:])
                elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["smallgpt"]:
                    commands.append(words[words.index("-m") + 2 :])
                command = []
    return commands


DOC_COMMANDS = [(path.name, argv) for path in DOCS for argv in smallgpt_commands(path)]


def without_abbreviations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser and its sub-parsers, refusing `--num-sample` for `--num-samples`: docs spell flags out."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                without_abbreviations(sub)
    return parser


@pytest.fixture(scope="module")
def cli_parser():
    return without_abbreviations(build_parser())


def verb_of(argv: list[str]) -> str:
    """`classify train` for a verb with sub-verbs, else the verb."""
    return " ".join(argv[:2]) if isinstance(COMMANDS.get(argv[0]), dict) else argv[0]


def test_readme_shows_every_verb():
    verbs = set()
    for verb, table in COMMANDS.items():
        verbs |= {f"{verb} {sub}" for sub in table} if isinstance(table, dict) else {verb}
    shown = {verb_of(argv) for doc, argv in DOC_COMMANDS if doc == "README.md"}
    assert verbs - shown == set(), "README.md needs one example per verb"


@pytest.mark.parametrize(
    ("doc", "argv"), DOC_COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in DOC_COMMANDS]
)
def test_documented_command_parses(doc, argv, cli_parser, monkeypatch):
    monkeypatch.chdir(REPO)  # config paths in the docs are relative to the repository
    if argv[0] == "train":  # free-form config keys: the config loader checks them, as `smallgpt train` does
        _, args = pop_nproc(argv[1:])
        config_file = args[0] if args and not args[0].startswith("--") else None
        load_config(config_file, args[1:] if config_file else args)
        return
    try:
        cli_parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{doc}: `smallgpt {' '.join(argv)}` does not parse (see stderr)")


def readme_block(language: str, containing: str) -> str:
    """The first code block of the README in `language` that contains `containing`."""
    blocks = split_fences((REPO / "README.md").read_text(encoding="utf-8"))[1]
    texts = ["\n".join(lines) for info, lines in blocks if info == language]
    return next(text for text in texts if containing in text)


def test_readme_commands_run_in_order(tmp_path, monkeypatch, shared_data):
    """The README as a new user follows it: its prepare and train commands (training shortened with
    --max_iters), then its serve command, its curl and its `openai` example, unchanged but for the port.
    The README's model has a context of 64 tokens and the examples ask for 100: the window slides."""
    import subprocess
    import sys

    from conftest import ServerProcess

    from smallgpt.cli import main

    work = tmp_path / "repo"  # a checkout's root: configs/ and ../shared/data as in the README
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    (tmp_path / "shared").symlink_to(shared_data.parent)
    cache = tmp_path / "cache" / "tinyshakespeare"  # `prepare tinyshakespeare` finds it downloaded
    cache.mkdir(parents=True)
    (cache / "input.txt").symlink_to(shared_data / "tinyshakespeare" / "input.txt")
    monkeypatch.setenv("SMALLGPT_CACHE", str(cache.parent))
    monkeypatch.chdir(work)
    commands = [argv for argv in smallgpt_commands(REPO / "README.md") if argv[0] in ("prepare", "train")]
    assert [argv[0] for argv in commands] == ["prepare", "train", "prepare", "train"]
    for argv in commands:
        shortened = ["--max_iters=3", "--progress=false"] if argv[0] == "train" else []
        assert main([*argv, *shortened]) == 0, argv

    [serve] = [argv for argv in smallgpt_commands(REPO / "README.md") if argv[0] == "serve"]
    server = ServerProcess(tmp_path / "serve.log", *serve[1:], cwd=work)  # on a port of its own
    try:
        here = urlsplit(server.base_url).netloc
        curl = readme_block("bash", "curl ").split("\n", 1)[1].replace("127.0.0.1:8000", here)
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.endswith("data: [DONE]\n\n"), done
        events = [json.loads(e[6:]) for e in done.stdout.split("\n\n") if e.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert sum(len(e["choices"][0]["text"]) for e in events) <= 100  # a char model: a character a token
        python = readme_block("python", "from openai import OpenAI").replace("127.0.0.1:8000", here)
        done = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout, done
    finally:
        server.close()
    assert "Traceback" not in server.output()
