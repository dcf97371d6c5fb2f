"""The `minibge` command line: embed, compare, search and evaluate from the shell.

    minibge encode "A man is eating food." "A man eats pasta."      # summary on stdout
    minibge encode --input texts.txt --output vectors.npy            # one text per line
    cat texts.txt | minibge encode --input - --output vectors.jsonl  # stdin works too
    torchrun --standalone --nproc_per_node 2 -m minibge encode --input texts.txt --output vectors.npy
    minibge encode --query "what is BGE?"                            # with the query instruction
    minibge similarity "A cat sits." "A kitten is sitting." "Stocks fell today."
    minibge search --corpus passages.txt "how do vaccines work?" --top-k 3
    minibge index --corpus passages.txt --out my-index                 # embed once ...
    minibge search --index my-index "how do vaccines work?"            # ... search many times
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
Outputs are checked for writability before any work starts, and written to a unique temporary
name renamed into place at the end (common.atomic_path). Ctrl-C (SIGINT, exit 130) and
SIGTERM (what `timeout`, a job scheduler or `docker stop` send; exit 143) both unwind cleanly:
an existing output file is left as it was, and no half-written file stays behind.

Under torchrun (WORLD_SIZE > 1), `encode --input FILE --output FILE` is sharded: each rank embeds
a contiguous slice of the lines and rank 0 joins the slices, in input order (cli/shard.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import torch

from .. import __version__
from ..hub import HubError
from .args import Formatter, Parser, batch_size_option, device, examples, max_length
from .bench import add_bench_command
from .embed import add_embedding_commands
from .eval import add_eval_command
from .index import add_index_command
from .io import PROG, CliError, one_line
from .lab import add_lab_command
from .model import DEFAULT_MODELS, MODEL_ENV, add_model_commands
from .rerank import add_rerank_commands
from .m3 import add_m3_command
from .train import add_training_commands

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, formatter_class=Formatter,
                     description="BGE text embeddings in plain PyTorch: encode texts, compare them, "
                                 "search a corpus, evaluate a model.",
                     epilog=examples('minibge encode "hello world"',
                                      "minibge similarity 'A cat sits.' 'A kitten sits.' 'Stocks fell.'",
                                      "minibge search --corpus passages.txt 'how do vaccines work?'",
                                      "minibge download BAAI/bge-small-en-v1.5",
                                      "minibge <command> --help   (options of one command)"))
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    # -v again on every command, so `minibge encode -v` works as well as `minibge -v encode`
    verbose = Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress (INFO) to stderr")
    # `info` takes the model options only; the commands that embed also take the batching ones
    model_only = Parser(add_help=False)
    group = model_only.add_argument_group("model options")
    group.add_argument("-m", "--model", metavar="PATH_OR_ID",
                       help=f"model folder or Hub id (default: ${MODEL_ENV}, else the first of "
                            f"{', '.join(DEFAULT_MODELS)} found in the weights folder)")
    group.add_argument("--device", type=device, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       help="weights' precision: float16 on a GPU only; bfloat16 on a GPU or on a CPU that "
                            "multiplies it in hardware (avx512_bf16, AMX), refused on other CPUs (default: float32)")
    model = Parser(add_help=False, parents=[model_only])
    group = model.add_argument_group("batching options")
    batch_size_option(group)
    group.add_argument("--max-length", type=max_length,
                       help="truncate texts to this many tokens (default: the model's own limit)")
    group.add_argument("--int8", action="store_true",
                       help="int8 matmuls, compiled (minibge.fast.speed_options): faster on a CPU, vectors close "
                            "to float32's, not equal, and closer with --int8-calibration (docs/benchmarks.md, 'int8')")
    group.add_argument("--int8-calibration", metavar="PATH",
                       help="with --int8: smooth the matmuls with this calibration, a file int8.save_calibration "
                            "wrote (.safetensors) or a text file, one text per line, to calibrate on (a few hundred)")
    group.add_argument("--plain", action="store_true",
                       help="run the plain model (minibge/model.py) rather than the fast path: the same "
                            "vectors, slower; for checking the fast path or stepping through the model")

    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=Parser)

    add_embedding_commands(commands, verbose, model, model_only)  # encode, similarity, search (embed.py)
    add_index_command(commands, verbose, model)                   # index (cli/index.py)
    add_model_commands(commands, verbose, model, model_only)      # download, info, export (model.py)
    add_eval_command(commands, verbose, model, model_only)        # eval (eval.py)
    add_training_commands(commands, parents=[verbose])            # finetune, mine, pretrain (cli/train.py)
    add_rerank_commands(commands, parents=[verbose])              # finetune-reranker (cli/rerank.py)
    add_m3_command(commands, parents=[verbose])                   # finetune-m3 (cli/m3.py)
    add_bench_command(commands, parents=[verbose])                # bench (cli/bench.py)
    add_lab_command(commands, parents=[verbose, model])           # the divergence lab (cli/lab.py)
    return parser


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
        if sys.stdout is None:  # started with stdout closed (>&-): what a command prints would vanish
            raise CliError("stdout is closed; redirect it to a file or /dev/null instead (> out.txt)")
        if args.command is None:
            parser.print_help()
            return 2
        return args.run(args)
    except CliError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    # ValueError covers json.JSONDecodeError; FloatingPointError is a training run that blew up
    except (HubError, OSError, ValueError, TypeError, FloatingPointError) as e:
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
