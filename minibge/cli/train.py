"""`minibge finetune`, `minibge mine` and `minibge pretrain`: the training commands (registered by cli.py).

    minibge mine -m weights/all-MiniLM-L6-v2 --input train.jsonl --output train.mined.jsonl --corpus corpus.jsonl
    minibge finetune -m weights/all-MiniLM-L6-v2 --train train.mined.jsonl --out runs/minilm-ft
    torchrun --standalone --nproc_per_node 2 -m minibge finetune ...   # data parallel, cross-device negatives

A bad training line ends the command with one line on stderr naming the file and line number
(exit 1), or is skipped with a warning under --skip-bad-lines.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .args import Formatter, batch_size_option, examples, max_length, positive_int
from .io import PROG, CliError, check_not_input, check_readable, check_writable, progress_setting
from ..common import write_text_atomic
from ..retromae import VARIANTS
from ..train import AUTOCAST_DTYPES, TrainConfig


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _probability(value: str) -> float:
    number = _positive_float(value)
    if not number < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return number


def _rank_window(value: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in value.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rank window like 10-100") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= start < end, got {value}")
    return start, end


def _add_loop_options(p, batch_size: int, unit: str, cache: bool = False) -> None:
    """The options of train/loop.py's loop (TrainConfig and --out), shared by finetune and pretrain
    (cache: --cache-chunk-size, for losses split at the embeddings: finetune's)."""
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty, or a run to --resume)")
    p.add_argument("--epochs", type=positive_int, default=1, help="passes over the data (default: 1)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"{unit} per step and rank (default: {batch_size})")
    p.add_argument("--lr", type=_positive_float, default=2e-5, help="peak learning rate (default: 2e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps warming up (default: 0.1)")
    p.add_argument("--grad-accumulation", type=positive_int, default=1, help="micro-batches per step (default: 1)")
    p.add_argument("--max-grad-norm", type=_positive_float, default=1.0, help="gradient clipping (default: 1.0)")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (default: 0, at the end only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--seed", type=int, default=42, help="data order, sampling and dropout (default: 42)")
    p.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default="fp32",
                   help="mixed precision (autocast): bf16 or fp16 on CUDA, bf16 on a CPU that multiplies it in hardware "
                        "(avx512_bf16 or amx_bf16; refused on other CPUs); default: fp32")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="set the model's gradient_checkpointing flag while training: less memory, more compute")
    p.add_argument("--no-onednn", action="store_true",
                   help="on the CPU, keep PyTorch's default matmuls (MKL) instead of oneDNN's, which are faster "
                        "on some CPUs (docs/benchmarks.md, \"Why oneDNN\"); the results agree to float rounding")
    p.add_argument("--log-steps", type=positive_int, default=10, help="log every N steps (default: 10)")
    if cache:
        p.add_argument("--cache-chunk-size", type=positive_int, metavar="N",
                       help="gradient caching: embed at most N texts at a time (no graph, then again with one), so "
                            "memory stays flat as --batch-size grows; the same gradient, one more forward pass")


def _train_config(args) -> tuple[TrainConfig, Path]:
    """TrainConfig and the output folder from _add_loop_options' arguments."""
    check_readable(args.train, "--train")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    if args.save_steps < 0:
        raise CliError(f"--save-steps must be >= 0, got {args.save_steps}")
    config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                         grad_accumulation=args.grad_accumulation, max_grad_norm=args.max_grad_norm,
                         save_steps=args.save_steps, seed=args.seed, precision=args.precision,
                         gradient_checkpointing=args.gradient_checkpointing, onednn=not args.no_onednn,
                         log_steps=args.log_steps, cache_chunk_size=getattr(args, "cache_chunk_size", None))
    return config, out


