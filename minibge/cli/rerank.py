"""`minibge finetune-reranker`: cross-encoder fine-tuning on the one training loop (registered by cli/__init__.py).

    minibge mine -m weights/all-MiniLM-L6-v2 --input train.jsonl --output mined.jsonl --corpus corpus.jsonl
    minibge finetune-reranker -m weights/all-MiniLM-L6-v2 --train mined.jsonl --out runs/reranker
    torchrun --standalone --nproc_per_node 2 -m minibge finetune-reranker ...   # data parallel

The loop's options (--epochs, --lr, --save-steps, --resume, ...) are the same as finetune's
(cli/train.py); the reranker adds the group size and the pair's lengths.
"""
from __future__ import annotations

import sys

from .args import Formatter, examples, max_length
from .io import PROG
from .train import _add_group_training_options, _train_config


def add_rerank_commands(commands, parents) -> None:
    """Add `finetune-reranker` to cli's subparsers (parents: the shared -v option)."""
    p = commands.add_parser(
        "finetune-reranker", parents=parents, formatter_class=Formatter,
        help="fine-tune a cross-encoder (reranker) on (query, pos, neg) jsonl",
        description="Fine-tune a cross-encoder with FlagEmbedding's listwise loss on jsonl lines {\"query\", \"pos\": "
                    "[...], \"neg\": [...]} (optional \"pos_scores\", \"neg_scores\" for --distill): each query gets "
                    "one random positive and group-size − 1 random negatives, each (query, passage) pair one logit, "
                    "and a softmax cross-entropy over the group with the positive as the target. -m may be a "
                    "cross-encoder or a bare BERT / XLM-RoBERTa encoder (a fresh head is added). --out receives a "
                    "cross-encoder folder (transformers' AutoModelForSequenceClassification, minibge.FlagReranker).",
        epilog=examples("minibge finetune-reranker -m weights/all-MiniLM-L6-v2 --train mined.jsonl --out runs/rr",
                         "minibge finetune-reranker ... --out runs/rr --resume        (continue an interrupted run)",
                         "torchrun --standalone --nproc_per_node 2 -m minibge finetune-reranker ..."))
    _add_group_training_options(p, batch_size=8, group_size=16, group_help=", BGE's reranker recipe",
                                instruction_help="text prepended to every query (default: none)")
    p.add_argument("--max-length", type=max_length, default=512, help="tokens per (query, passage) pair (default: 512)")
    p.add_argument("--distill", action="store_true", help="add distillation from pos_scores / neg_scores")
    p.set_defaults(run=cmd_finetune_reranker)


def cmd_finetune_reranker(args) -> int:
    from ..train import is_main_process
    from ..train.rerank import finetune_reranker

    config, out = _train_config(args)
    metrics = finetune_reranker(args.model, args.train, out, config, group_size=args.group_size,
                                max_length=args.max_length, query_max_length=args.query_max_length,
                                passage_max_length=args.passage_max_length, query_instruction=args.query_instruction,
                                distill=args.distill, skip_bad_lines=args.skip_bad_lines, resume=args.resume)
    if is_main_process():
        print(f"{PROG}: fine-tuned reranker written to {out} (last loss {metrics.get('loss', float('nan')):.4f})",
              file=sys.stderr)
    return 0
