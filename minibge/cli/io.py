"""What the `minibge` command line reads and writes: text files and stdin, .npy and .jsonl
outputs, progress bars and printed tables, and the one-line errors it reports (see cli.py).

Inputs are read line by line and embedded a chunk at a time, so a big file never has to fit
in memory. Outputs are written to a unique temporary name beside their target and renamed onto it
at the end (common.atomic_path), so a failed run never leaves half a file behind and two runs
writing one output each leave a complete one. A .npy output is allocated in full before the first
row is embedded (os.posix_fallocate) and then written, not memory-mapped: a full disk is a
one-line error naming the file before any text is embedded, never a SIGBUS halfway.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .. import common
from ..common import atomic_path

PROG = "minibge"
SUMMARY_ROWS = 10  # rows `encode` shows when it has no --output
CHUNK_TEXTS = 10_000  # texts read, embedded and written at a time: bounds memory for big files

logger = logging.getLogger(__name__)


class CliError(Exception):
    """A problem to report in one line; exit status 1."""
    exit_code = 1


class UsageError(CliError):
    """A bad command line; exit status 2, as argparse uses."""
    exit_code = 2


def one_line(error: BaseException) -> str:
    """An error as the one line after 'minibge: error: '."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.splitlines())


# ---------------------------------------------------------------- reading
def check_readable(path: str | None, option: str) -> None:
    """Fail before loading a model, not after, when an input file is missing."""
    if path is None or path == "-":
        return
    p = Path(path)
    if not p.exists():
        raise CliError(f"{option} file not found: {p}")
    if not p.is_file():
        raise CliError(f"{option} {p} is not a file")


def check_writable(path: str | None, option: str) -> None:
    """Fail before any work, not after it, when an output cannot be written: the path is a
    folder, its folder is missing, or that folder refuses new files (read-only, no permission)."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise CliError(f"{option} {path} is a folder; give a file name (e.g. {target / 'out'}{target.suffix})")
    folder = target.absolute().parent  # where atomic_path writes its temporary file and renames it
    if not folder.is_dir():
        raise CliError(f"{option}: folder {folder} does not exist")
    try:  # the only honest test is to make a file there; an unnamed one where the OS allows it
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CliError(f"{option}: cannot write to folder {folder} ({e.strerror or e})") from None


def check_not_input(output: str | None, option: str, inputs: dict) -> None:
    """Refuse an output that is one of the inputs ({option: path}): renaming the result onto it
    would silently replace the data it was computed from."""
    if output is None:
        return
    target = Path(output).expanduser()
    for input_option, source in inputs.items():
        if source is None or source == "-" or not target.exists():
            continue
        if os.path.samefile(source, target):
            raise UsageError(f"{option} {output} is {input_option} {source}; write the output to another file")


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every line of a UTF-8 file, or of stdin for '-'
    (common.iter_lines; a line that is not UTF-8 becomes a one-line CliError)."""
    try:
        yield from common.iter_lines(path)
    except common.LineError as e:
        raise CliError(str(e)) from None


def read_texts(path: str, what: str) -> tuple[list[str], list[int]]:
    """The non-blank lines of a file and their line numbers."""
    texts, numbers = [], []
    for number, line in iter_lines(path):
        if line.strip():
            texts.append(line)
            numbers.append(number)
    if not texts:
        raise CliError(f"{what} {'stdin' if path == '-' else path} has no non-blank lines")
    return texts, numbers


@contextmanager
def stdin_as_file() -> Iterator[str]:
    """Copy stdin into a temporary file and yield its path: disk, not memory, holds the texts."""
    spool = tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False)
    try:
        with spool:
            for _, line in iter_lines("-"):
                spool.write(line.encode("utf-8") + b"\n")
        yield spool.name
    finally:
        Path(spool.name).unlink(missing_ok=True)


chunked = common.chunked  # lists of `size` consecutive items, the last one shorter


# ---------------------------------------------------------------- embedding with a progress bar
def interactive() -> bool:
    """Progress bars only for a person at a terminal; redirected stderr stays a clean log."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_setting() -> bool | None:
    """show_progress_bar for the embedder: its own rule (big inputs only) at a terminal, else off."""
    return None if interactive() else False


def progress(total: int | None, unit: str):
    """A tqdm bar on stderr for big inputs at a terminal; a silent one (disabled) otherwise."""
    from tqdm.auto import tqdm

    from ..embedder import PROGRESS_BAR_MIN_TEXTS

    show = total is not None and total >= PROGRESS_BAR_MIN_TEXTS and interactive()
    return tqdm(total=total, unit=unit, desc="Embedding", file=sys.stderr, disable=not show)


def embed_texts(embedder, texts: list[str], batch_size: int, normalize: bool, bar, prefix: str = "") -> np.ndarray:
    """(len(texts), D) float32 in input order, batch by batch, advancing `bar`; the same numbers as encode()."""
    logger.info("embedding %d texts", len(texts))
    if prefix:  # plain concatenation, exactly as Embedder.encode_queries does
        texts = [prefix + text for text in texts]
    out = np.empty((len(texts), embedder.dimension), dtype=np.float32)
    for indices, batch in embedder.iter_batches(texts, batch_size=batch_size, normalize_embeddings=normalize,
                                                show_progress_bar=False):
        out[indices] = batch.cpu().numpy()
        bar.update(len(indices))
    return out


# ---------------------------------------------------------------- writing
Embed = Callable[[list[str]], np.ndarray]  # a chunk of texts -> its (len(chunk), D) float32 rows
NPY_DTYPE = np.dtype("<f4")  # what a .npy output holds, written row after row


def allocate(f, size: int) -> None:
    """Reserve `size` bytes for the open file f now, so a full disk fails here, before any work.
    A filesystem that cannot (EOPNOTSUPP) is skipped: the writes that follow report a full disk."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:  # no posix_fallocate on this platform (macOS)
        pass


