"""What nuwa-train prints for people: tables that survive a pipe, and no library notices that ask nothing of them.

A results table is data: printed through rich at the console's width (80 columns when stdout is not a terminal)
its rows would be cut into pieces in a log file, and rich would read "[...]" in it as markup. Libraries also
print notices at every start-up that concern their own maintainers or sales, not a person training a model;
`quiet_startup_notices` filters exactly those messages (never a whole category or logger).
"""

from __future__ import annotations

import logging
import warnings

PIPED_WIDTH = 200  # columns of a console that is not a terminal (rich assumes 80): rules and bars in a log file

# (logger, a fragment of the message): notices every start-up printed that are not the user's concern.
STARTUP_LOG_NOTICES = (
    # the Pil image processor transformers falls back to is the one the project uses on purpose (no torchvision)
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    # an advertisement for a cloud logger, at every Trainer start
    ("lightning.pytorch.utilities.rank_zero", "try installing [litlogger]"),
    # bitsandbytes (pulled in by peft when installed) tries to download a 4-bit CPU kernel nuwa-train never uses
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)
# warnings.filterwarnings message patterns (regular expressions matched at the start of the message).
STARTUP_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch deprecates what Lightning's _pytree still uses
)


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of `fragments`; every other record of the logger passes."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_startup_notices() -> None:
    """Install the filters of STARTUP_LOG_NOTICES and STARTUP_WARNINGS (idempotent; call before importing the
    libraries, as some notices are printed at import)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, fragment in STARTUP_LOG_NOTICES:
        by_logger[name] = by_logger.get(name, ()) + (fragment,)
    for name, fragments in by_logger.items():
        logger = logging.getLogger(name)  # the same object the library gets later
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    for pattern in STARTUP_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def report_console(file=None):
    """A rich console for results and status lines: the terminal's width on a terminal, PIPED_WIDTH otherwise."""
    from rich.console import Console

    console = Console(file=file)
    return console if console.is_terminal else Console(file=file, width=PIPED_WIDTH)


def print_text(console, text: str) -> None:
    """Print `text` as it is: never wrapped at the console's width (a table row stays one line, whatever the
    terminal or pipe) and never read as rich markup (answers such as "[0.39, 0.57, 0.52, 0.88]" are data)."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)
