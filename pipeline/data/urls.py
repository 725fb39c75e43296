"""Shard URLs: brace patterns, opening a shard (local path, `pipe:` command, http/https), reading its
samples with bounded retries.

    urls = expand_shard_urls("pipe:aws s3 cp s3://bucket/in-{000000..001281}.tar -")
    for sample in read_shard_samples(url, FetchOptions(retries=3)):   # {"__key__", "jpg", "cls", ...}
        ...
    digest = ShardDigest(...)                     # sha256 + bytes of the exact stream, checked at its end

Patterns are expanded by webdataset (`expand_urls`: braces, `::` lists, WDS_ environment variables)
and tar members grouped into samples by its `tar_file_expander` / `group_by_keys`. Local paths and
`pipe:` URLs are opened by its `gopen`. http(s) is opened with our own `curl` command line: gopen's
fixed one (`curl ... --retry 30 -f -s -L URL`) has no place for a CA bundle and retries for a minute
on its own; here certificate checks are explicit (`ca_bundle`, or curl's own CURL_CA_BUNDLE
variable) and never turned off, and retries are ours and bounded.

Retries are hand-written because webdataset's `handler` can only skip or re-raise a broken shard:
a retry here reopens the shard and drops the samples already delivered, so a stream cut midway
through a shard continues at the next sample, and after `retries` failed attempts the error names
the URL.
"""
from __future__ import annotations

import hashlib
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlparse

from ..runtime.errors import StageError

logger = logging.getLogger(__name__)


class ShardFetchError(StageError):
    """A shard could not be read after the allowed attempts; the message names its URL."""


@dataclass(frozen=True)
class FetchOptions:
    retries: int = 3             # attempts after the first one
    retry_delay_s: float = 1.0   # doubled after each failed attempt
    ca_bundle: str = ""          # https: PEM file of the CAs to trust (curl --cacert); empty: the system's
    connect_timeout_s: int = 30


_FETCH_OPTIONS = FetchOptions()


def set_fetch_options(options: FetchOptions) -> None:
    """Retries and CA bundle for every shard stream this process (and its forked workers) opens;
    the stage runner sets them from data.fetch_retries / data.ca_bundle."""
    global _FETCH_OPTIONS
    _FETCH_OPTIONS = options


def fetch_options() -> FetchOptions:
    return _FETCH_OPTIONS


def expand_shard_urls(pattern: str) -> list[str]:
    """Every shard of a brace pattern, in order ("a-{000..002}.tar" -> 3 URLs; "::" joins patterns)."""
    from webdataset.shardlists import expand_urls

    urls = [u for u in expand_urls(pattern.strip()) if u]
    if not urls:
        raise StageError(f"shard pattern {pattern!r} expands to no URL")
    return urls


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def open_shard(url: str, options: FetchOptions):
    """A readable binary stream of the shard at `url` (a file or a pipe whose exit status is checked)."""
    from webdataset.gopen import Pipe, gopen

    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        cmd = ["curl", "--fail", "--silent", "--show-error", "--location",
               "--connect-timeout", str(options.connect_timeout_s)]
        if options.ca_bundle:
            cmd += ["--cacert", options.ca_bundle]
        # 141/23: curl killed by SIGPIPE / write error when the reader stops early (not a failure).
        return Pipe([*cmd, url], mode="rb", ignore_status=[141, 23])
    return gopen(url, "rb")


class ShardDigest:
    """Wraps a stream: sha256 and byte count of everything read through it."""

    def __init__(self, stream):
        self.stream, self.sha, self.bytes = stream, hashlib.sha256(), 0

    def read(self, *args) -> bytes:
        data = self.stream.read(*args)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: tar readers stop at the end-of-archive blocks, the file may go on."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


def _samples_of_stream(stream, url: str) -> Iterator[dict]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander([{"url": url, "stream": stream}])
    return group_by_keys(files)


def read_shard_samples(url: str, options: FetchOptions, *, digest: list | None = None) -> Iterator[dict]:
    """The samples of one shard in stored order, retrying a failed read up to `options.retries` times.

    When `digest` is a list, (sha256 hex, bytes) of the whole shard stream is appended to it once the
    shard has been read to its end (only a pass that read every byte counts)."""
    delivered, attempt = 0, 0
    while True:
        stream = None
        try:
            stream = ShardDigest(open_shard(url, options))
            for position, sample in enumerate(_samples_of_stream(stream, url)):
                if position >= delivered:  # a retry starts over: skip what was already handed out
                    delivered += 1
                    yield sample
            stream.drain()
            finished, stream = stream, None  # closed here, not again in `finally`
            finished.close()  # a pipe's exit status is checked here
            if digest is not None:
                digest.append((finished.sha.hexdigest(), finished.bytes))
            return
        except (OSError, EOFError, tarfile.TarError, ValueError) as err:  # a pipe's exit status, a cut stream...
            error = err
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 -- the read error above is the one to report
                    pass
        attempt += 1
        if attempt > options.retries:
            raise ShardFetchError(f"could not read shard {url} after {attempt} attempt(s): "
                                  f"{type(error).__name__}: {error}") from error
        delay = options.retry_delay_s * 2 ** (attempt - 1)
        logger.warning("reading shard %s failed (%s: %s); attempt %d of %d in %.1f s", url,
                       type(error).__name__, error, attempt + 1, options.retries + 1, delay)
        time.sleep(delay)
