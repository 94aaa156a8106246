"""Product photos behind http(s) URLs: fetched once, kept in a content cache on disk.

A shop's export often names its photos by URL. `ImageFetcher.fetch(url)` returns the bytes
from the cache (`<cache>/<sha256 of the URL>[:2]/<sha256>`) or downloads them with the standard
library, so a second import of the same table, or an import with the network down, reads the
cache. A file is written under a temporary name and moved into place with `os.replace`, so an
interrupted import never leaves a truncated photo that a later import would trust.

Timeouts, connection errors and 5xx answers (the server's trouble, maybe passing) are retried
`retries` times with a short, growing pause; other HTTP errors (404: the photo is gone) are
not. Whatever still fails raises `FetchError` whose `reason` is short and stable (`http 404`,
`timeout`, `connection error`, ...), because the importer counts skipped products by reason.
Fetching is thread-safe: the importer calls `fetch` from a pool of threads.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_CACHE = Path("~/.cache/atelier/images")
MAX_BYTES = 64 * 1024 * 1024  # a product photo; anything bigger is not one
BACKOFF_S = 0.2  # the first pause before a retry; doubled each time
USER_AGENT = "atelier-image-fetcher"  # some CDNs refuse urllib's default agent


class FetchError(Exception):
    """A URL gave no photo; `reason` names why in a few words."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def is_url(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


class ImageFetcher:
    """Download photos through a cache under `cache_dir` (created on the first download)."""

    def __init__(self, cache_dir: Path | None = None, timeout: float = 10.0, retries: int = 2):
        if timeout <= 0:
            raise ValueError(f"fetch timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"fetch retries must be >= 0, got {retries}")
        self.cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
        self.timeout, self.retries = timeout, retries

    def cache_path(self, url: str) -> Path:
        key = hashlib.sha256(url.encode()).hexdigest()
        return self.cache_dir / key[:2] / key

    def fetch(self, url: str) -> bytes:
        cached = self.cache_path(url)
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        for attempt in range(self.retries + 1):
            try:
                data = self._download(url)
                break
            except FetchError as error:
                if not error.retry or attempt == self.retries:
                    raise
            time.sleep(BACKOFF_S * 2**attempt)
        self._store(cached, data)
        return data

    def _download(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = response.read(MAX_BYTES + 1)
        except urllib.error.HTTPError as error:
            raise FetchError(f"http {error.code}", retry=error.code >= 500) from None
        except urllib.error.URLError as error:  # raised while connecting
            timed_out = isinstance(error.reason, TimeoutError)
            raise FetchError("timeout" if timed_out else "connection error", retry=True) from None
        except TimeoutError:  # raised while waiting for the answer
            raise FetchError("timeout", retry=True) from None
        except (ValueError, http.client.InvalidURL):  # a malformed URL: no retry mends it
            raise FetchError("bad url") from None
        except (OSError, http.client.HTTPException):
            raise FetchError("connection error", retry=True) from None
        if len(data) > MAX_BYTES:
            raise FetchError("too large")
        return data

    def _store(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
