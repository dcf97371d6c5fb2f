"""`minibge finetune-m3`: BGE-M3's unified fine-tuning with self-knowledge distillation (registered by cli/__init__.py).

    minibge finetune-m3 -m weights/all-MiniLM-L6-v2 --train mined.jsonl --out runs/m3    # fresh heads on MiniLM
    torchrun --standalone --nproc_per_node 2 -m minibge finetune-m3 ...                  # data parallel

The loop's options (--epochs, --lr, --save-steps, --resume, ...) are finetune's (cli/train.py).
"""
from __future__ import annotations

import sys

from .args import Formatter, examples, max_length, positive_int
from .io import PROG
from .train import _add_loop_options, _train_config


def add_m3_command(commands, parents) -> None:
    """Add `finetune-m3` to cli's subparsers (parents: the shared -v option)."""
    p = commands.add_parser(
        "finetune-m3", parents=parents, formatter_class=Formatter,
        help="BGE-M3 unified fine-tuning (dense + lexical + ColBERT, self-distillation)",
        description="Fine-tune BGE-M3's three outputs together on jsonl lines {\"query\", \"pos\": [...], \"neg\": "
                    "[...]}: an InfoNCE loss per head (dense, lexical, ColBERT), one on their weighted sum "
                    "s_inter = 1·s_dense + 0.3·s_lex + 1·s_mul, and each head distilled from softmax(s_inter) "
                    "(losses.m3_loss). -m may be an M3 folder or any BERT / XLM-RoBERTa encoder (fresh heads are "
                    "added). --out receives an M3 folder: config.json, model.safetensors, colbert_linear.pt, "
                    "sparse_linear.pt, the tokenizer (minibge.BGEM3FlagModel reads it).",
        epilog=examples("minibge finetune-m3 -m weights/all-MiniLM-L6-v2 --train mined.jsonl --out runs/m3",
                         "torchrun --standalone --nproc_per_node 2 -m minibge finetune-m3 ..."))
    p.add_argument("-m", "--model", required=True, metavar="PATH_OR_ID", help="the model to start from")
    p.add_argument("--train", required=True, metavar="JSONL", help="training data, one query per line")
    _add_loop_options(p, batch_size=8, unit="queries")
    p.add_argument("--temperature", type=float, default=0.02, help="τ of all three softmaxes (default: 0.02)")
    p.add_argument("--group-size", type=positive_int, default=8,
                   help="passages per query: 1 positive + N−1 negatives (default: 8)")
    p.add_argument("--query-max-length", type=max_length, default=32, help="query tokens (default: 32)")
    p.add_argument("--passage-max-length", type=max_length, default=128, help="passage tokens (default: 128)")
    p.add_argument("--query-instruction", metavar="TEXT", help="text prepended to every query (default: none)")
    p.add_argument("--no-self-distill", action="store_true", help="the four InfoNCE losses only")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines with a warning")
    p.set_defaults(run=cmd_finetune_m3)


def cmd_finetune_m3(args) -> int:
    from ..train import is_main_process
    from ..train.m3 import finetune_m3

    config, out = _train_config(args)
    metrics = finetune_m3(args.model, args.train, out, config, temperature=args.temperature,
                          group_size=args.group_size, query_max_length=args.query_max_length,
                          passage_max_length=args.passage_max_length, query_instruction=args.query_instruction,
                          self_distill=not args.no_self_distill, skip_bad_lines=args.skip_bad_lines,
                          resume=args.resume)
    if is_main_process():
        print(f"{PROG}: fine-tuned M3 model written to {out} (last loss {metrics.get('loss', float('nan')):.4f})",
              file=sys.stderr)
    return 0
