"""Fetch a BGE checkpoint from the Hugging Face Hub, with nothing but the standard library.

A model on the Hub is a git repository, and we only need a handful of its files. Two URLs
matter (``{base}`` is https://huggingface.co, or a mirror named by $MINIBGE_HUB_URL or
$HF_ENDPOINT):

    {base}/api/models/{repo_id}/tree/{revision}?recursive=true
        A JSON list of the repository's entries, e.g.
        {"type": "file", "path": "config.json", "size": 684, "oid": "<git blob sha1>"}.
        Big files live in Git LFS and also carry {"lfs": {"oid": "<sha256 hex>", "size": ...}}.
    {base}/{repo_id}/resolve/{revision}/{path}
        The bytes of one file (for LFS files, after a redirect to a CDN).

The download protocol, file by file:

1. Skip the file if it is already complete: right size, and right sha256 for LFS files.
2. Stream it into ``<name>.incomplete``. If that file already exists (an earlier run was
   interrupted), ask only for the rest with ``Range: bytes=N-``; a server that ignores the
   range answers 200 with the whole file, and then we start over.
3. If the connection drops mid-file, retry a few times, each time resuming from disk.
4. Check the size, and the sha256 the listing gives for LFS files (for other files, their git
   blob id, sha1 of b"blob <size>\\0" + content). On a mismatch, delete the
   partial file and fail; otherwise rename it into place with ``os.replace``. The rename is
   atomic, so a file under its final name is always a complete, verified one.

``config.json`` is fetched last, so a folder that has one holds a complete download;
:func:`resolve_model_path` relies on that. Just before it, ``minibge_source.json`` records the
repository id, so that "someone/bge-small-en-v1.5" is never answered with the folder that
"BAAI/bge-small-en-v1.5" filled (the folder is named after the name alone).

Names from the outside never become paths unchecked. A repository id must be exactly
"org/name"; its name alone is the folder under the weights folder, so "org/.." cannot climb
out of it. Every file name in a listing must be a plain relative path ("1_Pooling/config.json"
is fine; "../x", "/etc/x" and "a/../../x" make us refuse the whole listing), and the folder a
file is written into is checked once more after resolving symlinks, right before writing.
Files are opened with O_NOFOLLOW, so a planted symlink (``vocab.txt.incomplete -> /elsewhere``)
is refused, never written through; minibge_source.json goes to a unique temporary name first.

A hostile or broken server cannot make a download last for ever or grow without bound:
pagination has a page cap, refuses a page seen before and any page on another host (so the
token never leaves the Hub's host), reads stop at the listed size, and only http(s) redirects
are followed. Environment variables (read at each download):

    MINIBGE_HUB_SPEED_LIMIT  bytes/s a file transfer must average over each window (1024; 0: off)
    MINIBGE_HUB_SPEED_TIME   that window in seconds, as curl's --speed-time (60)
    MINIBGE_HUB_LISTING_TIMEOUT  seconds for the whole file listing, all pages (60)
    MINIBGE_HUB_MAX_PAGES    listing pages followed at most (100)
    MINIBGE_HUB_MAX_FILE_SIZE  bytes accepted for a file the listing gives no size for (2 GiB)
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

HUB_URL_ENV = "MINIBGE_HUB_URL"
WEIGHTS_DIR_ENV = "MINIBGE_WEIGHTS_DIR"
DEFAULT_HUB_URL = "https://huggingface.co"
TIMEOUT_S = 30
RETRIES = 5
RETRY_BACKOFF_S = 0.5  # doubled after each failed try: 0.5, 1, 2, 4, 8 seconds
CHUNK_BYTES = 1 << 20
MAX_LISTING_PAGE_BYTES = 64 << 20  # a real page of 1000 entries is ~200 KB
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json",
                               "config_sentence_transformers.json", "1_Pooling/config.json")
SHARD_INDEX = "model.safetensors.index.json"
SOURCE_FILE = "minibge_source.json"  # written by download(): which repository the folder holds
# What a dropped or flaky connection looks like from urllib (HTTPError, a URLError, is handled first).
_TRANSIENT = (http.client.HTTPException, ConnectionError, TimeoutError, urllib.error.URLError)
# "org/name": two parts, each starting with a letter, digit or "_", so neither can be "." or ".."
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*")

log = logging.getLogger(__name__)


class HubError(RuntimeError):
    """A download problem explained in one message; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class Limits:
    """The bounds on one download, from the environment (see the module docstring)."""
    speed_limit: float = 1024.0
    speed_time: float = 60.0
    listing_timeout: float = 60.0
    max_pages: int = 100
    max_file_size: int = 2 << 30

    @classmethod
    def from_env(cls) -> "Limits":
        values = {}
        for field, kind in (("speed_limit", float), ("speed_time", float), ("listing_timeout", float),
                            ("max_pages", int), ("max_file_size", int)):
            name = "MINIBGE_HUB_" + field.upper()
            raw = os.environ.get(name)
            if raw:
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise HubError(f"${name}={raw!r} is not a {kind.__name__}") from None
                if values[field] < 0:
                    raise HubError(f"${name}={raw!r} must not be negative")
        return cls(**values)


