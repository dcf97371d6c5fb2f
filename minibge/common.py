"""Small helpers that several parts of minibge share, each written once: reading JSON side files
(untrusted: size, type and nesting checked), what the CPU can do, reading text/jsonl(.gz) lines,
writing any output atomically (atomic_path, atomic_folder), fingerprinting a file, and where this
process stands in a torchrun group.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import gzip
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


MAX_SIDE_FILE_BYTES = 64 << 20  # a JSON side file or tokenizer.json larger than this is not one (XLM-R's: 17 MB)


def check_small_file(path: Path, max_bytes: int = MAX_SIDE_FILE_BYTES) -> int:
    """The size of `path` after checking, before a single byte is read, that it is a regular file
    (not a FIFO that would hang the read, not /dev/zero that never ends) of at most max_bytes;
    ValueError naming the file otherwise. Symlinks are followed: the check is on what they point at."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a folder, FIFO or device?); refusing to read it")
    if info.st_size > max_bytes:
        raise ValueError(f"{path} is {info.st_size:,} bytes, more than the {max_bytes:,} such a file may have")
    return info.st_size


def parse_json(text: str, path) -> object:
    """json.loads, with errors that name the file: bad JSON, and nesting deep enough to exhaust
    Python's recursion (a few thousand "[" are enough) as a ValueError rather than a RecursionError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a minibge/Hugging Face JSON file") from None


def read_json(path: Path, default=None):
    """The parsed JSON file at `path`, or `default` when there is no such file.

    A model folder's side files (modules.json, tokenizer_config.json, ...) are optional, so a missing
    one is not an error; a present one that is not a small regular file or does not parse is, a
    ValueError naming the file (check_small_file, parse_json).
    """
    path = Path(path)
    if not path.exists():
        return default
    check_small_file(path)
    with open(path, "rb") as f:
        data = f.read(MAX_SIDE_FILE_BYTES + 1)  # bounded even if the file grew since the check
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 ({err.reason} at byte {err.start})") from None
    return parse_json(text, path)


def read_json_object(path: Path, default=None):
    """read_json for a file that must hold a JSON object: a list or a number there is a ValueError
    naming the file, not an AttributeError later."""
    obj = read_json(path, default)
    if obj is not default and not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def file_fingerprint(path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read 1 MiB at a time: what a training run
    records of its data, so that --resume can tell a changed file from the same one."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


# -----------------------------------------------------------------------------
# Writing outputs: every file and folder minibge writes appears whole under its name, or not at all
#
# The data goes to a UNIQUE temporary name in the destination's own folder (mkstemp / mkdtemp, so
# two writers never share one) and is renamed onto the destination at the end: rename(2) within a
# filesystem is atomic, so a reader, a crash or a second writer sees the old output or a complete
# new one, never a mix. With two writers to one name, each renames its own complete result and
# the last rename wins. rename(2) also replaces a symlink at the destination rather than writing
# through it. A failure (an exception, Ctrl-C, SIGTERM raised as an exception) removes the
# temporary; only SIGKILL can leave one, under a hidden name ".<name>.<random>.partial".

WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file-size limit, a quota


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temporary_name(path: Path) -> dict:
    return {"dir": path.parent, "prefix": f".{path.name}.", "suffix": ".partial"}


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a fresh, empty temporary file beside `path` to write to; it is renamed onto `path`
    when the block succeeds and deleted when it fails. A full disk while writing it (ENOSPC, EFBIG,
    EDQUOT) is reported as an OSError naming `path`, not the temporary.

        with atomic_path("vectors.npy") as tmp:
            np.save(tmp, vectors)
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(**_temporary_name(path))
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; an output gets the usual mode
        try:
            yield tmp
        except OSError as err:
            if err.errno in WRITE_ERRNOS and err.filename in (None, str(tmp), tmp):
                raise OSError(err.errno, f"{os.strerror(err.errno)} while writing it; nothing was written",
                              str(path)) from None
            raise
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside `path` to build a folder output in; when the
    block succeeds it takes `path`'s place, and when it fails it is deleted.

    - `path` missing (or an empty folder) when the block starts: one rename at the end, so the folder
      appears complete or not at all. If another writer filled it meanwhile, this one is refused
      (FileExistsError) and nothing of it is mixed in.
    - `path` an existing folder with files: each entry is moved over its namesake (a file by one
      atomic rename, a subfolder by renaming the old one aside first); entries of the old folder the
      new one does not have are kept, as transformers' save_pretrained keeps them. Each file is
      whole at every moment, but the folder as a set is not: a training run marks its folder
      unfinished in run.json until its final save is in (train/loop.py).
    - replace=True: an existing folder is swapped whole instead (moved aside, the new one renamed into
      its place, the old one deleted), so no entry of the old folder survives (an index: index.py).
    """
    path = Path(path)
    fresh = not path.exists() or (path.is_dir() and not any(path.iterdir()))  # decided now, not at the end
    tmp = Path(tempfile.mkdtemp(**_temporary_name(path)))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        yield tmp
        if replace and not fresh and path.is_dir() and not path.is_symlink():
            aside = Path(tempfile.mkdtemp(**_temporary_name(path)))
            os.rename(path, aside / path.name)
            os.rename(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _install_folder(tmp, path, fresh)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install_folder(tmp: Path, path: Path, fresh: bool) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a folder; nothing was written")
    if fresh:
        try:
            os.rename(tmp, path)  # onto nothing or an empty folder: atomic
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{path} was created by another writer while this one wrote; it was left "
                                  f"as the other writer made it, and nothing of this one was written") from None
    for entry in sorted(tmp.iterdir()):
        target = path / entry.name
        if target.is_dir() and not target.is_symlink():  # an old subfolder: renamed aside, then removed
            aside = Path(tempfile.mkdtemp(**_temporary_name(target)))
            os.rename(target, aside / entry.name)
            os.rename(entry, target)
            shutil.rmtree(aside, ignore_errors=True)
        elif entry.is_dir() and (target.exists() or target.is_symlink()):  # a file or a link where a folder goes
            target.unlink()
            os.rename(entry, target)
        else:
            os.replace(entry, target)  # a file over a file or a link (the link itself is replaced): atomic


