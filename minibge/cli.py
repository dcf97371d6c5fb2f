"""The `minibge` command line: embed, compare, search and evaluate from the shell.

    minibge encode "A man is eating food." "A man eats pasta."      # summary on stdout
    minibge encode --input texts.txt --output vectors.npy            # one text per line
    cat texts.txt | minibge encode --input - --output vectors.jsonl  # stdin works too
    minibge encode --query "what is BGE?"                            # with the query instruction
    minibge similarity "A cat sits." "A kitten is sitting." "Stocks fell today."
    minibge search --corpus passages.txt "how do vaccines work?" --top-k 3
    minibge download BAAI/bge-small-en-v1.5                          # into weights/
    minibge info -m BAAI/bge-small-en-v1.5
    minibge eval --task stsb --output results.json --markdown results.md

Also available as ``python -m minibge``. The model is ``--model/-m`` (a folder or a Hub id
like BAAI/bge-small-en-v1.5), else $MINIBGE_MODEL, else the first of bge-small-en-v1.5,
bge-base-en-v1.5 and all-MiniLM-L6-v2 found in the weights folder (see hub.default_weights_dir).

Results go to stdout, everything else (which model was used, progress bars, logging with
``-v``) to stderr, so ``minibge similarity a b > out.txt`` captures only the matrix.
A user mistake (a missing file, a bad option, an unreachable Hub) ends with one line,
``minibge: error: ...``, and exit status 2 for a bad command line, 1 for anything else.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import __version__, hub
from .hub import HubError

PROG = "minibge"
MODEL_ENV = "MINIBGE_MODEL"
DEFAULT_MODELS = ("bge-small-en-v1.5", "bge-base-en-v1.5", "all-MiniLM-L6-v2")
EVAL_TASKS = ("stsb", "sickr", "scifact")
CHUNK_TEXTS = 10_000  # texts read, embedded and written at a time: bounds memory for big files
SUMMARY_ROWS = 10  # rows `encode` shows when it has no --output
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "eval" / "data"

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

logger = logging.getLogger(__name__)


class CliError(Exception):
    """A problem to report in one line; exit status 1."""
    exit_code = 1


class UsageError(CliError):
    """A bad command line; exit status 2, as argparse uses."""
    exit_code = 2


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one line on stderr, not usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example lines as written; wraps the description."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


# ---------------------------------------------------------------- argument types
def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _max_length(value: str) -> int:
    number = _positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError("must be at least 2 (room for [CLS] and [SEP])")
    return number


def _device(value: str) -> str:
    try:
        torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; try cpu, cuda, cuda:1 or mps") from None
    return value


def _task(value: str) -> str:
    key = value.lower().replace("-", "").replace("_", "")
    if key not in EVAL_TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {value!r}; choose from {', '.join(EVAL_TASKS)}")
    return key


# ---------------------------------------------------------------- the parser
def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=_Formatter,
                     description="BGE text embeddings in plain PyTorch: encode texts, compare them, "
                                 "search a corpus, evaluate a model.",
                     epilog=_examples('minibge encode "hello world"',
                                      "minibge similarity 'A cat sits.' 'A kitten sits.' 'Stocks fell.'",
                                      "minibge search --corpus passages.txt 'how do vaccines work?'",
                                      "minibge download BAAI/bge-small-en-v1.5",
                                      "minibge <command> --help   (options of one command)"))
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    # -v again on every command, so `minibge encode -v` works as well as `minibge -v encode`
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress (INFO) to stderr")
    model = _Parser(add_help=False)
    group = model.add_argument_group("model options")
    group.add_argument("-m", "--model", metavar="PATH_OR_ID",
                       help=f"model folder or Hub id (default: ${MODEL_ENV}, else the first of "
                            f"{', '.join(DEFAULT_MODELS)} found in the weights folder)")
    group.add_argument("--device", type=_device, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       help="weights' precision; half precision applies on a GPU only (default: float32)")
    group.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass (default: 32)")
    group.add_argument("--max-length", type=_max_length,
                       help="truncate texts to this many tokens (default: the model's own limit)")

    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=_Parser)

    def command(name, help, description, epilog, parents=(verbose, model)):
        return commands.add_parser(name, help=help, description=description, epilog=epilog,
                                   parents=list(parents), formatter_class=_Formatter)

    p = command("encode", "embed texts into vectors (.npy / .jsonl / a summary)",
                "Embed texts given as arguments or read one per line from --input. With --output "
                "FILE.npy the result is a float32 (N, D) array whose row i is input line i+1 (blank "
                "lines included, as empty texts); with FILE.jsonl one {\"text\", \"embedding\"} object "
                "per line. Without --output, a short summary goes to stdout. Big files are embedded "
                f"{CHUNK_TEXTS:,} lines at a time, so memory stays bounded.",
                _examples('minibge encode "A man is eating food." "A man eats pasta."',
                          "minibge encode --input texts.txt --output vectors.npy",
                          "cat texts.txt | minibge encode --input - --output vectors.jsonl",
                          'minibge encode --query "what is BGE?" -m BAAI/bge-small-en-v1.5'))
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (or use --input)")
    p.add_argument("-i", "--input", metavar="FILE", help="UTF-8 text file, one text per line; '-' reads stdin")
    p.add_argument("-o", "--output", metavar="FILE", help="write embeddings to FILE.npy or FILE.jsonl")
    p.add_argument("--query", action="store_true",
                   help="the texts are search queries: prepend the model's query instruction")
    p.add_argument("--instruction", metavar="TEXT", help="with --query: use this instruction instead")
    p.add_argument("--no-normalize", action="store_true", help="keep raw pooled vectors (no L2 normalisation)")
    p.set_defaults(run=cmd_encode)

    p = command("similarity", "print the cosine similarity matrix of a few sentences",
                "Embed the sentences and print their pairwise cosine similarities, rounded to 4 "
                "decimals, with rows and columns labelled by the (truncated) sentences.",
                _examples("minibge similarity 'A cat sits on the mat.' 'A kitten is sitting.' 'Stocks fell.'",
                          "minibge similarity --input sentences.txt"))
    p.add_argument("sentences", nargs="*", metavar="SENTENCE", help="two or more sentences (or use --input)")
    p.add_argument("-i", "--input", metavar="FILE", help="one sentence per line ('-' reads stdin); blank lines skipped")
    p.set_defaults(run=cmd_similarity)

    p = command("search", "find the passages of a corpus closest to some queries",
                "Embed a corpus (one passage per line) and the queries, and print the --top-k "
                "passages for each query by cosine similarity. Queries get the model's query "
                "instruction (BGE: 'Represent this sentence for searching relevant passages: '), "
                "passages never do.",
                _examples("minibge search --corpus passages.txt 'how do vaccines work?' 'what is BGE?'",
                          "minibge search --corpus passages.txt --queries questions.txt --top-k 10"))
    p.add_argument("queries", nargs="*", metavar="QUERY", help="queries (or use --queries)")
    p.add_argument("-c", "--corpus", metavar="FILE", required=True,
                   help="passages, one per line ('-' reads stdin); blank lines skipped")
    p.add_argument("-q", "--queries", dest="queries_file", metavar="FILE", help="queries, one per line")
    p.add_argument("-k", "--top-k", type=_positive_int, default=5, help="passages to show per query (default: 5)")
    p.add_argument("--no-instruction", action="store_true", help="do not prepend the query instruction")
    p.add_argument("--instruction", metavar="TEXT", help="use this query instruction instead of the model's")
    p.set_defaults(run=cmd_search)

    p = command("download", "fetch a model from the Hugging Face Hub",
                "Download the files minibge needs (config, tokenizer, sentence-transformers settings, "
                "one copy of the weights) into DIR, by default the weights folder. Interrupted "
                "downloads resume; complete files are checked and skipped. $MINIBGE_HUB_URL or "
                "$HF_ENDPOINT names a mirror; $HF_TOKEN is sent for private models.",
                _examples("minibge download BAAI/bge-small-en-v1.5",
                          "minibge download BAAI/bge-base-en-v1.5 --dest /data/models/bge-base --revision main"),
                parents=(verbose,))
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model id, e.g. BAAI/bge-small-en-v1.5")
    p.add_argument("--dest", metavar="DIR", help="target folder (default: <weights folder>/<model name>)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.set_defaults(run=cmd_download)

    p = command("info", "describe a model: architecture, parameters, pooling, origin",
                "Load a model and print its configuration, parameter count, pooling, maximum "
                "length, query instruction, and where its files came from.",
                _examples("minibge info", "minibge info -m weights/all-MiniLM-L6-v2",
                          "minibge info -m BAAI/bge-small-en-v1.5"))
    p.set_defaults(run=cmd_info)

    p = command("eval", "score a model on STS-B, SICK-R and SciFact (as MTEB does)",
                "Run built-in MTEB tasks and print a markdown table of the measured main score next "
                "to the published one: stsb and sickr (cosine Spearman), scifact (nDCG@10).",
                _examples("minibge eval", "minibge eval --task stsb --task sickr -m weights/all-MiniLM-L6-v2",
                          "minibge eval --output results.json --markdown results.md"))
    p.add_argument("-t", "--task", action="append", type=_task, metavar="TASK",
                   help=f"task to run, repeatable: {', '.join(EVAL_TASKS)} (default: all)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"folder with stsbenchmark/, sick2014/, scifact/ (default: {DEFAULT_DATA_DIR} if it exists)")
    p.add_argument("-o", "--output", metavar="JSON", help="write the list of result dicts to this JSON file")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown table to this file too")
    p.set_defaults(run=cmd_eval)
    return parser


# ---------------------------------------------------------------- helpers: files
def _check_readable(path: str | None, option: str) -> None:
    """Fail before loading a model, not after, when an input file is missing."""
    if path is None or path == "-":
        return
    p = Path(path)
    if not p.exists():
        raise CliError(f"{option} file not found: {p}")
    if not p.is_file():
        raise CliError(f"{option} {p} is not a file")


def _check_writable(path: str | None, option: str) -> None:
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise CliError(f"{option}: folder {parent} does not exist")


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every line of a UTF-8 file, or of stdin for '-'."""
    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream with no bytes underneath (e.g. io.StringIO in tests)
            for number, line in enumerate(sys.stdin, start=1):
                line = line.removesuffix("\n").removesuffix("\r")
                yield number, line.removeprefix("\ufeff") if number == 1 else line
            return
        yield from _decode_lines(stream, "stdin")
        return
    with open(path, "rb") as stream:
        yield from _decode_lines(stream, path)


