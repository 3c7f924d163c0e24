"""The documentation is checked without running anything: README.md stays short, every command shown parses.

Rules the docs follow (and this test enforces):

- Fenced blocks marked ```bash, ```sh, ```shell, ```console or left unmarked hold runnable command lines; every
  line that starts with ``tuckersegment`` (also after a ``$ `` prompt, environment assignments, or a path such as
  ``.venv/bin/``) is parsed by the real argument parser, ``TuckerSegmentLib.cli.build_parser()``. Lines ending in
  ``\\`` continue on the next line. Synopses (``[--opt A|B]``, ``...``) go in ```text blocks, which are not checked.
- ``bash scripts/X`` and ``python scripts/X.py`` in those blocks name existing files, and the options shown for a
  Python script are ones its argparse declares (read from its source, not run).
- Every ```python block of README.md and docs/guide/*.md compiles.
- Every relative link ``[text](path)`` of README.md and docs/guide/*.md points at an existing file, and an anchor
  into a Markdown file names one of its headings (GitHub's heading ids).

Parsing only: no model is loaded and no process is started.
"""
from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from TuckerSegmentLib.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide"
MAX_README_LINES = 250
COMMAND_FENCES = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
ENVIRONMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).+?\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
PYTHONS = {"python", "python3"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language tag and its lines."""

    path: Path
    line: int
    language: str
    lines: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def documents() -> list[Path]:
    """README.md and every Markdown file under docs/ (generated tables included: their commands must parse too)."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def manual() -> list[Path]:
    """The hand-written pages: README.md and docs/guide/*.md."""
    return [README, *sorted(GUIDE.glob("*.md"))]


@cache
def blocks(path: Path) -> tuple[Block, ...]:
    """The fenced code blocks of one Markdown file."""
    found: list[Block] = []
    fence: str | None = None
    language, start = "", 0
    body: list[str] = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(text)
        if fence is None and match:
            fence, language, start, body = match.group(1), match.group(2).lower(), number, []
        elif fence is not None and match and match.group(1).startswith(fence) and not match.group(2):
            found.append(Block(path, start, language, tuple(body)))
            fence = None
        elif fence is not None:
            body.append(text)
    assert fence is None, f"{path.relative_to(ROOT)}:{start}: a code block is never closed"
    return tuple(found)


def prose(path: Path, code_spans: bool = False) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks; inline code spans removed unless ``code_spans``."""
    lines: list[str] = []
    fence: str | None = None
    for text in path.read_text(encoding="utf-8").splitlines():
        match = FENCE.match(text)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1).startswith(fence) and not match.group(2):
            fence = None
        elif fence is None:
            lines.append(text if code_spans else CODE_SPAN.sub("", text))
    return lines


def command_lines(block: Block) -> list[tuple[str, list[str]]]:
    """The block's command lines as (where, words): continuations joined; comments, prompts, environment dropped."""
    commands: list[tuple[str, list[str]]] = []
    pending, first = "", 0
    for offset, text in enumerate(block.lines, start=1):
        first = first or offset
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        line, pending = (pending + text).strip(), ""
        where, first = f"{block.path.relative_to(ROOT)}:{block.line + first}", 0
        if line.startswith("$ "):
            line = line[2:]
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            pytest.fail(f"{where}: cannot split {line!r} into words: {error}")
        while words and ENVIRONMENT.match(words[0]):
            words = words[1:]
        if words:
            commands.append((where, words))
    return commands


def command_blocks(path: Path) -> list[Block]:
    return [block for block in blocks(path) if block.language in COMMAND_FENCES]


def is_tuckersegment(words: list[str]) -> bool:
    return Path(words[0]).name == "tuckersegment"


def usage_error(words: list[str]) -> str | None:
    """Why ``tuckersegment``'s parser refuses these words, or None when it accepts them."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            namespace = build_parser().parse_args(words[1:])
    except SystemExit as stop:
        return None if stop.code in (0, None) else stderr.getvalue().strip() or f"exit status {stop.code}"
    paths = getattr(namespace, "paths", None)
    if namespace.command == "segment" and len(paths) < 2:
        return "segment needs INPUT... OUTPUT"
    if namespace.command == "distill":
        out_after_calibration = len(paths) == 1 and len(namespace.calibration) > 1
        if len(paths) + out_after_calibration != 2:
            return "distill needs COMPRESSED_DIR OUT_DIR"
    return None


@cache
def script_options(script: Path) -> frozenset[str] | None:
    """The option strings a script's argparse declares (read from its source), or None when it declares none."""
    options: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"), str(script))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            options.update(arg.value for arg in node.args
                           if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"))
    return frozenset(options | {"-h", "--help"}) if options else None


def script_problem(words: list[str]) -> str | None:
    """What is wrong with a ``bash scripts/X`` or ``python scripts/X.py`` line, or None (also for other lines)."""
    program = Path(words[0]).name
    if len(words) < 2 or not (program == "bash" or program in PYTHONS):
        return None
    if program == "bash" and not words[1].startswith("scripts/"):
        return None
    if program in PYTHONS and not words[1].endswith(".py"):
        return None
    script = ROOT / words[1]
    if not script.is_file():
        return f"{words[1]} does not exist"
    if program == "bash":
        return None
    declared = script_options(script)
    if declared is None:
        return None
    unknown = [word for word in words[2:] if word.startswith("-") and word.split("=", 1)[0] not in declared]
    return f"{words[1]} declares no option {', '.join(unknown)}" if unknown else None


def slug(heading: str) -> str:
    """GitHub's id for a heading: the rendered text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The heading ids of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    ids: set[str] = set()
    for text in prose(path, code_spans=True):
        match = HEADING.match(text)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            ids.add(base if count == 0 else f"{base}-{count}")
    return frozenset(ids)


def link_problem(page: Path, target: str) -> str | None:
    """Why a link of ``page`` to ``target`` is broken, or None when it resolves (web links are not checked)."""
    if SCHEME.match(target):
        return None
    location, _, anchor = target.partition("#")
    resolved = (page.parent / location).resolve() if location else page
    if not resolved.exists():
        return f"{target}: {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved} does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: {resolved.relative_to(ROOT)} has no heading #{anchor}"
    return None


def label(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_is_a_short_read() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the manual lives in docs/guide/"


def test_readme_links_every_guide_page() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for text in prose(README) for target in LINK.findall(text)}
    missing = [label(page) for page in sorted(GUIDE.glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md's 'Where to read more' does not link {', '.join(missing)}"


def test_the_docs_show_commands() -> None:
    """The collection itself works: the README's own examples are found (an empty collection would pass silently)."""
    commands = [words for block in command_blocks(README) for _, words in command_lines(block) if is_tuckersegment(words)]
    shown = {words[1] for words in commands}
    assert {"segment", "variants", "build-variants", "compress", "distill", "finetune", "evaluate", "info"} <= shown


@pytest.mark.parametrize("path", documents(), ids=label)
def test_every_tuckersegment_command_parses(path: Path) -> None:
    problems = [f"{where}: {shlex.join(words)}\n    {error}"
                for block in command_blocks(path) for where, words in command_lines(block)
                if is_tuckersegment(words) and (error := usage_error(words))]
    assert not problems, "commands the CLI refuses:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", documents(), ids=label)
def test_every_script_shown_exists_and_takes_its_options(path: Path) -> None:
    problems = [f"{where}: {shlex.join(words)}\n    {problem}"
                for block in command_blocks(path) for where, words in command_lines(block)
                if (problem := script_problem(words))]
    assert not problems, "scripts that do not run as shown:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", manual(), ids=label)
def test_every_python_block_compiles(path: Path) -> None:
    for block in blocks(path):
        if block.language in ("python", "py"):
            source = "\n".join(block.lines) + "\n"
            try:
                compile(source, block.where, "exec")
            except SyntaxError as error:
                pytest.fail(f"{block.where}: python block does not compile: {error}")


@pytest.mark.parametrize("path", manual(), ids=label)
def test_every_relative_link_resolves(path: Path) -> None:
    problems = [f"{label(path)}: [{target}] {problem}"
                for text in prose(path) for target in LINK.findall(text) if (problem := link_problem(path, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)
