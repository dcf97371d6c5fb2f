"""The `minibge` command line: embed, compare, search and evaluate from the shell.

    minibge encode "A man is eating food." "A man eats pasta."      # summary on stdout
    minibge encode --input texts.txt --output vectors.npy            # one text per line
    cat texts.txt | minibge encode --input - --output vectors.jsonl  # stdin works too
    torchrun --standalone --nproc_per_node 2 -m minibge encode --input texts.txt --output vectors.npy
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
Outputs are checked for writability before any work starts. Ctrl-C (SIGINT, exit 130) and
SIGTERM (what `timeout`, a job scheduler or `docker stop` send; exit 143) both unwind cleanly:
an existing output file is left as it was, and no half-written file stays behind.

Under torchrun (WORLD_SIZE > 1), `encode --input FILE --output FILE` is sharded: each rank embeds
a contiguous slice of the lines and rank 0 joins the slices, in input order (cli_shard.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import __version__, hub
from .cli_io import (PROG, CliError, UsageError, check_readable, check_writable, chunked, embed_texts,
                     format_matrix, interactive, iter_lines, one_line, print_summary, progress, progress_setting,
                     read_texts, stdin_as_file, write_jsonl, write_npy)
from .cli_model import DEFAULT_MODELS, MODEL_ENV, describe, load
from .evaluate import TASKS, evaluate_task, format_markdown, task_key
from .hub import HubError
from .search import top_k

CHUNK_TEXTS = 10_000  # texts read, embedded and written at a time: bounds memory for big files
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "eval" / "data"

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

logger = logging.getLogger(__name__)


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


def _hub_id(value: str) -> str:
    try:
        hub.check_hub_id(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _task(value: str) -> str:
    try:
        return task_key(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    # `info` takes the model options only; the commands that embed also take the batching ones
    model_only = _Parser(add_help=False)
    group = model_only.add_argument_group("model options")
    group.add_argument("-m", "--model", metavar="PATH_OR_ID",
                       help=f"model folder or Hub id (default: ${MODEL_ENV}, else the first of "
                            f"{', '.join(DEFAULT_MODELS)} found in the weights folder)")
    group.add_argument("--device", type=_device, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       help="weights' precision; half precision applies on a GPU only (default: float32)")
    model = _Parser(add_help=False, parents=[model_only])
    group = model.add_argument_group("batching options")
    group.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass (default: 32)")
    group.add_argument("--max-length", type=_max_length,
                       help="truncate texts to this many tokens (default: the model's own limit)")
    group.add_argument("--plain", action="store_true",
                       help="run the plain model (minibge/model.py) rather than the fast path: the same "
                            "vectors, slower; for checking the fast path or stepping through the model")

    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=_Parser)

    def command(name, help, description, epilog, parents=(verbose, model)):
        return commands.add_parser(name, help=help, description=description, epilog=epilog,
                                   parents=list(parents), formatter_class=_Formatter)

    p = command("encode", "embed texts into vectors (.npy / .jsonl / a summary)",
                "Embed texts given as arguments or read one per line from --input. With --output "
                "FILE.npy the result is a float32 (N, D) array whose row i is input line i+1 (blank "
                "lines included, as empty texts); with FILE.jsonl one {\"text\", \"embedding\"} object "
                "per line. Without --output, a short summary goes to stdout. Big files are embedded "
                f"{CHUNK_TEXTS:,} lines at a time, so memory stays bounded. Under torchrun, each rank "
                "embeds a contiguous slice of --input and rank 0 writes --output from the slices, in "
                "input order.",
                _examples('minibge encode "A man is eating food." "A man eats pasta."',
                          "minibge encode --input texts.txt --output vectors.npy",
                          "cat texts.txt | minibge encode --input - --output vectors.jsonl",
                          'minibge encode --query "what is BGE?" -m BAAI/bge-small-en-v1.5',
                          "torchrun --standalone --nproc_per_node 4 -m minibge encode --input big.txt "
                          "--output vectors.npy"))
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
    p.add_argument("repo_id", metavar="REPO_ID", type=_hub_id, help="Hub model id, e.g. BAAI/bge-small-en-v1.5")
    p.add_argument("--dest", metavar="DIR", help="target folder (default: <weights folder>/<model name>)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.set_defaults(run=cmd_download)

    p = command("info", "describe a model: architecture, parameters, pooling, origin",
                "Load a model and print its configuration, parameter count, pooling, maximum "
                "length, query instruction, and where its files came from.",
                _examples("minibge info", "minibge info -m weights/all-MiniLM-L6-v2",
                          "minibge info -m BAAI/bge-small-en-v1.5"),
                parents=(verbose, model_only))
    p.set_defaults(run=cmd_info)

    p = command("eval", "score a model on STS-B, SICK-R and SciFact (as MTEB does)",
                "Run built-in MTEB tasks and print a markdown table of the measured main score next "
                "to the published one: stsb and sickr (cosine Spearman), scifact (nDCG@10).",
                _examples("minibge eval", "minibge eval --task stsb --task sickr -m weights/all-MiniLM-L6-v2",
                          "minibge eval --output results.json --markdown results.md"))
    p.add_argument("-t", "--task", action="append", type=_task, metavar="TASK",
                   help=f"task to run, repeatable: {', '.join(TASKS)} (default: all)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"folder with stsbenchmark/, sick2014/, scifact/ (default: {DEFAULT_DATA_DIR} if it exists)")
    p.add_argument("-o", "--output", metavar="JSON", help="write the list of result dicts to this JSON file")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown table to this file too")
    p.set_defaults(run=cmd_eval)

    from .cli_train import add_training_commands  # finetune, mine (imported here: it imports this module)
    add_training_commands(commands, parents=[verbose])
    from .bench import add_bench_command  # minibge bench: speed against transformers, ST, ONNX Runtime
    add_bench_command(commands, parents=[verbose])
    from .cli_lab import add_lab_command  # the divergence lab (imported here: it imports this module)
    add_lab_command(commands, parents=[verbose, model])
    return parser



# ---------------------------------------------------------------- commands
def _one_source(arguments: list[str], path: str | None, noun: str, option: str) -> None:
    if path is not None and arguments:
        raise UsageError(f"give {noun} as arguments or {option} FILE, not both")


def cmd_encode(args) -> int:
    _one_source(args.texts, args.input, "texts", "--input")
    if args.input is None and not args.texts:
        raise UsageError("nothing to encode: give texts as arguments, or --input FILE ('-' for stdin)")
    if args.instruction is not None and not args.query:
        raise UsageError("--instruction only applies with --query")
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and output.suffix.lower() not in (".npy", ".jsonl"):
        raise UsageError(f"--output must end in .npy or .jsonl, got {args.output!r}")
    check_readable(args.input, "--input")
    check_writable(args.output, "--output")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: each rank embeds a slice (cli_shard.py)
        if args.input == "-":
            raise UsageError("under torchrun, --input must be a file: stdin can be read by one process only")
        if output is None:
            raise UsageError("under torchrun, give --output FILE.npy or FILE.jsonl (rank 0 joins the ranks' "
                             "slices there); the summary on stdout is for one process")
        from .cli_shard import encode_sharded
        return encode_sharded(args, output)
    if args.input == "-" and output is not None and output.suffix.lower() == ".npy":
        # .npy needs the row count before the first row, and stdin can be read only once
        with stdin_as_file() as copy:
            return _encode(args, output, copy)
    return _encode(args, output, args.input)


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


def _encode(args, output: Path | None, source: str | None) -> int:
    """encode, once the arguments are checked: texts from args.texts (source None), a file or '-'."""
    total, lines = encode_source(args, source)
    embedder, _, _ = load(args, query_instruction=args.instruction)
    prefix = query_prefix(args, embedder)
    with progress(total, "text") as bar:
        embed = ChunkEmbedder(args, embedder, prefix, bar)
        chunks = chunked(lines, CHUNK_TEXTS)
        if output is None:
            print_summary(chunks, embed, embedder.dimension, embed.normalize)
        elif output.suffix.lower() == ".npy":
            write_npy(output, chunks, embed, total, embedder.dimension)
        else:
            write_jsonl(output, chunks, embed, embedder.dimension)
    if output is not None:
        warn_blank(embed.blank)
    return 0


def cmd_similarity(args) -> int:
    _one_source(args.sentences, args.input, "sentences", "--input")
    check_readable(args.input, "--input")
    sentences = read_texts(args.input, "--input")[0] if args.input is not None else args.sentences
    if len(sentences) < 2:
        raise UsageError("give at least two sentences to compare")
    embedder, _, _ = load(args)
    vectors = embedder.encode(sentences, batch_size=args.batch_size, normalize_embeddings=True,
                              show_progress_bar=progress_setting())
    matrix = np.round(vectors @ vectors.T, 4)
    print(format_matrix(matrix, sentences))
    return 0


def cmd_search(args) -> int:
    _one_source(args.queries, args.queries_file, "queries", "--queries")
    if args.queries_file is None and not args.queries:
        raise UsageError("no queries: give them as arguments or --queries FILE")
    if args.corpus == "-" and args.queries_file == "-":
        raise UsageError("--corpus and --queries cannot both read stdin")
    if args.no_instruction and args.instruction is not None:
        raise UsageError("--no-instruction and --instruction contradict each other")
    check_readable(args.corpus, "--corpus")
    check_readable(args.queries_file, "--queries")
    queries = read_texts(args.queries_file, "--queries")[0] if args.queries_file else args.queries
    passages, line_numbers = read_texts(args.corpus, "--corpus")

    embedder, _, _ = load(args)
    instruction = "" if args.no_instruction else args.instruction  # None: the model's own
    logger.info("query instruction: %r", embedder.query_instruction if instruction is None else instruction)
    q = torch.from_numpy(embedder.encode_queries(queries, instruction=instruction, batch_size=args.batch_size,
                                                 show_progress_bar=progress_setting()))
    with progress(len(passages), "passage") as bar:
        # passages are embedded a chunk at a time, as top_k asks for them: memory stays bounded
        doc_chunks = (torch.from_numpy(embed_texts(embedder, chunk, args.batch_size, True, bar))
                      for chunk in chunked(passages, CHUNK_TEXTS))
        best_scores, best_index = top_k(q, doc_chunks, args.top_k)
    for i, query in enumerate(queries):
        if i:
            print()
        print(f"query: {query}")
        for rank, (score, j) in enumerate(zip(best_scores[i].tolist(), best_index[i].tolist()), start=1):
            print(f"{rank:>4}  {score:.4f}  [line {line_numbers[j]}] {passages[j]}")
    return 0


def cmd_download(args) -> int:
    folder = hub.download(args.repo_id, dest=args.dest, revision=args.revision, progress=interactive())
    print(folder)
    return 0


def cmd_info(args) -> int:
    rows = describe(*load(args))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_eval(args) -> int:
    tasks = list(dict.fromkeys(args.task or TASKS))
    if args.data_dir is not None:
        data_dir = Path(args.data_dir).expanduser()
        if not data_dir.is_dir():
            raise CliError(f"--data-dir {data_dir} is not a folder")
    elif DEFAULT_DATA_DIR.is_dir():
        data_dir = DEFAULT_DATA_DIR
    else:
        raise UsageError(f"--data-dir is required (the default {DEFAULT_DATA_DIR} does not exist)")
    check_writable(args.output, "--output")
    check_writable(args.markdown, "--markdown")

    embedder, folder, _ = load(args)
    results = []
    for task in tasks:
        print(f"{PROG}: running {task} ...", file=sys.stderr)
        result = evaluate_task(embedder, task, data_dir, batch_size=args.batch_size,
                               show_progress_bar=progress_setting())
        results.append({"model": folder.name, **result})
    table = format_markdown(results, folder.name)  # the folder name is what the published scores use
    print(table)
    for path, text in ((args.output, json.dumps(results, indent=2)), (args.markdown, table)):
        if path:
            Path(path).expanduser().write_text(text + "\n", encoding="utf-8")
            print(f"{PROG}: wrote {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- entry point
class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every `finally` removes its half-written file."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


def _catch_sigterm():
    """Make SIGTERM raise Terminated; returns the handler to restore (None off the main thread,
    where Python cannot install one)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 2 bad usage)."""
    parser = build_parser()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    package_logger = logging.getLogger("minibge")
    package_logger.addHandler(handler)
    old_level, old_propagate = package_logger.level, package_logger.propagate
    package_logger.propagate = False  # our handler prints it; don't print it twice via the root logger
    previous_sigterm = _catch_sigterm()
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
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (HubError, OSError, ValueError, TypeError) as e:  # ValueError covers json.JSONDecodeError
        if isinstance(e, BrokenPipeError):  # `minibge ... | head`: the reader left, nothing to report
            try:  # point stdout at /dev/null so the interpreter's final flush cannot fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            return 1
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except _OUT_OF_MEMORY:
        print(f"{PROG}: error: out of memory; try a smaller --batch-size or --max-length", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM  # 143, as a shell reports a process killed by SIGTERM
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        package_logger.propagate = old_propagate


if __name__ == "__main__":
    sys.exit(main())