def _decode_lines(stream, name: str) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(stream, start=1):
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CliError(f"{name} line {number} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the text
        yield number, text


def _read_texts(path: str, what: str) -> tuple[list[str], list[int]]:
    """The non-blank lines of a file and their line numbers."""
    texts, numbers = [], []
    for number, line in _iter_lines(path):
        if line.strip():
            texts.append(line)
            numbers.append(number)
    if not texts:
        raise CliError(f"{what} {'stdin' if path == '-' else path} has no non-blank lines")
    return texts, numbers


def _atomic_output(path: Path) -> Path:
    """Where to write before renaming onto `path`, so a failed run never leaves half a file."""
    return path.with_name(path.name + ".partial")


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------- helpers: the model
def _pick_model(arg: str | None) -> tuple[str, str]:
    """(name or path, how it was chosen)."""
    if arg:
        return arg, "--model"
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV], f"${MODEL_ENV}"
    weights = hub.default_weights_dir()
    for name in DEFAULT_MODELS:
        if (weights / name / "config.json").is_file():
            return str(weights / name), f"default: first model found in {weights}"
    raise CliError(f"no model given (--model or ${MODEL_ENV}) and none of {', '.join(DEFAULT_MODELS)} is in "
                   f"{weights}; get one with `python weights/fetch_minilm.py` or "
                   f"`minibge download BAAI/bge-small-en-v1.5`")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def _resolve(args) -> tuple[Path, str]:
    """The model's local folder, and a sentence saying where it came from."""
    name, how = _pick_model(args.model)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser(), f"local folder ({how})"
    local = hub.default_weights_dir() / name.split("/")[-1]
    already = (local / "config.json").is_file()
    if not already and re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", name):  # a Hub id, as hub.py spells it
        print(f"{PROG}: {name} is not in {hub.default_weights_dir()}; downloading it", file=sys.stderr)
    folder = hub.resolve_model_path(name)  # raises HubError for a non-folder that is not a Hub id
    verb = "found in" if already else "downloaded into"
    return folder, f"Hub id {name!r}, {verb} the weights folder {hub.default_weights_dir()} ({how})"