def write_npy_header(f, total: int, dimension: int) -> None:
    """The header np.save and open_memmap write for a C-order little-endian float32 (total, dimension) array."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(NPY_DTYPE),
                                             "fortran_order": False, "shape": (total, dimension)})


def write_npy(output: Path, chunks: Iterable[list[str]], embed: Embed, total: int, dimension: int) -> None:
    """A float32 (total, dimension) .npy file: the header, the whole file allocated, then the rows
    a chunk at a time (written, not memory-mapped: a write to a full disk is an error, a store
    into a memory map of one is a SIGBUS)."""
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        write_npy_header(f, total, dimension)
        allocate(f, f.tell() + total * dimension * NPY_DTYPE.itemsize)
        row = 0
        for chunk in chunks:
            f.write(memoryview(np.ascontiguousarray(embed(chunk), dtype=NPY_DTYPE)).cast("B"))
            row += len(chunk)
        if row != total:
            raise CliError(f"the input changed while it was read ({total} lines, then {row})")
    _wrote_npy(output, total, dimension)


def write_jsonl(output: Path, chunks: Iterable[list[str]], embed: Embed, dimension: int) -> None:
    """One {"text", "embedding"} object per line, a chunk at a time."""
    count = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for chunk in chunks:
            f.writelines(jsonl_lines(chunk, embed(chunk)))
            count += len(chunk)
        if count == 0:
            raise CliError("the input is empty")
    _wrote_jsonl(output, count, dimension)


def jsonl_lines(texts: list[str], vectors: np.ndarray) -> Iterator[str]:
    """The .jsonl output's lines for some texts and their vectors, each ending in a newline."""
    for text, vector in zip(texts, vectors):
        # str(np.float32) is the shortest text that reads back as the same float32
        numbers = ", ".join(map(str, vector))
        yield f'{{"text": {json.dumps(text, ensure_ascii=False)}, "embedding": [{numbers}]}}\n'


def _wrote_npy(output: Path, total: int, dimension: int) -> None:
    print(f"wrote {total} x {dimension} float32 embeddings to {output}")


def _wrote_jsonl(output: Path, count: int, dimension: int) -> None:
    print(f"wrote {count} embeddings of dimension {dimension} to {output}")


# ---------------------------------------------------------------- writing in parts (minibge encode under torchrun)
# A part holds a contiguous run of the output's rows, in the form they take inside the output:
# raw little-endian float32 rows for a .npy output (the .npy file is a header, then exactly
# these bytes, part after part), finished lines for a .jsonl output. Joining the parts is then
# a byte copy, whatever their size, with a small buffer: memory stays flat.


def part_paths(output: Path, world: int, run: int) -> list[Path]:
    """Where each rank writes its part: hidden names beside the output that carry this run's
    random number `run` (every rank of a group uses the same one, see cli/shard.py), so that two
    sharded runs writing the same output never share a part (e.g. .out.npy.3f9a0c.rank1-of-2.partial)."""
    return [output.with_name(f".{output.name}.{run:016x}.rank{rank}-of-{world}.partial") for rank in range(world)]


def new_run_number() -> int:
    """A random number that names one sharded run's parts (63 bits: it travels in an int64 tensor)."""
    return secrets.randbits(63)


def write_part(part: Path, output: Path, chunks: Iterable[list[str]], embed: Embed) -> int:
    """Embed the chunks into `part` in the form `output`'s format needs; returns the number of texts.

    The part is created anew (refused if the name exists: it belongs to another run). A failed or
    interrupted part is deleted: only a complete part is left for joining."""
    count = 0
    jsonl = output.suffix.lower() == ".jsonl"
    try:
        with open(part, "xb") as f:
            for chunk in chunks:
                rows = embed(chunk)
                if jsonl:
                    f.writelines(line.encode("utf-8") for line in jsonl_lines(chunk, rows))
                else:
                    f.write(memoryview(np.ascontiguousarray(rows, dtype=NPY_DTYPE)).cast("B"))
                count += len(chunk)
    except FileExistsError:
        raise CliError(f"{part} already exists: another run is writing it; nothing was written") from None
    except BaseException as err:
        part.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in common.WRITE_ERRNOS:
            raise OSError(err.errno, f"{os.strerror(err.errno)} while writing a part of {output.name}; "
                                     "nothing was written", str(part)) from None
        raise
    return count


