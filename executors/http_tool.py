"""The ``http_get`` tool (off unless enabled): fetch a URL with httpx, with a timeout and a size cap.

Only ``http`` and ``https`` URLs are accepted. The body is streamed and reading stops at ``max_bytes`` (the
result says whether it was truncated). Redirects are followed (at most 5). HTTP errors (status >= 400), timeouts
and connection failures raise `ToolError` / `ToolTimeout`.
"""

# No `from __future__ import annotations` here: the tool's signature uses a closure variable in `Annotated`,
# which must be evaluated when the function is defined.

import logging
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import pydantic

from ..errors import ConfigError, ToolArgumentError, ToolError, ToolTimeout
from .registry import Tool

__all__ = ["http_get_tool"]

logger = logging.getLogger(__name__)

_TOOL = "http_get"


def http_get_tool(
    *, timeout: float = 10.0, max_bytes_limit: int = 1_000_000, headers: dict[str, str] | None = None
) -> Tool:
    """A `Tool` named ``http_get``.

    Args:
        timeout: seconds for connecting and for each read.
        max_bytes_limit: the largest ``max_bytes`` a call may ask for.
        headers: extra request headers (a ``User-Agent`` is set by default).

    Raises:
        ConfigError: a non-positive timeout or limit.
    """
    if timeout <= 0 or max_bytes_limit < 1:
        raise ConfigError(f"http_get: timeout and max_bytes_limit must be positive, got {timeout}, {max_bytes_limit}")
    request_headers = {"User-Agent": "branchwise-http-get/0.1", **(headers or {})}

    async def http_get(
        url: str, max_bytes: Annotated[int, pydantic.Field(ge=1, le=max_bytes_limit)] = 100_000
    ) -> dict[str, Any]:
        """Fetch a web page or file over HTTP(S) and return its status, content type and (possibly truncated) text.

        Args:
            url: an http:// or https:// URL.
            max_bytes: read at most this many bytes of the body.
        """
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ToolArgumentError(_TOOL, f"only http and https URLs are allowed, got {url!r}", field="url")
        body = bytearray()
        truncated = False
        try:
            async with (
                httpx.AsyncClient(
                    timeout=httpx.Timeout(timeout), follow_redirects=True, max_redirects=5, headers=request_headers
                ) as client,
                client.stream("GET", url) as response,
            ):
                async for chunk in response.aiter_bytes():
                    room = max_bytes - len(body)
                    if len(chunk) > room:
                        body.extend(chunk[:room])
                        truncated = True
                        break
                    body.extend(chunk)
                status = response.status_code
                content_type = response.headers.get("content-type", "")
                encoding = response.charset_encoding or "utf-8"
                final_url = str(response.url)
        except httpx.TimeoutException as err:
            raise ToolTimeout(_TOOL, f"GET {url} timed out after {timeout:g} s ({type(err).__name__})") from err
        except httpx.HTTPError as err:
            raise ToolError(_TOOL, f"GET {url} failed: {type(err).__name__}: {err}") from err
        try:
            text = body.decode(encoding, errors="replace")
        except LookupError:
            text = body.decode("utf-8", errors="replace")
        if status >= 400:
            raise ToolError(_TOOL, f"GET {url} returned HTTP {status}: {text[:200]}")
        logger.debug("http_get %s -> %s, %d bytes%s", url, status, len(body), " (truncated)" if truncated else "")
        return {"url": final_url, "status": status, "content_type": content_type, "text": text, "truncated": truncated}

    return Tool(http_get)
