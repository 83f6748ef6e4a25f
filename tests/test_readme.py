"""The README runs as written, so it cannot drift from the code.

How the README is run:
- It is cut into sections at its `##` / `###` headings. The sections run in README order in one working copy (a
  temporary folder with copies of the `data/` folders it names, `recipes/` and `launch.sh`), so a later section can
  use what an earlier one wrote: the Fine-tune section's checkpoint is what Export and load exports, and its export
  is what Evaluate loads. A section selected alone (`-k Evaluate`) first runs the sections before it.
- Within a section, blocks run in order. Consecutive ```python blocks are concatenated into one script and run in
  one fresh interpreter (so a later block may use an earlier block's variables); consecutive commands of
  ```bash / ```console blocks run in one interpreter through `nuwa_train.cli.main` (the `nuwa-train` entry point),
  which saves a start-up per command. A ```yaml block whose first line is `# file: NAME` is written to NAME.
- Every command line must be one this file knows (`nuwa-train`, `python -m nuwa_train`, `./launch.sh`); any other
  line fails the test. `nuwa-train` commands run with the flags of SHRINK appended (later flags win), which cut
  them to a few steps or records; those in NOT_RUN (with the reason) are checked with `--help` instead.
  `./launch.sh` commands run with `--dry-run`: it checks the options and prints the command without setting up
  or running anything, so the demo, the test suite, lmms-eval and multi-node launches are checked, not run.
- A ```text block of `$ nuwa-train ...` lines is a transcript: each command runs as it is (these show errors, which
  come fast), and what it prints must be the lines that follow it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def as_flags(settings: dict) -> list[str]:
    """{"trainer.max_steps": 2} -> ["--trainer.max_steps", "2"]."""
    return [part for key, value in settings.items() for part in (f"--{key}", str(value))]


# Flags appended to each `nuwa-train` subcommand so that the README's commands finish in seconds on the tiny base.
FIT_SHRINK = as_flags(
    {
        "trainer.max_steps": 2,
        "trainer.val_check_interval": 2,
        "trainer.limit_val_batches": 1,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": "false",
        "data.train_images": 8,
        "data.val_images": 2,
        "data.batch_size": 4,
        "model.eval_records": 4,
    }
)
SHRINK = {
    "fit": FIT_SHRINK,
    "validate": ["--data.val_images", "2", "--model.eval_records", "4", "--trainer.enable_progress_bar", "false"],
    "test": ["--data.test_images", "2", "--model.test_records", "4", "--trainer.enable_progress_bar", "false"],
    "eval": ["--images", "2", "--limit", "4", "--budgets", "64"],  # --budgets: the pruners of --compare at one budget
    "export": [],
    "export-data": ["--images", "8"],
    "chat": [],  # one question to the tiny model: seconds
    "serve": ["--dry-run"],  # vLLM runs in its own environment, for as long as it serves: the command is checked
}
# The serving environment `serve --dry-run` names; a test machine has none (vLLM is not installed for tests).
DRY_RUN_ENVIRONMENT = {"NUWA_SERVE_PYTHON": sys.executable}
# `nuwa-train` subcommands that cannot run in a test, with the reason; the README's lines are checked with --help.
NOT_RUN = {
    "demo": "the main job: three fine-tunes of 1250 steps, ~15 minutes",
    "pretrain-base": "pre-trains the tiny base: hours",
    "bench": "timings: minutes per shape, and meaningless on a busy machine",
}
# Files a README command expects the user to have written (the command refers to them; it does not create them).
USERS_FILES = {"hosts": "node-a slots=8\nnode-b slots=8\n"}  # a DeepSpeed hostfile
COMMAND_TIMEOUT_S = 600
ENTRY_POINT = "nuwa-train"
MODULE_ENTRY = ["python", "-m", "nuwa_train"]
LAUNCHER = "./launch.sh"
FILE_MARKER = re.compile(r"^#\s*file:\s*(\S+)\s*$")
TRANSCRIPT_PROMPT = "$ "


@dataclass
class Step:
    kind: str  # "python", "commands", "file" or "transcript"
    lines: list[str] = field(default_factory=list)  # python source lines, command lines, or file lines
    name: str = ""  # the file a "file" step writes


@dataclass
class Section:
    title: str
    steps: list[Step] = field(default_factory=list)


def fenced_blocks(text: str) -> list[tuple[str, str, list[str]]]:
    """(section title, language, lines) of every fenced block, the title being the nearest heading above."""
    blocks, title, language, lines = [], "", None, []
    for line in text.splitlines():
        if language is None:
            if line.startswith("#") and not line.startswith("#!"):
                title = line.lstrip("#").strip()
            elif line.startswith("```"):
                language, lines = line[3:].strip() or "text", []
        elif line.startswith("```"):
            blocks.append((title, language, lines))
            language = None
        else:
            lines.append(line)
    assert language is None, "README.md has an unclosed ``` block"
    return blocks


def command_lines(lines: list[str]) -> list[str]:
    """Shell lines of a block, continuation lines joined and `$ ` prompts dropped; blank and comment lines skipped."""
    joined, pending = [], ""
    for line in lines:
        line = line.removeprefix("$ ")
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            joined.append(line.strip())
    return joined


def readme_sections(text: str) -> list[Section]:
    sections: list[Section] = []
    for title, language, lines in fenced_blocks(text):
        if not sections or sections[-1].title != title:
            sections.append(Section(title))
        steps = sections[-1].steps
        if language == "python":
            kind, content, name = "python", lines, ""
        elif language in ("bash", "console", "shell", "sh"):
            kind, content, name = "commands", command_lines(lines), ""
        elif language in ("yaml", "yml") and lines and FILE_MARKER.match(lines[0]):
            kind, content, name = "file", lines[1:], FILE_MARKER.match(lines[0]).group(1)
        elif language == "text" and lines and lines[0].startswith(TRANSCRIPT_PROMPT):
            kind, content, name = "transcript", lines, ""
        else:
            continue  # text, json, a yaml excerpt: shown, not run
        if steps and steps[-1].kind == kind and kind in ("python", "commands"):
            steps[-1].lines += content
        else:
            steps.append(Step(kind, list(content), name))
    return [section for section in sections if section.steps]


@dataclass
class Command:
    """One README command line as it will be checked: in-process argv, or a launch.sh dry run."""

    line: str
    environment: dict[str, str]
    argv: list[str]  # nuwa-train arguments (without the program), or launch.sh arguments
    launcher: bool


def parse_command(line: str) -> Command:
    words = shlex.split(line, comments=True)
    environment = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        environment[key] = value
    if words[:1] == [ENTRY_POINT]:
        return Command(line, environment, words[1:], launcher=False)
    if words[:3] == MODULE_ENTRY:
        return Command(line, environment, words[3:], launcher=False)
    if words[:1] == [LAUNCHER]:
        return Command(line, environment, words[1:], launcher=True)
    raise AssertionError(
        f"README command {line!r} is neither a `{ENTRY_POINT}`, `python -m nuwa_train` nor "
        f"`{LAUNCHER}` command: teach tests/test_readme.py how to run or check it"
    )


def checked_argv(command: Command) -> list[str]:
    """What runs in the test for a nuwa-train command: shrunk, or --help for one that cannot run here."""
    subcommand = command.argv[0]
    if subcommand in NOT_RUN:
        return [subcommand, "--help"]
    if subcommand not in SHRINK:
        raise AssertionError(
            f"README command {command.line!r}: `{subcommand}` is in neither SHRINK nor NOT_RUN of "
            f"tests/test_readme.py; say how to shrink it or why it cannot run"
        )
    return command.argv + SHRINK[subcommand]


DRIVER = """
import json, sys
from nuwa_train.cli import main

