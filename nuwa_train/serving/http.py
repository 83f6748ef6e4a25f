"""Request checks of the served API (vLLM `--middleware`, added by `nuwa-train serve`): one image per request.

A LLaVA-1.5 model is asked about one image. vLLM itself answers a chat request without an image with text (the
pruned model never saw such a prompt in training) and a plain completion request cannot carry an image at all, so
both get a 400 that says what to send; two images and unreadable images are refused by vLLM itself.
"""

from __future__ import annotations

import json

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
IMAGE_PART_TYPES = ("image_url", "input_image", "image_pil", "image_embeds")
BAD_REQUEST = 400


def count_images(messages: object) -> int:
    """Image parts in an OpenAI chat `messages` list (anything else counts no image)."""
    if not isinstance(messages, list):
        return 0
    parts = [
        part
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    ]
    return sum(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES for part in parts)


def request_problem(path: str, body: bytes) -> str | None:
    """Why a request to `path` cannot be answered about one image (None: pass it on; vLLM checks the rest)."""
    if path == COMPLETIONS_PATH:
        return f"this server answers questions about one image: send them to {CHAT_PATH}"
    if path != CHAT_PATH:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None  # vLLM answers malformed JSON itself
    if not isinstance(request, dict):
        return None
    images = count_images(request.get("messages"))
    if images == 0:
        return (
            "the request has no image: this server answers questions about one image (add a message part "
            '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}})'
        )
    return None


async def one_image_per_request(request, call_next):
    """ASGI middleware (Starlette's `@app.middleware("http")` form)."""
    if request.method == "POST":
        problem = request_problem(request.url.path, await request.body())
        if problem is not None:
            from starlette.responses import JSONResponse

            return JSONResponse(
                {"error": {"message": problem, "type": "BadRequestError", "param": "messages", "code": BAD_REQUEST}},
                status_code=BAD_REQUEST,
            )
    return await call_next(request)
