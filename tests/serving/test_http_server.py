"""`nuwa-train serve` end to end: a real HTTP client on localhost gets `load_pruned`'s answers, bad requests get a
400 and the server keeps serving, Ctrl-C stops it and every process it started."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from nuwa_train.pruning import NuwaConfig
from nuwa_train.serving.http import count_images, request_problem

from .conftest import BUDGET, MAX_TOKENS, MODEL, VLLM_ENVIRONMENT, load_records, reference_answers

START_TIMEOUT_S = 900  # a cold start on a busy 2-core machine took ~100 s
REQUEST_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
RECORDS = 4  # asked over HTTP (the offline engine checks all 24)
SERVER_FLAGS = ["--max-model-len", "512", "--enforce-eager", "--dtype", "float32", "--max-num-seqs", "4"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat(url: str, parts: list[dict]) -> tuple[int, dict]:
    body = {
        "model": str(MODEL),
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def question(text: str, image_path) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": data_url(image_path)}}, {"type": "text", "text": text}]


@pytest.fixture(scope="module")
def server(serving_python):
    """(URL, process) of `nuwa-train serve` on a free port; stopped (and checked to stop) by the test that says so."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nuwa_train",
            "serve",
            str(MODEL),
            "--port",
            str(port),
            "--budget",
            str(BUDGET),
            *SERVER_FLAGS,
        ],
        env={**os.environ, **VLLM_ENVIRONMENT, "NUWA_SERVE_PYTHON": serving_python},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline()
        if line.startswith("serving "):
            break
    if not line.startswith("serving "):
        process.kill()
        pytest.fail(f"nuwa-train serve did not start (status {process.poll()})")
    assert f"http://127.0.0.1:{port}/v1" in line and "budget 64: 16 of 144 image tokens" in line
    # vLLM's own log shares the pipe: keep draining it, or a full pipe would block the server
    threading.Thread(target=process.stdout.read, daemon=True).start()
    yield f"http://127.0.0.1:{port}", process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(STOP_TIMEOUT_S)


def test_http_answers_equal_load_pruned_and_bad_requests_get_400(server):
    url, _ = server
    reference = reference_answers(NuwaConfig(method="nuwa_stage1", budget=BUDGET))
    records = load_records()[:RECORDS]
    for (text, image_path), answer in zip(records, reference.answers):
        status, response = chat(url, question(text, image_path))
        assert status == 200, response
        assert response["choices"][0]["token_ids"] == answer

    text, image_path = records[0]
    refused = {
        "no image": [{"type": "text", "text": text}],
        "two images": question(text, image_path)[:1] + question(text, image_path),
        "corrupt data URL": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA!notbase64"}},
            {"type": "text", "text": text},
        ],
        "not an image": [
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"plain text").decode()},
            },
            {"type": "text", "text": text},
        ],
    }
    for name, parts in refused.items():
        status, response = chat(url, parts)
        assert status == 400, (name, response)
        assert response["error"]["message"], name
    status, response = chat(url, question(text, image_path))  # still serving, same answer
    assert status == 200 and response["choices"][0]["token_ids"] == reference.answers[0]


def test_ctrl_c_stops_the_server_and_its_processes(server):
    url, process = server
    process.send_signal(signal.SIGINT)
    assert process.wait(STOP_TIMEOUT_S) == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    port = url.rsplit(":", 1)[1]
    left = subprocess.run(
        ["pgrep", "-f", f"api_server.entry.*--port {port}"], capture_output=True, text=True, check=False
    )
    assert left.stdout == "", f"vLLM processes left running: {left.stdout}"


def test_request_checks_without_a_server():
    assert count_images([{"role": "user", "content": [{"type": "image_url"}, {"type": "text"}]}]) == 1
    assert count_images([{"role": "user", "content": "just text"}]) == 0
    assert count_images("not a list") == 0
    assert "no image" in request_problem("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert (
        request_problem("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}')
        is None
    )
    assert request_problem("/v1/chat/completions", b"not json") is None  # vLLM answers it
    assert "/v1/chat/completions" in request_problem("/v1/completions", b"{}")
    assert request_problem("/v1/models", b"") is None