for line, argv in json.loads(sys.argv[1]):
    print(f"\\n=== README command: {line}\\n=== runs as: nuwa-train {' '.join(argv)}", flush=True)
    try:
        main(argv)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            print(f"=== FAILED with exit status {stop.code!r}: {line}", flush=True)
            raise
"""


def run_process(argv: list[str], cwd: Path, what: str, environment: dict[str, str] | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(environment or {})}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{what} failed (exit status {done.returncode}):\n{output[-6000:]}"
    return output


def run_commands(lines: list[str], cwd: Path, title: str) -> None:
    commands = [parse_command(line) for line in lines]
    in_process = [(c.line, checked_argv(c)) for c in commands if not c.launcher]
    for command in commands:  # environment variables of a nuwa-train line would need a process of its own
        assert command.launcher or not command.environment, (
            f"{command.line!r}: environment variables are only supported before {LAUNCHER}"
        )
    if in_process:
        import json

        run_process(
            [sys.executable, "-c", DRIVER, json.dumps(in_process)],
            cwd,
            f"README section {title!r}, commands {[line for line, _ in in_process]}",
            DRY_RUN_ENVIRONMENT,
        )
    for command in (c for c in commands if c.launcher):
        argv = command.argv if "--dry-run" in command.argv else ["--dry-run", *command.argv]
        printed = run_process(
            ["bash", LAUNCHER, *argv], cwd, f"README command {command.line!r} (as a dry run)", command.environment
        )
        assert printed.strip(), f"{command.line!r}: the dry run printed no command"


def transcript(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(command, the lines it prints) of a `$ command` transcript."""
    shown: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith(TRANSCRIPT_PROMPT):
            shown.append((line.removeprefix(TRANSCRIPT_PROMPT), []))
        else:
            shown[-1][1].append(line)
    return shown


