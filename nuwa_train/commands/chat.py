"""`nuwa-train chat`: ask a model about an image from the command line, pruned as it runs in evaluation.

`nuwa-train chat MODEL --image PATH --prompt TEXT` answers one question; the answer is the last line of stdout.
Without --prompt, questions are read from stdin one per line until EOF or "exit", and the conversation is kept:
each turn sees the earlier questions and answers. Each turn runs the whole conversation again, image included,
rather than continuing a KV cache: Nüwa prunes at prefill, its stage 2 (and FastV) choose the tokens by the
question being asked, and `generate` cannot continue a cache that is shorter than the conversation's input_ids.
So every answer is computed exactly as `nuwa-train eval` computes one, on the tokens chosen for its question.

Answers are in the model's own format; an answer that holds a box (the model's box format, data/boxes.py) is
also given in pixels of the input image on stderr, with the kept-token overlay (PNG) of the last turn.
MODEL is an export (its nuwa_config.json: trained pruning, loaded with `load_pruned`) or a plain HF model
directory (pruned with --method / --budget, default NuwaConfig's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data.collate import VisionLanguageCollator
from ..data.geometry import Box01
from ..errors import UsageError
from ..evaluation import generate_answers, question_collator
from ..export import NUWA_CONFIG_NAME, load_pruned, read_nuwa_config
from ..models import attach_nuwa
from ..models.families import base_model
from ..models.loading import load_vlm
from ..models.sequence import KeptTokens
from ..pruning import NuwaConfig
from .arguments import add_command, positive_int

DEFAULT_MAX_NEW_TOKENS = 128  # a chat answer may be a sentence; the tiny base stops at end-of-sequence long before
EXIT_WORDS = ("exit", "quit")
PROMPT_MARK = "> "  # shown on stderr when a person types the questions


class ChatError(UsageError):
    """An image, question or model that chat cannot use; the message names it."""


@dataclass(frozen=True)
class Reply:
    """One answer: the model's text, the box it holds (fractions of the input image) and the kept tokens."""

    text: str
    box: Box01 | None
    box_pixels: tuple[int, int, int, int] | None
    kept: KeptTokens | None


