"""Publish a Hub-layout output folder (see ``output.py``) as a dataset repo, and the ``synthq push`` command.

Why ``create_commit`` in chunks and not ``upload_folder``: in huggingface_hub 2.4 (there is no
``upload_large_folder`` any more) ``upload_folder`` with hf_xet installed runs a pipelined upload that sizes its
commits itself (20–1000 files), retries 429 but not 412, and needs the Xet storage protocol; without hf_xet it
makes one commit however many files there are. Chunked ``create_commit`` bounds the files per commit, lets us
retry each commit on 429 (rate limit) and 412 (another commit landed first) while keeping the files already
uploaded (huggingface_hub marks them, so a retry re-sends only the small commit request), uses whatever storage
huggingface_hub picks (Xet on the Hub, plain LFS without hf_xet), and lets us order the files: data shards first,
``run.json`` and ``README.md`` last, so the card's ``configs:`` never point at shards that are not there yet.

Failures end as one :class:`HubPushError` line that names the repo and never contains the token.
"""

from __future__ import annotations

import argparse
import email.utils
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

try:  # the HTTP client under huggingface_hub: httpx2 from 2.0, httpx in 1.x
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILES_PER_COMMIT = 256  # huggingface_hub's preupload batch; its own pipeline starts near 250 too
RETRY_STATUSES = (412, 429)
MAX_BACKOFF_S = 60.0
METADATA_LAST = ("run.json", "README.md")  # committed last, README.md the very last file
LOGIN_HINT = (
    "no Hugging Face token: run `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"
)
STATUS_REASONS = {
    401: "the token was rejected (invalid or expired)",
    403: "the token has no write access to it",
    404: "it does not exist or the token cannot see it",
}

T = TypeVar("T")
_sleep = time.sleep  # one seam, so a test can record the waits instead of sleeping them


class HubPushError(RuntimeError):
    """Pushing failed for a reason the user can act on; the message is one line without the token."""


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    max_files_per_commit: int = DEFAULT_MAX_FILES_PER_COMMIT,
    max_retries: int = 5,
    backoff_s: float = 1.0,
) -> str:
    """Upload every file of ``folder`` to the dataset repo ``repo_id`` (created if missing); returns its URL.

    ``token`` defaults to ``HF_TOKEN`` or the saved login (``huggingface_hub.get_token()``); ``endpoint`` to
    ``HF_ENDPOINT`` read *now* (huggingface_hub reads it once, at import) or the Hub.
    """
    root = Path(folder)
    if max_files_per_commit < 1:
        raise ValueError("max_files_per_commit must be at least 1")
    files = _files_to_push(root)
    token = token or get_token()
    if not token:
        raise HubPushError(LOGIN_HINT)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token, library_name="synthq-hf")
    message = commit_message or f"Upload {root.name} with synthq-hf"
    chunks = [files[i : i + max_files_per_commit] for i in range(0, len(files), max_files_per_commit)]

    def retrying(what: str, call: Callable[[], T]) -> T:
        return _with_retries(call, what=f"{what} to {repo_id}", max_retries=max_retries, backoff_s=backoff_s)

    try:
        url = retrying(
            "create repo", lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        )
        for number, chunk in enumerate(chunks, 1):
            title = message if len(chunks) == 1 else f"{message} (part {number}/{len(chunks)})"
            # The same operations on every try: huggingface_hub marks uploaded files, so retries skip them.
            operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=root / path) for path in chunk]
            commit = partial(api.create_commit, url.repo_id, operations, commit_message=title, repo_type="dataset")
            retrying("commit", commit)
    except HfHubHTTPError as err:
        raise HubPushError(_describe(err, repo_id, token)) from None
    except TransportError as err:
        reason = f"cannot reach {endpoint} ({type(err).__name__}: {err})"
        raise HubPushError(_one_line(f"cannot push to dataset repo {repo_id}: {reason}", token)) from None
    logger.info("pushed %d files in %d commit(s) to %s", len(files), len(chunks), url)
    return str(url)


def _files_to_push(root: Path) -> list[str]:
    """Relative POSIX paths of the folder's files, data first and the card last; hidden paths are left out
    (``.tmp`` shards of an interrupted write, ``.git``, editor and cache folders)."""
    if not root.is_dir():
        raise HubPushError(f"{root} is not a folder")
    found = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    if not found:
        raise HubPushError(f"{root} holds no files to push")
    return [p for p in found if p not in METADATA_LAST] + [p for p in METADATA_LAST if p in found]


def _with_retries(call: Callable[[], T], *, what: str, max_retries: int, backoff_s: float) -> T:
    """Run ``call``, retrying HTTP 429/412 with jittered exponential backoff; a ``Retry-After`` header wins."""
    for attempt in range(max_retries + 1):
        try:
            return call()
        except HfHubHTTPError as err:
            status = _status(err)
            if status not in RETRY_STATUSES or attempt == max_retries:
                raise
            wait = _retry_after(err)
            if wait is None:
                wait = min(MAX_BACKOFF_S, backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
            logger.warning("%s: HTTP %d, retry %d/%d in %.1fs", what, status, attempt + 1, max_retries, wait)
            _sleep(wait)
    raise AssertionError("unreachable")


def _status(err: HfHubHTTPError) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(err: HfHubHTTPError) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    response = getattr(err, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _describe(err: HfHubHTTPError, repo_id: str, token: str) -> str:
    """One line naming the repo and the HTTP status, with the token redacted from any server text."""
    status = _status(err)
    reason = STATUS_REASONS.get(status) or (getattr(err, "server_message", None) or "").strip() or "request failed"
    return _one_line(f"cannot push to dataset repo {repo_id}: {reason} (HTTP {status})", token)


def _one_line(text: str, token: str) -> str:
    return " ".join(text.split()).replace(token, "***")


# --- CLI ------------------------------------------------------------------------------------------------------
def add_push_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synthq push DIR REPO [--private] [--token-env NAME]`` on the CLI's subparsers."""
    push = subparsers.add_parser(
        "push",
        help="upload an output folder to a Hugging Face dataset repo",
        description="Create the dataset repo if needed and upload the folder (data shards first, README.md last). "
        "The token comes from --token-env, else HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.",
    )
    push.add_argument("dir", help="output folder written by synthq (README.md with configs, parquet shards)")
    push.add_argument("repo", help="dataset repo id, e.g. me/my-synthq")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its)")
    push.add_argument("--token-env", metavar="NAME", help="environment variable holding the token (default HF_TOKEN)")
    push.set_defaults(func=cmd_push)
    return push


def cmd_push(args: argparse.Namespace) -> int:
    """``synthq push``: prints the repo URL, or one ``error: …`` line and exit code 2 like the other commands."""
    try:
        token = None
        if args.token_env:
            token = os.environ.get(args.token_env)
            if not token:
                raise HubPushError(f"environment variable {args.token_env} is not set")
        url = push_folder(args.dir, args.repo, private=args.private, token=token)
    except HubPushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.dir} to {url}")
    return 0