def _add_group_training_options(p, batch_size: int, group_size: int, group_help: str, instruction_help: str,
                                cache: bool = False) -> None:
    """The options of every command that trains on (query, pos, neg) groups (finetune, finetune-reranker,
    finetune-m3): the model and data, the loop's, the group and the two length limits."""
    p.add_argument("-m", "--model", required=True, metavar="PATH_OR_ID", help="the model to start from")
    p.add_argument("--train", required=True, metavar="JSONL", help="training data, one query per line")
    _add_loop_options(p, batch_size=batch_size, unit="queries", cache=cache)
    p.add_argument("--group-size", type=positive_int, default=group_size,
                   help=f"passages per query: 1 positive + N−1 negatives (default: {group_size}{group_help})")
    p.add_argument("--query-max-length", type=max_length, default=32, help="query tokens (default: 32)")
    p.add_argument("--passage-max-length", type=max_length, default=128, help="passage tokens (default: 128)")
    p.add_argument("--query-instruction", metavar="TEXT", help=instruction_help)
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines with a warning")


def add_training_commands(commands, parents) -> None:
    """Add `finetune`, `mine` and `pretrain` to cli.py's subparsers (parents: the shared -v option)."""
    p = commands.add_parser(
        "finetune", parents=parents, formatter_class=Formatter,
        help="contrastive fine-tuning on (query, pos, neg) jsonl",
        description="Fine-tune an embedder with InfoNCE on jsonl lines {\"query\", \"pos\": [...], \"neg\": [...]} "
                    "(optional \"prompt\", \"pos_scores\", \"neg_scores\"): each query gets one random positive and "
                    "group-size − 1 random negatives; every other passage in the batch is a negative too (and, under "
                    "torchrun, every passage on every rank). --out receives a complete embedder folder.",
        epilog=examples("minibge finetune -m weights/all-MiniLM-L6-v2 --train train.jsonl --out runs/ft",
                         "minibge finetune -m BAAI/bge-small-en-v1.5 --train t.jsonl --out runs/ft --save-steps 100",
                         "minibge finetune ... --out runs/ft --resume        (continue an interrupted run)",
                         "minibge finetune ... --batch-size 512 --cache-chunk-size 32   (a big batch, a chunk's memory)",
                         "torchrun --standalone --nproc_per_node 2 -m minibge finetune ..."))
    _add_group_training_options(p, batch_size=16, group_size=8, group_help="", cache=True,
                                instruction_help="instruction prepended to queries (default: the model's own; '' for none)")
    p.add_argument("--temperature", type=_positive_float, default=0.02, help="softmax temperature τ (default: 0.02)")
    p.add_argument("--no-in-batch-negatives", action="store_true", help="each query sees only its own group")
    p.add_argument("--no-cross-device", action="store_true", help="under torchrun: do not share negatives across ranks")
    p.add_argument("--distill", action="store_true", help="add distillation from pos_scores / neg_scores")
    p.set_defaults(run=cmd_finetune)

    p = commands.add_parser(
        "mine", parents=parents, formatter_class=Formatter,
        help="mine hard negatives for a training file with the model itself",
        description="Embed a candidate pool (--corpus, or every pos/neg passage of --input), rank it for each "
                    "query, sample --negatives passages from the ranks in --range that are not positives, and write "
                    "the jsonl again with \"neg\" replaced by them.",
        epilog=examples("minibge mine -m weights/all-MiniLM-L6-v2 --input train.jsonl --output mined.jsonl",
                         "minibge mine -m M --input train.jsonl --output mined.jsonl --corpus corpus.jsonl "
                         "--range 2-200 --negatives 15"))
    p.add_argument("-m", "--model", required=True, metavar="PATH_OR_ID", help="the model that ranks the pool")
    p.add_argument("-i", "--input", required=True, metavar="JSONL", help="training data {query, pos[, neg]}")
    p.add_argument("-o", "--output", required=True, metavar="JSONL", help="where to write the mined data")
    p.add_argument("--corpus", metavar="FILE", help="candidate pool: jsonl with \"text\" (and \"title\"), .gz ok, "
                                                    "or one passage per line (default: the passages of --input)")
    p.add_argument("--range", type=_rank_window, default=(10, 100), metavar="START-END",
                   help="0-based ranks to sample from (default: 10-100)")
    p.add_argument("--negatives", type=positive_int, default=15, help="negatives per query (default: 15)")
    p.add_argument("--query-instruction", metavar="TEXT", help="query instruction (default: the model's own)")
    batch_size_option(p)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines with a warning")
    p.set_defaults(run=cmd_mine)

    p = commands.add_parser(
        "pretrain", parents=parents, formatter_class=Formatter,
        help="RetroMAE pre-training on raw text (BGE's first stage)",
        description="Pre-train an encoder with RetroMAE (see minibge/retromae.py): the encoder reads each text with "
                    "30% of its words masked, a one-layer decoder rebuilds it from the [CLS] vector and a 50% "
                    "masked view. --train: jsonl {\"text\"} or one text per line. --out receives the encoder with "
                    "its MLM head (official layout; transformers BertModel / BertForMaskedLM load it), the "
                    "tokenizer, CLS pooling and the decoder layer: a starting point for finetune.",
        epilog=examples("minibge pretrain -m weights/all-MiniLM-L6-v2 --train corpus.jsonl --out runs/rmae "
                         "--max-length 128 --max-steps 300",
                         "minibge pretrain ... --out runs/rmae --resume        (continue an interrupted run)",
                         "minibge finetune -m runs/rmae --train train.jsonl --out runs/ft"))
    p.add_argument("-m", "--model", required=True, metavar="PATH_OR_ID", help="the model to start from")
    p.add_argument("--train", required=True, metavar="FILE", help="texts: jsonl {\"text\"} or one per line, .gz ok")
    _add_loop_options(p, batch_size=16, unit="texts")
    p.add_argument("--max-length", type=max_length, default=512, help="tokens per text (default: 512)")
    p.add_argument("--encoder-mask", type=_probability, default=0.3, help="encoder mask ratio (default: 0.3)")
    p.add_argument("--decoder-mask", type=_probability, default=0.5, help="decoder mask ratio (default: 0.5)")
    p.add_argument("--variant", choices=VARIANTS, default="bge",
                   help="query stream: FlagEmbedding's (through the embeddings' LayerNorm) or the paper's "
                        "(raw position rows) (default: bge)")
    p.set_defaults(run=cmd_pretrain)


