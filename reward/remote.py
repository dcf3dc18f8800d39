"""Built-in ``http`` reward: a remote scorer behind a JSON POST endpoint (stdlib urllib only)."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

__all__ = ["HttpReward"]


class HttpReward:
    """POST the batch to a URL and read one score per response back.

    Request body: ``{"prompts": [...], "responses": [...]}``. Response body: ``{"scores":
    [...]}`` or a bare JSON list.

    Args:
        url: ``http://`` or ``https://`` endpoint.
        timeout: seconds for the connection and for each socket read (urllib's timeout is not
            a deadline for the whole request).
        retries: extra attempts after a connection error, a timeout or an HTTP 5xx, with
            exponential backoff (``backoff``, ``2 * backoff``, ...). HTTP 4xx and a malformed
            body fail at once.
        auth_env: name of an environment variable holding a token sent as
            ``Authorization: Bearer <token>``; read when the reward is built, and an unset or
            empty variable is an error then.
        headers: extra request headers.
        backoff: seconds before the first retry.
    """

    def __init__(self, url: str, timeout: float = 30, retries: int = 2,
                 auth_env: str | None = None, headers: Mapping[str, str] | None = None,
                 backoff: float = 0.5):
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._headers.update(headers or {})
        if auth_env is not None:
            token = os.environ.get(auth_env)
            if not token:
                raise ValueError(f"auth_env names the environment variable {auth_env!r}, "
                                 f"which is not set (or empty); export it with the token for "
                                 f"{url}")
            self._headers["Authorization"] = f"Bearer {token}"

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(self.url, data=body, headers=self._headers,
                                         method="POST")
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                failure = f"HTTP {exc.code} {exc.reason} from POST {self.url}: {detail}"
                if exc.code < 500:
                    raise RuntimeError(failure) from None
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                failure = f"POST {self.url} failed: {type(reason).__name__}: {reason}"
            if attempt + 1 < attempts:
                time.sleep(self.backoff * 2 ** attempt)
        raise RuntimeError(f"{failure} (gave up after {attempts} attempt"
                           f"{'s' if attempts > 1 else ''})")

    def __call__(self, prompts, responses, **info):
        body = json.dumps({"prompts": list(prompts), "responses": list(responses)}).encode()
        raw = self._post(body)
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"POST {self.url} returned invalid JSON ({exc}); body starts "
                             f"{raw[:100]!r}") from None
        if isinstance(payload, Mapping) and "scores" in payload:
            return payload["scores"]
        if isinstance(payload, list):
            return payload
        raise ValueError(f"POST {self.url} returned JSON {type(payload).__name__} "
                         f"{str(payload)[:100]}; expected a list or an object with 'scores'")