class _StallGuard:
    """curl's --speed-limit/--speed-time for one file: fail when fewer than `speed_limit` bytes
    per second arrived over a window of `speed_time` seconds. It spans retries, so a server that
    keeps timing out or trickling cannot stretch a file's download without end."""

    def __init__(self, url: str, limits: Limits):
        self.url, self.limit, self.window = url, limits.speed_limit, limits.speed_time
        self.start, self.bytes = time.monotonic(), 0

    def add(self, n: int) -> None:
        self.bytes += n
        self.check()

    def check(self) -> None:
        elapsed = time.monotonic() - self.start
        if self.limit <= 0 or elapsed < self.window:
            return
        if self.bytes < self.limit * elapsed:
            raise HubError(f"{self.url} stalled: {self.bytes} bytes in {elapsed:.0f}s, below "
                           f"MINIBGE_HUB_SPEED_LIMIT={self.limit:g} B/s over MINIBGE_HUB_SPEED_TIME="
                           f"{self.window:g}s; run again to resume")
        self.start, self.bytes = time.monotonic(), 0


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib also follows redirects to ftp://; a Hub never sends one."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(urljoin(req.full_url, newurl)).scheme not in ("http", "https"):
            raise HubError(f"{req.full_url} redirected to {newurl}: only http(s) redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_HttpOnlyRedirects)


def default_weights_dir() -> Path:
    """$MINIBGE_WEIGHTS_DIR, else the checkout's weights/ folder, else ~/.cache/minibge/weights."""
    if os.environ.get(WEIGHTS_DIR_ENV):
        return Path(os.environ[WEIGHTS_DIR_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[1] / "weights"
    if checkout.is_dir():
        return checkout
    return Path.home() / ".cache" / "minibge" / "weights"


def hub_url(base_url: str | None = None) -> str:
    """The Hub's base URL: the argument, else $MINIBGE_HUB_URL, else $HF_ENDPOINT, else huggingface.co."""
    url = base_url or os.environ.get(HUB_URL_ENV) or os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_URL
    return url.rstrip("/")


# ---------------------------------------------------------------- names from outside → paths
def is_hub_id(name: str) -> bool:
    """"org/name" with the characters the Hub allows, e.g. "BAAI/bge-small-en-v1.5"."""
    return isinstance(name, str) and _HUB_ID.fullmatch(name) is not None


def check_hub_id(repo_id: str) -> None:
    """TypeError / ValueError unless `repo_id` is an "org/name" id that is safe to build a folder name from."""
    if not isinstance(repo_id, str):
        raise TypeError(f"a Hub model id is a str like 'BAAI/bge-small-en-v1.5', got {type(repo_id).__name__}")
    if not is_hub_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub model id: expected 'org/name' made of letters, digits, "
                         f"'-', '_' and '.', neither part starting with '.', e.g. BAAI/bge-small-en-v1.5")


def _is_relative_file_name(path: str) -> bool:
    """A listing's file name we may join onto a folder: "config.json", "1_Pooling/config.json"."""
    return (path != "" and not path.startswith("/") and "\\" not in path and "\0" not in path
            and all(part not in ("", ".", "..") for part in path.split("/")))


def _inside(folder: Path, file: Path) -> bool:
    """Does writing `file` (a temporary file beside it, then a rename onto it) stay inside `folder`?

    I resolve the *parent*, where the bytes are written, following symlinks; the file's own name
    is a plain name. The final name may be a symlink: os.replace swaps the link, not its target.
    """
    return file.name not in ("", ".", "..") and file.parent.resolve().is_relative_to(folder.resolve())


def recorded_source(folder: Path) -> str | None:
    """The repository id download() recorded in `folder`, or None (a folder filled by hand)."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text())["repo_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_source(folder: Path, repo_id: str) -> None:
    """Refuse a folder that download() filled from another repository. The weights folder is keyed
    by the name alone ("BAAI/bge-small-en-v1.5" → bge-small-en-v1.5/), so a fine-tune published as
    "someone/bge-small-en-v1.5" would otherwise be answered, silently, with BAAI's model."""
    recorded = recorded_source(folder)
    if recorded is not None and recorded.lower() != repo_id.lower():
        raise HubError(f"{folder} holds '{recorded}', not '{repo_id}' (the weights folder is named after the "
                       f"model's name alone); move it, or download '{repo_id}' elsewhere: "
                       f"minibge.hub.download({repo_id!r}, dest=...) or ${WEIGHTS_DIR_ENV}")


def local_folder(repo_id: str) -> Path:
    """Where a Hub model lives on disk: the weights folder / the id's name ("bge-small-en-v1.5")."""
    check_hub_id(repo_id)
    weights = default_weights_dir()
    folder = weights / repo_id.split("/")[1]
    assert _inside(weights, folder), folder  # guaranteed by check_hub_id: the name is one plain part
    return folder


# ---------------------------------------------------------------- HTTP
def _same_host(a: str, b: str) -> bool:
    a, b = urlsplit(a), urlsplit(b)
    return (a.scheme, a.netloc.lower()) == (b.scheme, b.netloc.lower())


def _open(url: str, offset: int = 0, base: str | None = None, timeout: float = TIMEOUT_S):
    request = urllib.request.Request(url, headers={"User-Agent": "minibge"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    if os.environ.get("HF_TOKEN") and (base is None or _same_host(url, base)):
        # "Unredirected": the token goes to the Hub only, never to the CDN it redirects LFS files to.
        request.add_unredirected_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    return _opener.open(request, timeout=max(timeout, 0.1))


def _unreachable(base: str, error: Exception, dest: Path) -> str:
    reason = getattr(error, "reason", error)
    return (f"could not reach the Hub at {base} ({reason}). To work offline, download the files "
            f"into {dest} (config.json, model.safetensors, tokenizer.json, vocab.txt, ...) by hand, "
            f"or set {HUB_URL_ENV} to a mirror.")


def _read_page(response, url: str, deadline: float) -> bytes:
    """The body of one listing page, within the listing's deadline and MAX_LISTING_PAGE_BYTES."""
    body = bytearray()
    while chunk := response.read1(CHUNK_BYTES):
        body += chunk
        if len(body) > MAX_LISTING_PAGE_BYTES:
            raise HubError(f"{url} sent a listing page over {MAX_LISTING_PAGE_BYTES} bytes; is it really a Hub?")
        if time.monotonic() > deadline:
            raise TimeoutError("the listing took longer than $MINIBGE_HUB_LISTING_TIMEOUT")
    return bytes(body)


def _check_entry(entry: dict, base: str, repo_id: str) -> None:
    """One clear error for a file entry whose size or checksums are not what a Hub sends."""
    def bad(what):
        return HubError(f"the Hub at {base} sent a malformed entry in the listing of '{repo_id}': "
                        f"{entry['path']!r} has {what}")

    def check_size(size, where):
        if size is not None and (type(size) is not int or size < 0):
            raise bad(f"{where} {size!r} (not a byte count)")

    check_size(entry.get("size"), "size")
    oid = entry.get("oid")
    if oid is not None and not (isinstance(oid, str) and _HEX40.fullmatch(oid)):
        raise bad(f"oid {str(oid)[:80]!r} (not a git blob id)")
    lfs = entry.get("lfs")
    if lfs is None:
        return
    if not isinstance(lfs, dict):
        raise bad(f"lfs {str(lfs)[:80]!r} (not an object)")
    check_size(lfs.get("size"), "lfs size")
    if lfs.get("oid") is not None and not (isinstance(lfs["oid"], str) and _HEX64.fullmatch(lfs["oid"])):
        raise bad(f"lfs oid {str(lfs['oid'])[:80]!r} (not a sha256)")


def _list_files(base: str, repo_id: str, revision: str, dest: Path, limits: Limits | None = None) -> dict[str, dict]:
    """path -> listing entry, for every file (not directory) of the repository."""
    limits = limits or Limits()
    url = f"{base}/api/models/{quote(repo_id)}/tree/{quote(revision, safe='')}?recursive=true"
    deadline = time.monotonic() + limits.listing_timeout
    entries: list[dict] = []
    seen: set[str] = set()
    while url:  # the Hub pages long listings and names the next page in a Link header
        # Bounded, because the next page is named by the server: no page twice, no other host,
        # no more than max_pages. The token is only ever sent to the Hub's own host.
        if url in seen:
            raise HubError(f"the listing of '{repo_id}' at {base} names {url} as its next page again; refusing to loop")
        if not _same_host(url, base):
            raise HubError(f"the listing of '{repo_id}' at {base} names a next page on another host ({url}); refused")
        if len(seen) >= limits.max_pages:
            raise HubError(f"the listing of '{repo_id}' at {base} has more than {limits.max_pages} pages "
                           f"($MINIBGE_HUB_MAX_PAGES); refusing to read further")
        seen.add(url)
        try:
            with _open(url, base=base, timeout=min(TIMEOUT_S, deadline - time.monotonic())) as response:
                page = json.loads(_read_page(response, url, deadline))
                link = re.search(r'<([^>]+)>;\s*rel="next"', response.headers.get("Link", ""))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 404):  # the Hub answers 401 for unknown repos too, to hide private ones
                raise HubError(f"model '{repo_id}' not found on the Hub at {base} (check the name, or the "
                               f"revision '{revision}'; for a private or gated model, set HF_TOKEN)") from None
            raise HubError(f"the Hub at {base} answered HTTP {e.code} ({e.reason}) for {url}") from None
        except _TRANSIENT as e:
            if time.monotonic() > deadline:
                raise HubError(f"listing '{repo_id}' at {url} took over {limits.listing_timeout:g}s "
                               f"($MINIBGE_HUB_LISTING_TIMEOUT); the server is too slow or stalled") from None
            raise HubError(_unreachable(base, e, dest)) from None
        except ValueError:
            raise HubError(f"{url} did not return a JSON file listing; is {base} really a Hub?") from None
        if not isinstance(page, list):
            raise HubError(f"{url} did not return a file listing: {str(page)[:200]}")
        entries += page
        url = urljoin(url, link.group(1)) if link else None
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
            raise HubError(f"the Hub at {base} sent a malformed entry in the listing of '{repo_id}': {str(entry)[:100]}")
        # A real Hub never lists such names; a hostile or broken mirror might. I refuse the whole
        # listing, not just the file, because nothing else from that source can be trusted either.
        if not _is_relative_file_name(entry["path"]):
            raise HubError(f"refusing to download '{repo_id}' from {base}: its listing names {entry['path']!r}, "
                           f"which points outside the model folder")
        if entry.get("type") == "file":
            _check_entry(entry, base, repo_id)
    return {entry["path"]: entry for entry in entries if entry.get("type") == "file"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_blob_id(path: Path) -> str:
    """git's object id of a file: sha1 of b"blob <size>\\0" + content (what the listing's oid is)."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _problem(path: Path, size: int | None, sha256: str | None, git_oid: str | None = None) -> str | None:
    """What is wrong with a downloaded file compared with the listing, or None if nothing is."""
    got = path.stat().st_size
    if size is not None and got != size:
        return f"it has {got} bytes, the Hub lists {size}"
    if sha256 and (digest := _sha256(path)) != sha256:
        return f"its sha256 is {digest}, the Hub lists {sha256}"
    if git_oid and not sha256 and (blob := _git_blob_id(path)) != git_oid:
        return f"its git blob id is {blob}, the Hub lists {git_oid}"
    return None


def _progress_bar(enabled: bool, total: int | None, initial: int, name: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a nicety, not a dependency
        return contextlib.nullcontext(None)
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, disable=not enabled, leave=False)


def _open_no_follow(path: Path, append: bool):
    """`path` opened for writing, refusing a symlink in its place (O_NOFOLLOW): a planted link must
    not make us create or overwrite a file outside the model folder."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_APPEND if append else os.O_TRUNC)
    try:
        return os.fdopen(os.open(path, flags, 0o644), "ab" if append else "wb")
    except OSError as e:
        if os.path.islink(path):
            raise HubError(f"refusing to write through the symlink {path} (remove it and run again)") from None
        raise HubError(f"cannot write {path}: {e.strerror}") from None


def _is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _stream(url: str, partial: Path, size: int | None, progress: bool,
            limits: Limits | None = None, guard: _StallGuard | None = None) -> None:
    """Append the rest of `url` to `partial`; raise ConnectionError if the body comes up short.

    Never more than `size` bytes (or limits.max_file_size when the listing gives none) reach disk.
    """
    limits = limits or Limits()
    guard = guard or _StallGuard(url, limits)
    if _is_symlink(partial):
        raise HubError(f"refusing to write through the symlink {partial} (remove it and run again)")
    offset = partial.stat().st_size if partial.exists() else 0
    if size is not None and offset > size:  # a leftover from another version of the file
        partial.unlink()
        offset = 0
    if size is not None and offset == size:
        return  # all bytes are on disk already; the checksum decides whether they are right
    cap = size if size is not None else limits.max_file_size
    what = f"the {size} bytes the listing gives" if size is not None else \
        f"the {cap} bytes allowed for a file without a listed size ($MINIBGE_HUB_MAX_FILE_SIZE)"
    # the socket wakes us at least once a window, so a silent server meets the stall guard
    timeout = min(TIMEOUT_S, limits.speed_time) if limits.speed_limit > 0 else TIMEOUT_S
    with _open(url, offset, timeout=timeout) as response:
        if offset and response.status != 206:
            log.info("the server ignored the Range request for %s; starting over", partial.name)
            offset = 0
        length = response.headers.get("Content-Length")
        expected_end = offset + int(length) if length is not None and length.isdigit() else size
        if expected_end is not None and expected_end > cap:
            raise HubError(f"{url} announces {expected_end} bytes, more than {what}; nothing kept past them")
        with _open_no_follow(partial, append=bool(offset)) as f, \
                _progress_bar(progress, size, offset, partial.name[:-len(".incomplete")]) as bar:
            written = offset
            while written < cap and (chunk := response.read1(min(CHUNK_BYTES, cap - written))):
                f.write(chunk)
                written += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                guard.add(len(chunk))
            if written >= cap and length is None:
                try:  # no length announced: one more byte means the server sends too much
                    extra = response.read1(1)
                except TimeoutError:
                    extra = b""
                if extra:
                    f.close()
                    partial.unlink()
                    raise HubError(f"{url} sent more than {what}; refused, nothing kept")
    got = partial.stat().st_size
    # urllib does not always raise when the server hangs up early; I check the byte count myself.
    if expected_end is not None and got < expected_end:
        raise ConnectionError(f"connection closed after {got} of {expected_end} bytes")


def _fetch_file(url: str, final: Path, size: int | None, sha256: str | None, progress: bool,
                git_oid: str | None = None, limits: Limits | None = None) -> None:
    limits = limits or Limits()
    if final.is_file() and _problem(final, size, sha256, git_oid) is None:
        log.debug("%s is already complete", final)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".incomplete")
    guard = _StallGuard(url, limits)  # one per file, across retries
    for attempt in range(RETRIES + 1):
        try:
            _stream(url, partial, size, progress, limits, guard)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500:  # 4xx will not get better by asking again; 5xx might
                raise HubError(f"could not download {url}: HTTP {e.code} ({e.reason})") from None
            error: Exception = e
        except _TRANSIENT as e:
            error = e
        guard.check()  # a server that keeps timing out is a stalled one
        if attempt == RETRIES:
            raise HubError(f"downloading {url} failed {RETRIES + 1} times (last: {error}); "
                           f"run the same command again to resume from {partial}") from None
        wait = RETRY_BACKOFF_S * 2 ** attempt
        log.warning("connection lost while downloading %s (%s); resuming in %.1fs", final.name, error, wait)
        time.sleep(wait)
    problem = _problem(partial, size, sha256, git_oid)
    if problem is not None:
        # I delete the bad bytes: resuming on top of them could never produce a good file.
        partial.unlink()
        raise HubError(f"{final.name} from {url} is corrupt: {problem}; nothing was kept, try again")
    os.replace(partial, final)
    log.info("fetched %s (%d bytes)", final, final.stat().st_size)


def _write_source(dest: Path, repo_id: str, revision: str) -> None:
    """minibge_source.json, written to a unique temporary name and renamed: never through a symlink."""
    fd, tmp = tempfile.mkstemp(dir=dest, prefix="." + SOURCE_FILE + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"repo_id": repo_id, "revision": revision}) + "\n")
        os.replace(tmp, dest / SOURCE_FILE)  # replaces a symlink itself, not its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _shard_names(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names, sorted, each once."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HubError(f"{index} is not a valid shard index (a JSON object with a weight_map)") from None
    if not all(isinstance(shard, str) for shard in shards):
        raise HubError(f"{index} names shards that are not file names")
    return shards


def download(repo_id: str, dest: Path | None = None, revision: str = "main",
             base_url: str | None = None, progress: bool | None = None) -> Path:
    """Fetch the model folder of `repo_id` into `dest` (default: default_weights_dir()/<name>).

    Only what minibge needs is fetched: config, tokenizer and sentence-transformers files, and
    one copy of the weights (model.safetensors, else its shards, else pytorch_model.bin).
    Re-running is cheap: complete files are verified and skipped, partial ones resumed.
    progress=None shows per-file bars only when stderr is a terminal, so logs stay clean.
    """
    check_hub_id(repo_id)  # before any path or URL is built from it
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    base = hub_url(base_url)
    dest = Path(dest).expanduser() if dest is not None else local_folder(repo_id)
    check_source(dest, repo_id)  # never mix two repositories' files in one folder
    limits = Limits.from_env()
    listing = _list_files(base, repo_id, revision, dest, limits)
    if "config.json" not in listing:
        raise HubError(f"'{repo_id}' has no config.json at revision '{revision}'; is it a BERT/BGE model?")
    log.info("downloading %s@%s from %s into %s", repo_id, revision, base, dest)

    def fetch(path: str) -> None:
        # the listing's names were checked already; this catches a symlinked subfolder too
        if not (_is_relative_file_name(path) and _inside(dest, dest / path)):
            raise HubError(f"refusing to download {path!r} into {dest}: it would land outside the model folder")
        entry = listing[path]
        lfs = entry.get("lfs") or {}
        url = f"{base}/{quote(repo_id)}/resolve/{quote(revision, safe='')}/{quote(path)}"
        size = lfs["size"] if lfs.get("size") is not None else entry.get("size")
        git_oid = None if lfs else entry.get("oid")  # an LFS file's oid is its pointer's, not its content's
        _fetch_file(url, dest / path, size, lfs.get("oid"), progress, git_oid, limits)

    for path in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES:
        if path in listing:
            fetch(path)
    if "model.safetensors" in listing:
        fetch("model.safetensors")
    elif SHARD_INDEX in listing:
        # A big model is split into shards; the index maps each tensor name to its shard file.
        fetch(SHARD_INDEX)
        shards = _shard_names(dest / SHARD_INDEX)
        missing = [shard for shard in shards if shard not in listing]
        if missing:
            raise HubError(f"{SHARD_INDEX} of '{repo_id}' names shards the repository lacks: {missing}")
        for shard in shards:
            fetch(shard)
    elif "pytorch_model.bin" in listing:
        fetch("pytorch_model.bin")
    else:
        raise HubError(f"'{repo_id}' has no weights minibge can read "
                       f"(model.safetensors, {SHARD_INDEX} or pytorch_model.bin)")
    dest.mkdir(parents=True, exist_ok=True)
    _write_source(dest, repo_id, revision)
    fetch("config.json")  # last: its presence marks a complete folder
    return dest


def resolve_model_path(name_or_path: str | Path, download_if_missing: bool = True) -> Path:
    """Turn a local folder or a Hub id like "BAAI/bge-small-en-v1.5" into a local model folder.

    "org/name" is also a relative path, so when it is neither an existing folder nor a model we
    can get from the Hub, the error speaks of both: `-m models/my-model` typed in the wrong
    directory should not read as a Hub problem only.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise HubError(f"no such model folder: {path} (and it is not a Hub id like BAAI/bge-small-en-v1.5)")
    local = local_folder(name)
    if (local / "config.json").is_file():
        check_source(local, name)
        if recorded_source(local) is None:
            # Filled by hand or by weights/fetch_minilm.py: it could hold another org's model of that name.
            log.warning("answering '%s' with %s, which records no source (no %s); if it holds another "
                        "repository's model, move it away", name, local, SOURCE_FILE)
        return local
    not_a_folder = f"no folder {path.absolute()}, and as a Hub id"
    if not download_if_missing:
        raise HubError(f"{not_a_folder}, '{name}' is not downloaded yet (looked for {local / 'config.json'}); "
                       f"call minibge.hub.download({name!r}) first")
    try:
        return download(name, local)
    except HubError as e:
        raise HubError(f"{not_a_folder}: {e}") from None