def cmd_finetune(args) -> int:
    from ..train.finetune import finetune

    config, out = _train_config(args)
    metrics = finetune(args.model, args.train, out, config, temperature=args.temperature, group_size=args.group_size,
                       query_max_length=args.query_max_length, passage_max_length=args.passage_max_length,
                       query_instruction=args.query_instruction, in_batch_negatives=not args.no_in_batch_negatives,
                       cross_device=False if args.no_cross_device else None, distill=args.distill,
                       skip_bad_lines=args.skip_bad_lines, resume=args.resume)
    from ..train import is_main_process
    if is_main_process():
        print(f"{PROG}: fine-tuned model written to {out} (last loss {metrics.get('loss', float('nan')):.4f})",
              file=sys.stderr)
    return 0


def cmd_mine(args) -> int:
    from ..embedder import load_embedder
    from ..train.finetune import read_train_file
    from ..train.mine import mine_hard_negatives, read_corpus

    check_readable(args.input, "--input")
    check_readable(args.corpus, "--corpus")
    check_writable(args.output, "--output")
    check_not_input(args.output, "--output", {"--input": args.input, "--corpus": args.corpus})
    examples = read_train_file(args.input, args.skip_bad_lines)
    pool = read_corpus(args.corpus) if args.corpus else None
    embedder = load_embedder(args.model, device=args.device)
    mined = mine_hard_negatives(embedder, examples, pool, args.range, args.negatives, args.query_instruction,
                                args.batch_size, args.seed, show_progress_bar=progress_setting())
    output = Path(args.output).expanduser()
    write_text_atomic(output, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in mined))
    print(f"wrote {len(mined)} queries with {args.negatives} mined negatives each to {output}")
    return 0


def cmd_pretrain(args) -> int:
    from ..train.pretrain import pretrain
    from ..train import is_main_process

    config, out = _train_config(args)
    metrics = pretrain(args.model, args.train, out, config, max_length=args.max_length,
                       encoder_mlm_probability=args.encoder_mask, decoder_mlm_probability=args.decoder_mask,
                       variant=args.variant, resume=args.resume)
    if is_main_process():
        print(f"{PROG}: pre-trained model written to {out} (last losses: encoder "
              f"{metrics.get('encoder_loss', float('nan')):.4f}, decoder {metrics.get('decoder_loss', float('nan')):.4f})",
              file=sys.stderr)
    return 0