def run_transcript(lines: list[str], cwd: Path) -> None:
    for line, expected in transcript(lines):
        command = parse_command(line)
        assert not command.launcher, f"{line!r}: transcripts show nuwa-train commands"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "nuwa_train", *command.argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        printed = (done.stdout + done.stderr).splitlines()
        assert printed == expected, f"README transcript {line!r} prints, now:\n" + "\n".join(printed)


@pytest.fixture(scope="module")
def working_copy(tmp_path_factory) -> Path:
    """Where the README's commands run: what they read from the repository, copied, and room for what they write."""
    copy = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "recipes", copy / "recipes")
    # the data folders the README names (others may be being written meanwhile: a base in training exports there)
    for name in sorted(set(re.findall(r"\bdata/([\w.-]+)", README.read_text()))):
        if (ROOT / "data" / name).is_dir():
            shutil.copytree(ROOT / "data" / name, copy / "data" / name, symlinks=True)
    shutil.copy2(ROOT / "launch.sh", copy / "launch.sh")
    for name, text in USERS_FILES.items():
        (copy / name).write_text(text)
    return copy


def run_section(section: Section, working_copy: Path) -> None:
    for step in section.steps:
        if step.kind == "file":
            (working_copy / step.name).write_text("\n".join(step.lines) + "\n")
        elif step.kind == "transcript":
            run_transcript(step.lines, working_copy)
        elif step.kind == "python":
            run_process(
                [sys.executable, "-c", "\n".join(step.lines)],
                working_copy,
                f"README section {section.title!r}, its Python blocks",
            )
        else:
            run_commands(step.lines, working_copy, section.title)


@pytest.fixture(scope="module")
def sections_run() -> list[str]:
    """Titles of the sections run so far in this module's working copy, in order."""
    return []


SECTIONS = readme_sections(README.read_text())


@pytest.mark.parametrize("section", SECTIONS, ids=[s.title for s in SECTIONS])
def test_readme_section_runs_as_written(section: Section, working_copy: Path, sections_run: list[str]):
    for earlier in SECTIONS[: SECTIONS.index(section)]:
        if earlier.title not in sections_run:  # selected alone: what it builds on runs first
            sections_run.append(earlier.title)
            run_section(earlier, working_copy)
    sections_run.append(section.title)
    run_section(section, working_copy)


