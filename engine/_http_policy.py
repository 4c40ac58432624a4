"""What the OpenAI-compatible engine does around each HTTP attempt: balancing, concurrency slots, retries.

- `Balancer`: the base URLs, requests outstanding on each, and a short cool-down for a URL that failed.
- `Slot`: a concurrency slot, the rate limiter, and the URL chosen for one attempt.
- `RetryPolicy`: which failures are retried, and how long to wait before the next attempt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx

from ..errors import ConfigError, EngineRequestError, EngineUnavailable, RateLimited
from ._http_exchange import Retryable
from ._http_parse import ResponseShape, error_message, retry_after

__all__ = ["Balancer", "Call", "RetryPolicy", "Slot", "check_int", "check_positive", "check_urls", "status_error"]

logger = logging.getLogger(__name__)

_RETRY_STATUS_UNAVAILABLE = frozenset({502, 503, 504})


class Call:
    """One engine call prepared for sending: endpoint, encoded body, what to expect back, and its attempts."""

    __slots__ = ("attempts", "avoid", "body", "deadline", "path", "shape")

    def __init__(self, path: str, body: bytes, shape: ResponseShape, deadline: float) -> None:
        self.path = path
        self.body = body
        self.shape = shape
        self.deadline = deadline
        self.attempts = 0
        self.avoid: set[int] = set()  # URLs that failed during this call


class Balancer:
    """Least outstanding requests first, ties in turn; a URL that failed cools down before it is preferred again."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = tuple(urls)
        count = len(self.urls)
        self.outstanding = [0] * count
        self.failures = [0] * count
        self.cooldown_until = [0.0] * count
        self._next = 0

    def pick(self, avoid: set[int]) -> int:
        """The URL for the next attempt; those that failed in this call or are cooling down come last."""
        count = len(self.urls)
        if count == 1:
            return 0
        now = time.monotonic()
        best = -1
        best_key: tuple[bool, bool, int] | None = None
        start = self._next
        for k in range(count):
            i = (start + k) % count
            key = (i in avoid, self.cooldown_until[i] > now, self.outstanding[i])
            if best_key is None or key < best_key:
                best, best_key = i, key
        self._next = (best + 1) % count
        return best

    def succeeded(self, index: int) -> None:
        if self.failures[index]:
            self.failures[index] = 0
            self.cooldown_until[index] = 0.0

    def failed(self, index: int, pause: float) -> None:
        self.failures[index] += 1
        self.cooldown_until[index] = time.monotonic() + pause

    def fresh(self, avoid: set[int]) -> bool:
        """Whether another URL, not failed in this call and not cooling down, is there to try at once."""
        now = time.monotonic()
        return len(self.urls) > 1 and any(
            i not in avoid and self.cooldown_until[i] <= now for i in range(len(self.urls))
        )


class Slot:
    """Holds a concurrency slot, passes the rate limiter, and counts an outstanding request on the chosen URL.

    The chosen URL's index is stored on a `Retryable` raised inside, so the retry logic knows which one failed.
    """

    __slots__ = ("_balancer", "_call", "_index", "_semaphore", "_throttler")

    def __init__(self, call: Call, balancer: Balancer, semaphore: asyncio.Semaphore, throttler: Any) -> None:
        self._call = call
        self._balancer = balancer
        self._semaphore = semaphore
        self._throttler = throttler
        self._index = -1

    async def __aenter__(self) -> int:
        async with asyncio.timeout_at(self._call.deadline):
            await self._semaphore.acquire()
        try:
            if self._throttler is not None:
                async with asyncio.timeout_at(self._call.deadline):
                    await self._throttler.acquire()
            self._index = self._balancer.pick(self._call.avoid)
        except BaseException:
            self._semaphore.release()
            raise
        self._balancer.outstanding[self._index] += 1
        return self._index

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._balancer.outstanding[self._index] -= 1
        self._semaphore.release()
        if isinstance(exc, Retryable):
            exc.index = self._index


class RetryPolicy:
    """Retries with exponential backoff and full jitter; a fresh URL is tried at once instead of waiting.

    Args:
        max_retries: retries after the first attempt.
        backoff_base_s: attempt k sleeps uniformly in ``[0, min(max_backoff_s, backoff_base_s * 2**(k-1))]``.
        max_backoff_s: cap on one sleep, also applied to a server's ``Retry-After`` and to a URL's cool-down.
        request_timeout_s: the whole call's limit (for messages).
    """

    def __init__(self, max_retries: int, backoff_base_s: float, max_backoff_s: float, request_timeout_s: float) -> None:
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.max_backoff_s = max_backoff_s
        self.request_timeout_s = request_timeout_s

    async def before_retry(self, call: Call, failure: Retryable, balancer: Balancer, *, closed: bool) -> None:
        """Record the failure, then sleep for the backoff (or not at all, if a fresh URL is left).

        Raises:
            EngineError: the failure's error, when no retry is left or none fits the call's deadline.
        """
        error = failure.error
        index = failure.index
        if index is not None:
            own = failure.retry_after
            backoff = self.backoff_base_s * 2 ** (balancer.failures[index])
            balancer.failed(index, min(self.max_backoff_s, own if own is not None else backoff))
            call.avoid.add(index)
            if len(call.avoid) >= len(balancer.urls):
                call.avoid.clear()
        backoff_cap = min(self.max_backoff_s, self.backoff_base_s * 2**call.attempts)
        call.attempts += 1
        if closed:
            error.args = (f"{error} (the engine was closed)",)
            raise error from failure.__cause__
        if call.attempts > self.max_retries:
            raise error from failure.__cause__
        if balancer.fresh(call.avoid):
            delay = 0.0  # another server is there to try at once
        elif failure.retry_after is not None:
            delay = min(failure.retry_after, self.max_backoff_s)
        else:
            delay = random.uniform(0.0, backoff_cap)
        if asyncio.get_running_loop().time() + delay >= call.deadline:
            error.args = (f"{error} (no time left for a retry within request_timeout_s={self.request_timeout_s} s)",)
            raise error from failure.__cause__
        logger.warning("%s; retrying in %.2f s (retry %d of %d)", error, delay, call.attempts, self.max_retries)
        if delay > 0:
            await asyncio.sleep(delay)


def status_error(status: int, body: bytes, headers: httpx.Headers, url: str) -> Retryable | EngineRequestError:
    """The error for a non-200 answer: 408, 429 and 5xx may be retried, any other 4xx is final."""
    message = f"{url} answered HTTP {status}: {error_message(body)}"
    wait = retry_after(headers.get("retry-after"))
    if status == 429:
        return Retryable(RateLimited(message), retry_after=wait)
    if status in _RETRY_STATUS_UNAVAILABLE:
        return Retryable(EngineUnavailable(message), retry_after=wait)
    if status == 408 or status >= 500:
        return Retryable(EngineRequestError(message, status_code=status), retry_after=wait)
    return EngineRequestError(message, status_code=status)


# -- argument checks ----------------------------------------------------------------------------------------------
def check_urls(base_url: str | Sequence[str]) -> tuple[str, ...]:
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ConfigError("base_url must name at least one URL")
    out: list[str] = []
    for url in urls:
        if not isinstance(url, str):
            raise ConfigError(f"base_url entries must be strings, got {url!r}")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as err:
            raise ConfigError(f"base_url {url!r} is not a valid URL: {err}") from err
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"base_url {url!r} must be an http:// or https:// URL with a host")
        normalised = url.rstrip("/")
        if normalised in out:
            raise ConfigError(f"base_url lists {url!r} twice")
        out.append(normalised)
    return tuple(out)


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