def write_text_atomic(path, text: str) -> None:
    """path.write_text(text) (UTF-8), through atomic_path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: this CPU multiplies bf16 in hardware (elsewhere bf16 is emulated, slower
    than float32), read from /proc/cpuinfo's flags; False where there is no such file."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def require_native_bf16(device, what: str) -> None:
    """ValueError if `what` would run in bf16 on a CPU that emulates it (slower than float32): the one
    refusal behind load_embedder(dtype="bfloat16"), training's precision="bf16" and speed_options."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        raise ValueError(f"{what} on this CPU would be emulated (no avx512_bf16 or amx_bf16 flag), slower than "
                         "float32: use float32 here, or bf16 on a CPU or GPU that multiplies it in hardware")


# -----------------------------------------------------------------------------
# Reading lines: the one reader behind the CLI's inputs, the evaluation sets and the training files

class LineError(ValueError):
    """A line that cannot be read, phrased "<name> line <n>: <problem>"; .name, .number, .problem."""

    def __init__(self, name: str, number: int, problem: str):
        super().__init__(f"{name} line {number}: {problem}")
        self.name, self.number, self.problem = name, number, problem


def iter_lines(path, name: str | None = None, skip_blank: bool = False,
               on_error: Callable[[LineError], None] | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every line of a UTF-8 file; `path` "-" reads stdin, a ".gz"
    suffix is gunzipped. `name` is what errors call the file (default: the path, or "stdin").

    Exact choices, each for a reason:
    - I read bytes, so that a decoding error can name its line and byte.
    - Lines end at "\\n" only, and one trailing "\\r" is dropped: a CRLF file (SICK's) reads like an
      LF file, and a stray "\\r" or a Unicode line separator inside a line never splits it in two.
    - A byte-order mark at the start of line 1 is not part of the text.
    - skip_blank: lines that are empty or whitespace only are left out (their numbers still count).
    - A line that is not UTF-8 raises LineError, or, given on_error, is handed to it and skipped.
    """
    if str(path) == "-":
        if sys.stdin is None:  # the process was started with stdin closed (<&-)
            raise ValueError(f"{name or 'stdin'}: stdin is closed; give a file, or pipe the texts in")
        # A text stream with no bytes underneath (e.g. io.StringIO in tests) is encoded back.
        lines = getattr(sys.stdin, "buffer", None)
        if lines is None:
            lines = (line.encode("utf-8") for line in sys.stdin)
        yield from _decode_lines(lines, name or "stdin", skip_blank, on_error)
        return
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rb") as stream:
        yield from _decode_lines(stream, name or str(path), skip_blank, on_error)


def _decode_lines(lines: Iterable[bytes], name: str, skip_blank: bool,
                  on_error: Callable[[LineError], None] | None) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            error = LineError(name, number, f"not valid UTF-8 ({e.reason} at byte {e.start})")
            if on_error is None:
                raise error from None
            on_error(error)
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if skip_blank and not text.strip():
            continue
        yield number, text


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last one shorter): how a stream is embedded a chunk at a time."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK in the environment

def setup_distributed(timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the torchrun process group if there is one (idempotent); returns this rank's device.

    Without torchrun this is a no-op and the device is CUDA when available, else the CPU. timeout:
    how long a collective waits for the other ranks (None: torch.distributed's default); it only
    applies when this call creates the group. Backend: nccl on CUDA, gloo on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, **({} if timeout is None else {"timeout": timeout}))
        # a group still alive at interpreter shutdown can abort the process after a successful run
        # ("terminate called without an active exception"): leave it at exit, before the teardown
        atexit.register(_leave_process_group)
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of ranks): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0, the one that writes files, logs and draws progress bars."""
    return rank_and_world()[0] == 0