def test_the_readme_has_the_quick_start_and_its_test_command_is_what_ci_runs():
    quick_start = next(s for s in SECTIONS if s.title == "Quick start")
    commands = [shlex.split(line, comments=True) for step in quick_start.steps for line in step.lines]
    assert commands == [[LAUNCHER, "demo"], [LAUNCHER, "test"]], "the quick start is two commands: demo and tests"
    ci = [
        shlex.split(line.split("||")[0], comments=True)
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith(LAUNCHER)
    ]
    assert [LAUNCHER, "test", "-q"] in ci, f".ci/run must run the README's test command (quietly), found {ci}"
    for command in ci:  # what CI runs, the README says
        assert f"`{shlex.join(command)}`" in README.read_text(), f"README does not mention CI's `{shlex.join(command)}`"


def test_every_command_line_is_known_and_the_unknown_ones_fail():
    """The README cannot gain a command this file neither runs nor explains (the guard the other tests rely on)."""
    for section in SECTIONS:
        for step in (s for s in section.steps if s.kind == "commands"):
            for line in step.lines:
                command = parse_command(line)
                if not command.launcher:
                    checked_argv(command)
    with pytest.raises(AssertionError, match="teach tests/test_readme.py"):
        parse_command("pip install nuwa-train")
    with pytest.raises(AssertionError, match="in neither SHRINK nor NOT_RUN"):
        checked_argv(parse_command("nuwa-train frobnicate --now"))
    assert checked_argv(parse_command("nuwa-train demo --methods nuwa")) == ["demo", "--help"]
    assert checked_argv(parse_command("python -m nuwa_train eval --model m"))[-len(SHRINK["eval"]) :] == SHRINK["eval"]


def test_the_readme_is_parsed_into_runnable_sections():
    text = "\n".join(
        [
            "## A",
            "```python",
            "x = 1",
            "```",
            "```python",
            "print(x)",
            "```",
            "```bash",
            "nuwa-train eval --model m \\",
            "    --limit 2   # a comment",
            "# a whole-line comment",
            "```",
            "### B",
            "```yaml",
            "# file: my.yaml",
            "data: {}",
            "```",
            "```yaml",
            "not: run",
            "```",
            "```text",
            "t",
            "```",
        ]
    )
    first, second = readme_sections(text)
    assert first.title == "A" and [s.kind for s in first.steps] == ["python", "commands"]
    assert first.steps[0].lines == ["x = 1", "print(x)"]
    assert first.steps[1].lines == ["nuwa-train eval --model m      --limit 2   # a comment"]
    assert parse_command(first.steps[1].lines[0]).argv == ["eval", "--model", "m", "--limit", "2"]
    assert [(s.kind, s.name, s.lines) for s in second.steps] == [("file", "my.yaml", ["data: {}"])]
    assert parse_command("NUWA_X=1 ./launch.sh lmms-eval --model nuwa").environment == {"NUWA_X": "1"}
    shown = readme_sections(
        "\n".join(["## C", "```text", "$ nuwa-train eval --x", "usage", "error", "$ nuwa-train b", "```"])
    )
    assert transcript(shown[0].steps[0].lines) == [("nuwa-train eval --x", ["usage", "error"]), ("nuwa-train b", [])]


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_relative_link_of_the_readme_and_its_docs_resolves():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target:
                continue
            linked = (page.parent / target) if target else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                assert anchor in heading_anchors(linked.read_text()), (
                    f"{page.relative_to(ROOT)} links to {target}#{anchor}: no such heading"
                )


def test_the_docs_commands_name_existing_subcommands_and_flags():
    """The docs pages are not run (their commands train for hours or need a GPU), but each `nuwa-train` line there
    must still parse: a renamed command or flag fails here, not in a reader's shell."""
    from nuwa_train.cli import LIGHTNING_COMMANDS, build_parser

    parser, checked = build_parser(), 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        for _, language, lines in fenced_blocks(page.read_text()):
            if language not in ("bash", "console", "shell", "sh"):
                continue
            for line in command_lines(lines):
                words = shlex.split(line, comments=True)
                if words[:1] != [ENTRY_POINT] or words[1] in LIGHTNING_COMMANDS:
                    continue  # LightningCLI's flags come from the recipe: the README's fit lines run instead
                try:
                    parser.parse_args(words[1:])
                except SystemExit:
                    pytest.fail(f"{page.relative_to(ROOT)}: {line!r} does not parse as a nuwa-train command")
                checked += 1
    assert checked > 0