def join_parts(output: Path, parts: list[tuple[Path, int]], dimension: int) -> None:
    """Write `output` (.npy or .jsonl) from its parts, given in order as (path, number of rows).

    The output is written to a temporary name beside itself and renamed at the end, as write_npy and
    write_jsonl do."""
    total = sum(rows for _, rows in parts)
    npy = output.suffix.lower() == ".npy"
    if npy:  # a part that is not exactly its rows would shift every row after it: check first
        for part, rows in parts:
            size, expected = part.stat().st_size, rows * dimension * NPY_DTYPE.itemsize
            if size != expected:
                raise CliError(f"{part} holds {size:,} bytes, not {rows} rows of {dimension} float32 "
                               f"({expected:,} bytes)")
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        if npy:
            write_npy_header(f, total, dimension)
        allocate(f, f.tell() + sum(part.stat().st_size for part, _ in parts))
        for part, _ in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, f, 1 << 20)
    (_wrote_npy if npy else _wrote_jsonl)(output, total, dimension)


# ---------------------------------------------------------------- printing
def print_summary(chunks: Iterable[list[str]], embed: Embed, dimension: int, normalize: bool) -> None:
    """Embed everything (to report the count), but keep and show only the first few rows."""
    shown, count = [], 0
    for chunk in chunks:
        vectors = embed(chunk)
        shown += [(text, vector.copy()) for text, vector in zip(chunk, vectors)][:SUMMARY_ROWS - len(shown)]
        count += len(chunk)
    if count == 0:
        raise CliError("the input is empty")
    print(f"{count} embedding{'s' if count != 1 else ''} of dimension {dimension} "
          f"(float32, {'L2-normalized' if normalize else 'not normalized'}); "
          f"use --output FILE.npy or FILE.jsonl to save them")
    for text, vector in shown:
        head = " ".join(f"{x:+.4f}" for x in vector[:6])
        print(f"  {truncate(text, 40):<40}  [{head} ...]")
    if count > len(shown):
        print(f"  ... and {count - len(shown)} more")


def truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_matrix(matrix: np.ndarray, labels: list[str], row_width: int = 32, col_width: int = 12) -> str:
    """A square matrix as text, rows labelled by the truncated sentences, columns by their start."""
    row_width = min(row_width, max(len(truncate(label, row_width)) for label in labels))
    header = " " * row_width + "".join(f"  {truncate(label, col_width):>{col_width}}" for label in labels)
    lines = [header]
    for label, row in zip(labels, matrix):
        # + 0.0 turns a -0.0 (a tiny negative cosine, rounded) into 0.0, so it never prints as -0.0000
        lines.append(f"{truncate(label, row_width):<{row_width}}"
                     + "".join(f"  {round(float(x), 4) + 0.0:>{col_width}.4f}" for x in row))
    return "\n".join(lines)


# ---------------------------------------------------------------- what `encode` embeds (one process or sharded)
def encode_source(args, source: str | None) -> tuple[int | None, Iterator[str]]:
    """(how many texts, or None for stdin; the texts) from args.texts (source None), a file or '-'."""
    if source is None:
        return len(args.texts), iter(args.texts)
    total = None  # unknown for stdin (unless copied to a file): no progress bar then
    if source != "-":  # a first, cheap pass: the .npy shape, the progress bar, UTF-8 errors early
        total = sum(1 for _ in iter_lines(source))
        if total == 0:
            raise CliError(f"--input {args.input} is empty")
    return total, (line for _, line in iter_lines(source))


def query_prefix(args, embedder) -> str:
    """What `encode` prepends to every text: the query instruction with --query, else nothing."""
    if not args.query:
        return ""
    if not embedder.query_instruction:
        logger.warning("%s has no query instruction; --query embeds the texts as they are", embedder.name)
    return embedder.query_instruction or ""


class ChunkEmbedder:
    """Embeds a chunk of texts the way `encode` was asked to (--no-normalize, --batch-size; `prefix`
    from query_prefix), advancing a progress bar, and counts the blank texts it was given."""

    def __init__(self, args, embedder, prefix: str, bar):
        self.embedder, self.prefix, self.bar = embedder, prefix, bar
        self.batch_size, self.normalize = args.batch_size, not args.no_normalize
        self.blank = 0

    def __call__(self, chunk: list[str]) -> np.ndarray:
        self.blank += sum(1 for text in chunk if not text.strip())
        return embed_texts(self.embedder, chunk, self.batch_size, self.normalize, self.bar, self.prefix)


def warn_blank(blank: int) -> None:
    if blank:
        logger.warning("%d blank line(s) were embedded as empty texts (row i is line i+1)", blank)
