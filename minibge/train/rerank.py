"""Reranker fine-tuning: (query, positive, hard negatives) groups → listwise cross-entropy on a cross-encoder.

The data is the embedder's fine-tuning jsonl (finetune.py), read by the same reader, so a file
mined with `minibge mine` feeds both:

    {"query": "what is BGE?", "pos": ["BGE is ..."], "neg": ["BERT is ...", ...], "pos_scores": [..], "neg_scores": [..]}

Each step, every query gets a group of G passages sampled exactly as the embedder's fine-tuning
samples them (finetune.sample_group: one random positive first, G−1 negatives without replacement,
tiled when too few), and each (query, passage) pair becomes one sequence:

    batch (B queries, G = 4):   [CLS] q₀ [SEP] p⁺₀ [SEP]  ─► z₀,₀ ┐
                                [CLS] q₀ [SEP] n₀₁ [SEP]  ─► z₀,₁ │  softmax over the group,
                                [CLS] q₀ [SEP] n₀₂ [SEP]  ─► z₀,₂ │  cross-entropy with target 0
                                [CLS] q₀ [SEP] n₀₃ [SEP]  ─► z₀,₃ ┘
                                [CLS] q₁ [SEP] p⁺₁ [SEP]  ─► ...       (B·G rows, query-major)

losses.reranker_loss turns the B·G logits into the loss (plus distillation from pos_scores /
neg_scores with --distill); loop.py runs the optimisation, under torchrun too (each rank its own
groups, gradients averaged: the loss has no cross-device term). Truncation is FlagEmbedding's
reranker fine-tuning's: query ≤ query_max_length (32) tokens, passage ≤ passage_max_length (128),
the pair ≤ max_length (512), only the passage cut to fit.

The starting point is a cross-encoder folder, or any BERT / XLM-RoBERTa encoder folder (an embedder),
which gets a fresh head (reranker.load_cross_encoder). The result is a cross-encoder folder in the
official layout with its tokenizer: transformers' AutoModelForSequenceClassification, load_reranker
and FlagReranker read it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..common import rank_and_world, setup_distributed
from ..losses import reranker_loss
from .finetune import DataError, check_group_size, query_text, read_train_file, sample_group
from .loop import Batches, TrainConfig, train

logger = logging.getLogger(__name__)


class PairGroupCollator:
    """TrainExamples → {"input_ids", "attention_mask", "token_type_ids": (B·G, T)[, "teacher_scores": (B, G)]}."""

    def __init__(self, reranker, group_size: int = 16, max_length: int = 512, query_max_length: int = 32,
                 passage_max_length: int = 128, query_instruction: str | None = None, distill: bool = False):
        self.reranker = reranker
        self.group_size = group_size
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.query_instruction = query_instruction  # None or "": the query as it is (a line's "prompt" still wins)
        self.distill = distill

    def __call__(self, examples, generator: torch.Generator) -> dict:
        pairs, scores = [], []
        for example in examples:
            group, group_scores = sample_group(example, self.group_size, generator)
            query = query_text(example, self.query_instruction)
            pairs += [(query, passage) for passage in group]  # query-major: query i's group is rows [i·G, (i+1)·G)
            scores.append(group_scores)
        tokenizer = self.reranker.tokenizer
        batch = tokenizer.pad_pairs(tokenizer.encode_pairs(pairs, self.max_length, self.query_max_length,
                                                           self.passage_max_length))
        if self.distill:
            if any(s is None for s in scores):
                raise DataError("distillation needs pos_scores and neg_scores on every training line")
            batch["teacher_scores"] = torch.tensor(scores)  # (B, G)
        return batch


def rerank_step(reranker, group_size: int):
    """The loss_fn for loop.train: a collated batch → {"loss", "listwise_ce"[, "distill"]}."""
    def loss_fn(batch: dict) -> dict:
        logits = reranker.logits(batch)  # (B·G,) with gradients
        return reranker_loss(logits.float(), group_size, batch.get("teacher_scores"))
    return loss_fn


def finetune_reranker(model, train_file, output_dir, config: TrainConfig, group_size: int = 16, max_length: int = 512,
                      query_max_length: int = 32, passage_max_length: int = 128, query_instruction: str | None = None,
                      distill: bool = False, skip_bad_lines: bool = False, resume: bool = False) -> dict:
    """Fine-tune a cross-encoder from `model` (a folder or Hub id; a bare encoder gets a fresh head) on
    `train_file`; writes a cross-encoder folder to output_dir. Returns the last logged metrics."""
    from ..reranker import load_reranker

    examples = read_train_file(train_file, skip_bad_lines)  # user mistakes surface before the model loads
    if group_size < 2:
        raise ValueError(f"group size must be at least 2 (a positive and a negative): a group of one has "
                         f"nothing to rank, got {group_size}")
    check_group_size(examples, group_size, train_file)
    if distill and not all(ex.pos_scores and ex.neg_scores for ex in examples):
        raise DataError(f"{train_file}: distillation needs pos_scores and neg_scores on every line")
    device = setup_distributed()
    torch.manual_seed(config.seed)  # a fresh head comes from the global RNG: same seed, same start (rank 0's is broadcast)
    reranker = load_reranker(model, device=device)
    max_length = min(max_length, reranker.model.config.max_sequence_length)
    collate = PairGroupCollator(reranker, group_size, max_length, query_max_length, passage_max_length,
                                query_instruction, distill)
    batches = Batches(examples, collate, config.batch_size, seed=config.seed)
    run_info = {"model": str(model), "train_file": str(Path(train_file).resolve()), "config": vars(config),
                "stage": "reranker", "group_size": group_size, "max_length": max_length,
                "query_max_length": query_max_length, "passage_max_length": passage_max_length,
                "query_instruction": query_instruction, "distill": distill}
    logger.info("fine-tuning reranker %s on %d queries: group size %d, %d rank(s)", model, len(examples), group_size,
                rank_and_world()[1])
    return train(reranker.model, rerank_step(reranker, group_size), batches, config, output_dir,
                 save_fn=reranker.save_pretrained, resume=resume, run_info=run_info)