def read_image(path: str | Path):
    """The RGB image at `path`, or a ChatError naming the path and what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ChatError(f"--image {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ChatError(f"--image {path} cannot be read as an image ({error})") from None


def load_chat_model(model: str | Path, method: str | None = None, budget: int | None = None):
    """(model with pruning attached, processor, the pruning it runs, where that came from).

    An export runs its nuwa_config.json (loaded by `load_pruned`), a plain model directory NuwaConfig's defaults;
    `method` / `budget` replace those settings.
    """
    path = Path(model)
    trained = read_nuwa_config(path) if path.is_dir() else None
    config = trained or NuwaConfig()
    chosen = {key: value for key, value in (("method", method), ("budget", budget)) if value is not None}
    config = replace(config, **chosen)
    source = f"{NUWA_CONFIG_NAME} of the export" if trained else "defaults"
    if chosen:
        source += " with " + ", ".join(f"--{key}" for key in chosen)
    if trained is not None:
        vlm, processor = load_pruned(path, config=config, return_processor=True)
    else:
        vlm, processor = load_vlm(path)
        vlm.eval()
        attach_nuwa(vlm, config)
    return vlm, processor, config, source


@dataclass
class ChatSession:
    """A conversation about one image with a pruned model (`load_chat_model`)."""

    model: object
    processor: object
    image: object  # the input image (PIL, RGB)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    turns: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.collator: VisionLanguageCollator = question_collator(self.model, self.processor)
        self.model_image = self.collator.native_image(self.image)  # e.g. LLaVA's padded square
        self.frame = self.collator.image_frame(self.image)

    @property
    def handle(self):
        return base_model(self.model)._nuwa

    @property
    def box_format(self):
        return self.collator.box_format

    def inputs(self, question: str) -> dict:
        """The model inputs of the conversation so far followed by `question` (the image in the first turn)."""
        messages = VisionLanguageCollator._chat(self.turns, question)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(self.processor(images=[self.model_image], text=[text], return_tensors="pt"))

    @torch.no_grad()
    def ask(self, question: str) -> Reply:
        question = question.strip()
        if not question:
            raise ChatError("the question is empty")
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in question:
            raise ChatError(f"the question must not contain {image_token!r}: the image is placed by the chat template")
        answer = generate_answers(self.model, self.processor.tokenizer, self.inputs(question), self.max_new_tokens)[
            0
        ].strip()
        self.turns.append((question, answer))
        box = self.box_format.parse(answer, self.frame) if self.box_format is not None else None
        kept = self.handle.kept.first_image_of(0) if self.handle.config.method != "none" else None
        return Reply(answer, box, None if box is None else self.pixels(box), kept)

    def pixels(self, box: Box01) -> tuple[int, int, int, int]:
        """A box in pixels of the input image (x1, y1, x2, y2)."""
        width, height = self.image.size
        x1, y1, x2, y2 = box
        return round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)

    def write_overlay(self, kept: KeptTokens, path: Path) -> Path | None:
        """The kept tokens of the last turn drawn on the image the model saw (None: the family's grid varies with
        the image, e.g. Qwen-VL, which the overlay does not draw yet)."""
        from ..viz import plot_kept_tokens

        grid = self.handle.adapter.grid
        if grid is None:
            return None
        label = f"{self.handle.config.method} @ {self.handle.config.budget}"
        return plot_kept_tokens([self.model_image], [(label, [kept])], grid, path)


def default_overlay_path(image: Path) -> Path:
    return Path(tempfile.gettempdir()) / f"nuwa-chat-{image.stem}-kept-tokens.png"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _report(session: ChatSession, reply: Reply, overlay: Path | None) -> None:
    """The answer on stdout (its last line), what goes with it on stderr (the overlay's path after the first)."""
    if reply.box_pixels is not None:
        width, height = session.image.size
        _say(f"box: {reply.box_pixels} in pixels (x1, y1, x2, y2) of the {width}x{height} input image")
    if overlay is not None and reply.kept is not None:
        written = session.write_overlay(reply.kept, overlay)
        if written is not None and len(session.turns) == 1:
            _say(f"kept tokens: {written} (redrawn for each answer)")
    if not reply.text:
        _say("(an empty answer: the model ended its answer at once)")
    print(reply.text, flush=True)


def questions_from(lines: Iterable[str], interactive: bool) -> Iterable[str]:
    """Questions typed one per line, until EOF or an exit word; blank lines are skipped."""
    lines = iter(lines)
    while True:
        if interactive:
            print(PROMPT_MARK, end="", file=sys.stderr, flush=True)
        line = next(lines, None)
        if line is None or line.strip().lower() in EXIT_WORDS:
            return
        if line.strip():
            yield line


def run_chat(args: argparse.Namespace) -> None:
    """`nuwa-train chat` (see the module docstring)."""
    if args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.prompt is not None and not args.prompt.strip():
        raise ChatError("--prompt is empty")
    image = read_image(args.image)
    model, processor, config, source = load_chat_model(args.model, args.method, args.budget)
    kept = "all vision tokens" if config.method == "none" else f"{config.method} at budget {config.budget}"
    _say(f"{args.model}: {kept} ({source})")
    session = ChatSession(model, processor, image, args.max_new_tokens)
    overlay = None if args.no_overlay else Path(args.overlay or default_overlay_path(Path(args.image)))
    if args.prompt is not None:
        _report(session, session.ask(args.prompt), overlay)
        return
    if session.box_format is not None:
        _say(f"ask for a box as: {session.box_format.prompt('<expression>')!r}")
    _say(f"one question per line; {' or '.join(EXIT_WORDS)} (or end of input) ends the conversation")
    for question in questions_from(sys.stdin, sys.stdin.isatty()):
        try:
            reply = session.ask(question)
        except ChatError as error:  # a bad question: say why and go on with the conversation
            _say(f"error: {error}")
            continue
        _report(session, reply, overlay)


NAME = "chat"
SUMMARY = "ask a model about an image (one --prompt, or a conversation read from stdin)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The flags of `nuwa-train chat`, and its handler."""
    from ..pruning.selectors import METHODS

    chat = add_command(subparsers, NAME, SUMMARY)
    chat.add_argument(
        "model", help="an export (runs its nuwa_config.json) or a HF model directory, e.g. data/tiny_base"
    )
    chat.add_argument("--image", required=True, help="the image to ask about (PNG, JPEG, ...)")
    chat.add_argument(
        "--prompt",
        help="one question; its answer is the last line of stdout (default: questions "
        "from stdin, one per line, until EOF or 'exit')",
    )
    chat.add_argument("--method", choices=METHODS, help="pruner (default: the export's, else NuwaConfig's)")
    chat.add_argument(
        "--budget",
        type=positive_int,
        help="average vision tokens per image on the 24x24 grid (default: the export's, else NuwaConfig's)",
    )
    chat.add_argument(
        "--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, help="longest answer in tokens"
    )
    chat.add_argument(
        "--overlay",
        help="PNG of the kept tokens of the last answer (default: nuwa-chat-<image>-"
        "kept-tokens.png in the temp folder; its path is printed on stderr)",
    )
    chat.add_argument("--no-overlay", action="store_true", help="do not draw the kept tokens")
    chat.set_defaults(handler=run_chat)