def _load(args, query_instruction: str | None = None):
    """Resolve, announce on stderr, and load the embedder; returns (embedder, folder, origin)."""
    from .embedder import load_embedder

    _check_device(args.device)
    folder, origin = _resolve(args)
    print(f"{PROG}: model {folder.name} from {folder} [{origin}]", file=sys.stderr)
    embedder = load_embedder(folder, device=args.device, dtype=args.dtype, max_length=args.max_length,
                             query_instruction=query_instruction)
    return embedder, folder, origin


def _interactive() -> bool:
    """Progress bars only for a person at a terminal; redirected stderr stays a clean log."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _progress(total: int | None, unit: str):
    """A tqdm bar on stderr for big inputs, or a stand-in that does nothing."""
    from .embedder import PROGRESS_BAR_MIN_TEXTS

    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or total is None or total < PROGRESS_BAR_MIN_TEXTS or not _interactive():
        class _Nothing:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Nothing()
    return tqdm(total=total, unit=unit, desc="Embedding", file=sys.stderr)


def _embed(embedder, texts: list[str], batch_size: int, normalize: bool, bar, prefix: str = "") -> np.ndarray:
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


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- commands
def cmd_encode(args) -> int:
    if args.input is not None and args.texts:
        raise UsageError("give texts as arguments or --input FILE, not both")
    if args.input is None and not args.texts:
        raise UsageError("nothing to encode: give texts as arguments, or --input FILE ('-' for stdin)")
    if args.instruction is not None and not args.query:
        raise UsageError("--instruction only applies with --query")
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and output.suffix.lower() not in (".npy", ".jsonl"):
        raise UsageError(f"--output must end in .npy or .jsonl, got {args.output!r}")
    _check_readable(args.input, "--input")
    _check_writable(args.output, "--output")

    spool = None
    try:
        source = args.input
        if source == "-" and output is not None and output.suffix.lower() == ".npy":
            # .npy needs the row count before the first row; stdin can be read only once, so I
            # copy it to a temporary file first (disk, not memory, holds the texts).
            spool = tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False)
            with spool:
                for _, line in _iter_lines("-"):
                    spool.write(line.encode("utf-8") + b"\n")
            source = spool.name
        if source is None:
            total = len(args.texts)
            lines = iter(args.texts)
        else:
            total = None  # unknown for stdin (unless spooled): no progress bar then
            if source != "-":  # a first, cheap pass: the .npy shape, the progress bar, UTF-8 errors early
                total = sum(1 for _ in _iter_lines(source))
                if total == 0:
                    raise CliError(f"--input {args.input} is empty")
            lines = (line for _, line in _iter_lines(source))

        embedder, _, _ = _load(args, query_instruction=args.instruction)
        prefix = ""
        if args.query:
            prefix = embedder.query_instruction or ""
            if not prefix:
                logger.warning("%s has no query instruction; --query embeds the texts as they are", embedder.name)
        normalize = not args.no_normalize
        bar = _progress(total, "text")
        try:
            def embed(chunk: list[str]) -> np.ndarray:
                return _embed(embedder, chunk, args.batch_size, normalize, bar, prefix)

            chunks = _chunks(lines, CHUNK_TEXTS)
            if output is None:
                _print_summary(chunks, embed, embedder.dimension, normalize)
            elif output.suffix.lower() == ".npy":
                blank = _write_npy(output, chunks, embed, total, embedder.dimension)
            else:
                blank = _write_jsonl(output, chunks, embed, embedder.dimension)
        finally:
            bar.close()
        if output is not None and blank:
            logger.warning("%d blank line(s) were embedded as empty texts (row i is line i+1)", blank)
    finally:
        if spool is not None:
            Path(spool.name).unlink(missing_ok=True)
    return 0


def _write_npy(output: Path, chunks, embed, total: int, dimension: int) -> int:
    """Rows go straight into a memory-mapped .npy file; returns the number of blank texts."""
    partial, row, blank = _atomic_output(output), 0, 0
    try:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(total, dimension))
        for chunk in chunks:
            blank += sum(1 for text in chunk if not text.strip())
            array[row:row + len(chunk)] = embed(chunk)
            row += len(chunk)
        if row != total:
            raise CliError(f"the input changed while it was read ({total} lines, then {row})")
        array.flush()
        del array  # closes the memory map before the rename
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {total} x {dimension} float32 embeddings to {output}")
    return blank


def _write_jsonl(output: Path, chunks, embed, dimension: int) -> int:
    """One {"text", "embedding"} object per line, a chunk at a time; returns the number of blank texts."""
    partial, count, blank = _atomic_output(output), 0, 0
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for chunk in chunks:
                blank += sum(1 for text in chunk if not text.strip())
                for text, vector in zip(chunk, embed(chunk)):
                    # str(np.float32) is the shortest text that reads back as the same float32
                    numbers = ", ".join(map(str, vector))
                    f.write(f'{{"text": {json.dumps(text, ensure_ascii=False)}, "embedding": [{numbers}]}}\n')
                count += len(chunk)
        if count == 0:
            raise CliError("the input is empty")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {count} embeddings of dimension {dimension} to {output}")
    return blank


def _print_summary(chunks, embed, dimension: int, normalize: bool) -> None:
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
        print(f"  {_truncate(text, 40):<40}  [{head} ...]")
    if count > len(shown):
        print(f"  ... and {count - len(shown)} more")


def cmd_similarity(args) -> int:
    if args.input is not None and args.sentences:
        raise UsageError("give sentences as arguments or --input FILE, not both")
    _check_readable(args.input, "--input")
    sentences = _read_texts(args.input, "--input")[0] if args.input is not None else args.sentences
    if len(sentences) < 2:
        raise UsageError("give at least two sentences to compare")
    embedder, _, _ = _load(args)
    vectors = embedder.encode(sentences, batch_size=args.batch_size, normalize_embeddings=True,
                              show_progress_bar=None if _interactive() else False)
    matrix = np.round(vectors @ vectors.T, 4)
    print(format_matrix(matrix, sentences))
    return 0


def format_matrix(matrix: np.ndarray, labels: list[str], row_width: int = 32, col_width: int = 12) -> str:
    """A square matrix as text, rows labelled by the truncated sentences, columns by their start."""
    row_width = min(row_width, max(len(_truncate(label, row_width)) for label in labels))
    header = " " * row_width + "".join(f"  {_truncate(label, col_width):>{col_width}}" for label in labels)
    lines = [header]
    for label, row in zip(labels, matrix):
        lines.append(f"{_truncate(label, row_width):<{row_width}}" + "".join(f"  {x:>{col_width}.4f}" for x in row))
    return "\n".join(lines)


def cmd_search(args) -> int:
    if args.queries_file is not None and args.queries:
        raise UsageError("give queries as arguments or --queries FILE, not both")
    if args.queries_file is None and not args.queries:
        raise UsageError("no queries: give them as arguments or --queries FILE")
    if args.corpus == "-" and args.queries_file == "-":
        raise UsageError("--corpus and --queries cannot both read stdin")
    if args.no_instruction and args.instruction is not None:
        raise UsageError("--no-instruction and --instruction contradict each other")
    _check_readable(args.corpus, "--corpus")
    _check_readable(args.queries_file, "--queries")
    queries = _read_texts(args.queries_file, "--queries")[0] if args.queries_file else args.queries
    passages, line_numbers = _read_texts(args.corpus, "--corpus")

    embedder, _, _ = _load(args)
    instruction = "" if args.no_instruction else args.instruction  # None: the model's own
    logger.info("query instruction: %r", embedder.query_instruction if instruction is None else instruction)
    q = torch.from_numpy(embedder.encode_queries(queries, instruction=instruction, batch_size=args.batch_size,
                                                 show_progress_bar=None if _interactive() else False))
    top_k = min(args.top_k, len(passages))
    best_scores = torch.empty(len(queries), 0)
    best_index = torch.empty(len(queries), 0, dtype=torch.long)
    bar = _progress(len(passages), "passage")
    try:
        # chunk by chunk with a running top-k: memory is O(queries x chunk), not O(corpus)
        for start in range(0, len(passages), CHUNK_TEXTS):
            chunk = passages[start:start + CHUNK_TEXTS]
            scores = q @ torch.from_numpy(_embed(embedder, chunk, args.batch_size, True, bar)).T
            chunk_scores, chunk_index = scores.topk(min(top_k, len(chunk)), dim=1)
            merged = torch.cat([best_scores, chunk_scores], dim=1)
            merged_index = torch.cat([best_index, chunk_index + start], dim=1)
            best_scores, pick = merged.topk(min(top_k, merged.shape[1]), dim=1)
            best_index = merged_index.gather(1, pick)
    finally:
        bar.close()
    for i, query in enumerate(queries):
        if i:
            print()
        print(f"query: {query}")
        for rank, (score, j) in enumerate(zip(best_scores[i].tolist(), best_index[i].tolist()), start=1):
            print(f"{rank:>4}  {score:.4f}  [line {line_numbers[j]}] {passages[j]}")
    return 0


def cmd_download(args) -> int:
    folder = hub.download(args.repo_id, dest=args.dest, revision=args.revision,
                          progress=_interactive())
    print(folder)
    return 0


def cmd_info(args) -> int:
    embedder, folder, origin = _load(args)
    config = embedder.model.config
    n_params = sum(p.numel() for p in embedder.model.parameters())
    has_pooler = getattr(embedder.model, "pooler", None) is not None
    weights = next((f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
                    if (folder / f).is_file()), "?")
    instruction = embedder.query_instruction
    rows = [
        ("model", folder.name),
        ("folder", str(folder.resolve())),
        ("source", origin),
        ("weights file", weights),
        ("hidden size", config.hidden_size),
        ("layers", config.num_hidden_layers),
        ("attention heads", f"{config.num_attention_heads} (head dim {config.head_dim})"),
        ("intermediate size", config.intermediate_size),
        ("activation", config.hidden_act),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("max positions", config.max_position_embeddings),
        ("parameters", f"{n_params:,}" + (" (incl. pooler)" if has_pooler else " (no pooler)")),
        ("embedding dim", embedder.dimension),
        ("pooling", embedder.pooling),
        ("max length", f"{embedder.max_length} tokens"),
        ("query instruction", repr(instruction) if instruction else "(none)"),
        ("device", f"{embedder.device}, {next(embedder.model.parameters()).dtype}".replace("torch.", "")),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_task, format_markdown

    tasks = list(dict.fromkeys(args.task or EVAL_TASKS))
    if args.data_dir is not None:
        data_dir = Path(args.data_dir).expanduser()
        if not data_dir.is_dir():
            raise CliError(f"--data-dir {data_dir} is not a folder")
    elif DEFAULT_DATA_DIR.is_dir():
        data_dir = DEFAULT_DATA_DIR
    else:
        raise UsageError(f"--data-dir is required (the default {DEFAULT_DATA_DIR} does not exist)")
    _check_writable(args.output, "--output")
    _check_writable(args.markdown, "--markdown")

    embedder, folder, _ = _load(args)
    results = []
    for task in tasks:
        print(f"{PROG}: running {task} ...", file=sys.stderr)
        result = evaluate_task(embedder, task, data_dir, batch_size=args.batch_size,
                               show_progress_bar=None if _interactive() else False)
        results.append({"model": folder.name, **result})
    table = format_markdown(results, folder.name)  # the folder name is what the published scores use
    print(table)
    if args.output:
        Path(args.output).expanduser().write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"{PROG}: wrote {args.output}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).expanduser().write_text(table + "\n", encoding="utf-8")
        print(f"{PROG}: wrote {args.markdown}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- entry point
def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.splitlines())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 2 bad usage)."""
    parser = build_parser()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    package_logger = logging.getLogger("minibge")
    package_logger.addHandler(handler)
    old_level, old_propagate = package_logger.level, package_logger.propagate
    package_logger.propagate = False  # our handler prints it; don't print it twice via the root logger
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version
            return e.code if isinstance(e.code, int) else 0
        package_logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
        if args.command is None:
            parser.print_help()
            return 2
        return args.run(args)
    except CliError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (HubError, OSError, ValueError, TypeError) as e:  # ValueError covers json.JSONDecodeError
        if isinstance(e, BrokenPipeError):  # `minibge ... | head`: the reader left, nothing to report
            try:  # point stdout at /dev/null so the interpreter's final flush cannot fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            return 1
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except _OUT_OF_MEMORY:
        print(f"{PROG}: error: out of memory; try a smaller --batch-size or --max-length", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        package_logger.propagate = old_propagate


if __name__ == "__main__":
    sys.exit(main())
