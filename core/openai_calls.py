"""Chat requests to an OpenAI-compatible endpoint, as the offline pipelines (data preparation,
evaluation) need them: bounded concurrency (one semaphore per endpoint), a hard per-request timeout,
retries with exponential backoff and full jitter, token usage counted from each reply, and a fatal
error (not a retry) when the endpoint refuses us outright (bad key, unknown model or route), so a
misconfigured run stops at its first request instead of marking every item failed.

The API key comes only from the environment variable the caller names; it is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
from dataclasses import dataclass

from core.records import Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to send chat requests and how."""

    base_url: str
    model: str
    key_env: str | None = None
    """Name of the environment variable holding the API key; None: no key (local servers)."""
    temperature: float = 1.0
    max_tokens: int = 8192
    timeout_s: float = 300.0
    """Hard limit on one request, response included."""
    max_attempts: int = 4
    """Tries per request (1 = no retry)."""
    backoff_s: float = 1.0
    """First retry waits up to this long (full jitter); each later retry doubles it, capped at 60 s."""

    def api_key(self) -> str:
        if self.key_env is None:
            return "EMPTY"
        key = os.environ.get(self.key_env, "")
        if not key:
            raise ValueError(f"environment variable {self.key_env} is empty; export the API key there or drop the key flag")
        return key


@dataclass(frozen=True, slots=True)
class ChatReply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class FatalEndpointError(RuntimeError):
    """The endpoint refuses every request (401, 403, 404: key, permission, model or route)."""


class RequestFailed(RuntimeError):
    """One request failed: rejected (400, 422: e.g. too long) or still failing after every attempt
    (timeouts, 5xx, 429, connection errors)."""


class ChatClient:
    """One endpoint's AsyncOpenAI client behind a semaphore of `concurrency` in-flight requests."""

    def __init__(self, endpoint: Endpoint, *, concurrency: int, seed: int = 0) -> None:
        from openai import AsyncOpenAI

        self.endpoint = endpoint
        self._key = endpoint.api_key()
        self._client = AsyncOpenAI(base_url=endpoint.base_url, api_key=self._key, max_retries=0, timeout=endpoint.timeout_s)
        self._slots = asyncio.Semaphore(concurrency)
        self._rng = random.Random(seed)
        self.num_requests = 0
        """HTTP requests sent, retries included."""
        self.num_retries = 0
        self._fatal: FatalEndpointError | None = None

    async def chat(self, messages: list[dict]) -> ChatReply:
        """One completion, retried on transient failures; raises RequestFailed or FatalEndpointError."""
        import openai

        ep = self.endpoint
        for attempt in range(ep.max_attempts):
            try:
                async with self._slots:
                    if self._fatal is not None:  # another request already learnt that none can succeed
                        raise self._fatal
                    self.num_requests += 1
                    async with asyncio.timeout(ep.timeout_s):
                        response = await self._client.chat.completions.create(
                            model=ep.model, messages=messages, temperature=ep.temperature, max_tokens=ep.max_tokens
                        )
                return _reply(response)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                self._fatal = FatalEndpointError(f"{ep.base_url} (model {ep.model}) refused the request: {self._describe(e)}")
                raise self._fatal from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:  # this item's request is bad
                raise RequestFailed(f"rejected: {self._describe(e)}") from None
            except (TimeoutError, openai.APIError, _EmptyReply) as e:
                error = self._describe(e)
            if attempt + 1 < ep.max_attempts:
                self.num_retries += 1
                await asyncio.sleep(self._rng.uniform(0, min(60.0, ep.backoff_s * 2**attempt)))
        raise RequestFailed(f"{ep.max_attempts} attempts failed, last: {error}")

    async def close(self) -> None:
        await self._client.close()

    def _describe(self, error: BaseException) -> str:
        """A short account of a failure, with the API key masked should the server echo it."""
        if isinstance(error, TimeoutError):
            return "timed out"
        status = getattr(error, "status_code", None)
        text = str(error).replace(self._key, "***") if self._key != "EMPTY" else str(error)
        return f"{type(error).__name__}{f' {status}' if status else ''}: {text[:200]}"


class _EmptyReply(Exception):
    pass


def _reply(response) -> ChatReply:
    if not response.choices or response.choices[0].message.content is None:
        raise _EmptyReply("reply has no message content")
    usage = response.usage
    return ChatReply(
        text=response.choices[0].message.content,
        finish_reason=response.choices[0].finish_reason or "",
        prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
        completion_tokens=(usage.completion_tokens or 0) if usage else 0,
    )


def image_data_url(image: bytes) -> str:
    """The image as a base64 data URL (PNG or JPEG, sniffed from the magic bytes)."""
    mime = "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def multimodal_content(prompt: Prompt, *, suffix: str) -> list[dict]:
    """The user message content: the problem split on `<image>` with the image at the split point
    (as the policy sees it, docs/method.md §2), followed by `suffix` after one space."""
    pieces = f"{prompt.problem} {suffix.strip()}".split("<image>")
    content: list[dict] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(prompt.image)}})
        if piece.strip():
            content.append({"type": "text", "text": piece})
    return content
