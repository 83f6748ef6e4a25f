"""Logs a person can read: tables that survive a pipe, step lines in a log, no start-up notices to ignore."""

import io
import logging
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import yaml
from lightning.pytorch.callbacks import TQDMProgressBar

from nuwa_train.cli import main
from nuwa_train.commands.eval import TRAINING_FREE
from nuwa_train.lightning.progress import (
    StepLogProgress,
    StepRichProgressBar,
    duration,
    progress_callback,
    with_progress,
)
from nuwa_train.logs import (
    PIPED_WIDTH,
    STARTUP_LOG_NOTICES,
    print_text,
    quiet_startup_notices,
    report_console,
)

FIT_STEPS = 4
FIT_TIMEOUT_SECONDS = 300
NOTICE_FRAGMENTS = [fragment for _, fragment in STARTUP_LOG_NOTICES] + ["LeafSpec"]


# ----------------------------------------------------------------------------------------------- tables
def test_a_table_line_is_printed_whole_and_as_written_whatever_the_width():
    stream = io.StringIO()
    console = report_console(stream)
    assert console.width == PIPED_WIDTH  # not a terminal: not rich's 80 columns
    row = "| Nüwa | 64 | " + " | ".join(["[0.39, 0.57, 0.52, 0.88]"] * 12) + " | [bold]note[/bold] |"
    assert len(row) > PIPED_WIDTH
    print_text(console, row)
    assert stream.getvalue() == row + "\n"  # one line, brackets kept (not read as markup), no wrapping


def test_eval_compare_prints_the_header_once_then_each_row_once(tiny_base_dir, tmp_path, capsys):
    main(["eval", "--model", tiny_base_dir, "--images", "2", "--compare", "--budgets", "64", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = [line for line in lines if line.startswith("| method |")]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method |")]
    assert len(header) == 1 and sum(line.startswith("## ") for line in lines) == 1
    assert len(rows) == 1 + len(TRAINING_FREE)  # full tokens, then every pruner at 64, each printed once
    assert [row.split(" | ")[0] for row in rows] == ["| full tokens"] + [f"| {label}" for label, _ in TRAINING_FREE]
    written = (tmp_path / "results.md").read_text().splitlines()
    assert [line for line in written if line.startswith("| ")] == header + rows  # the file's lines, unwrapped
    assert lines.index(header[0]) < lines.index(rows[0])
    assert "so far" not in captured.out and "━" not in captured.out  # progress bars are on stderr
    assert "full tokens" in captured.err


# ----------------------------------------------------------------------------------------------- progress
def test_the_progress_callback_follows_stdout_and_a_recipe_keeps_its_own_bar():
    piped = io.StringIO()
    assert isinstance(progress_callback(piped), StepLogProgress)
    terminal = SimpleNamespace(isatty=lambda: True)
    assert isinstance(progress_callback(terminal), StepRichProgressBar)
    own = TQDMProgressBar()
    assert with_progress([own], None) is None  # the recipe's choice wins
    assert with_progress(None, False) is None  # progress turned off
    added = with_progress(None, None)
    assert len(added) == 1 and isinstance(added[0], (StepLogProgress, StepRichProgressBar))
    other = object()
    assert with_progress(other, None)[0] is other  # a single callback stays


def test_the_bar_of_a_step_bounded_run_counts_steps_not_epoch_minus_two():
    bar = StepRichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(0).strip() == "steps"
    bar._trainer = SimpleNamespace(max_epochs=3)  # an epoch-bounded run keeps Lightning's "Epoch 0/2"
    assert bar._get_train_description(0).strip() == "Epoch 0/2"


def test_durations_read_as_an_eta():
    assert [duration(s) for s in (9.6, 460, 3900)] == ["10s", "7m40s", "1h05m"]


def test_a_piped_fit_writes_step_lines_and_none_of_the_startup_notices(tiny_base_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 1,
                    "max_steps": FIT_STEPS,
                    "limit_val_batches": 0,
                    "num_sanity_val_steps": 0,
                    "enable_model_summary": False,
                    "use_distributed_sampler": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(tmp_path / "run")},
                    },
                },
                "model": {"model_path": tiny_base_dir, "lora": {"rank": 4, "dropout": 0.0}},
                "data": {"batch_size": 2, "train_images": 4, "val_images": 2},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "nuwa_train", "fit", "--config", str(recipe)],
        capture_output=True,
        text=True,
        timeout=FIT_TIMEOUT_SECONDS,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    pattern = re.compile(rf"step (\d+)/{FIT_STEPS} \(\d+%\) loss [\d.e+-]+ .*[\d.]+ it/s ETA \d+s$")
    assert [int(pattern.match(line).group(1)) for line in steps] == list(range(1, FIT_STEPS + 1)), done.stdout
    assert steps[-1].startswith(f"step {FIT_STEPS}/{FIT_STEPS} (100%)")
    assert "Epoch" not in done.stdout and "/-2" not in done.stdout
    for fragment in NOTICE_FRAGMENTS:
        assert fragment not in done.stderr, fragment


# ----------------------------------------------------------------------------------------------- notices
def test_startup_notices_are_dropped_by_message_and_the_same_loggers_still_speak(caplog):
    quiet_startup_notices()
    quiet_startup_notices()  # idempotent: one filter per logger
    with caplog.at_level(logging.INFO):
        for name, fragment in STARTUP_LOG_NOTICES:
            logger = logging.getLogger(name)
            assert len(logger.filters) == 1
            logger.warning("a notice that %s here", fragment)
            logger.warning("something the user needs to know")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["something the user needs to know"] * len(STARTUP_LOG_NOTICES)


def test_startup_warnings_are_dropped_by_message_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_startup_notices()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use something else", FutureWarning, stacklevel=1)
        warnings.warn("another FutureWarning the user should see", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["another FutureWarning the user should see"]
