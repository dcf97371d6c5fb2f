"""BGE-M3's unified fine-tuning with self-knowledge distillation, on the one training loop.

The data is the embedder's fine-tuning jsonl, read and grouped exactly as finetune.py does it
(GroupCollator: B queries, each with 1 positive + G−1 negatives, query-major). Each step encodes
the queries and passages once and reads all three outputs off the same hidden states (m3.M3Model):

    queries (B)    ─► dense (B, H),    sparse (B, V),    ColBERT (B, Tq−1, D)
    passages (B·G) ─► dense (B·G, H),  sparse (B·G, V),  ColBERT (B·G, Tp−1, D)
    scores / τ     ─► s_dense, s_lex, s_mul, each (B, B·G): every query against every passage

and losses.m3_loss turns the three score matrices into the unified loss: an InfoNCE per head, one
on the ensemble teacher s_inter = w1·s_dense + w2·s_lex + w3·s_mul, and each head distilled from
softmax(s_inter). FlagEmbedding's choices kept: τ = 0.02 for all three, in-batch negatives for all
three, no cross-device negatives for the sparse and ColBERT heads (I use none for any of them: the
three matrices must line up for the ensemble), the heads made fresh (nn.Linear's own init) when
the folder has no colbert_linear.pt / sparse_linear.pt, so M3's heads go on any minibge encoder.
One difference: ColBERT's max runs over real passage tokens only (m3.colbert_score).

The result is an official M3 folder (m3.M3Model.save_pretrained): load_m3 and BGEM3FlagModel read it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..common import file_fingerprint, rank_and_world, setup_distributed
from ..losses import M3_LOSS_WEIGHTS, M3_TEACHER_WEIGHTS, check_temperature, m3_loss
from .finetune import GroupCollator, check_group_size, read_train_file
from .loop import DATA_KEY, Batches, TrainConfig, train

logger = logging.getLogger(__name__)


def m3_scores(model, batch: dict, temperature: float) -> tuple:
    """One collated batch → (s_dense, s_lex, s_mul), each (B, B·G) and divided by the temperature."""
    from ..m3 import colbert_score, dense_score, sparse_score

    query, passages = batch["query"], batch["passages"]
    q = model(query["input_ids"], query["attention_mask"])           # {"dense" (B, H), "sparse" (B, V), "colbert" (B, Tq-1, D)}
    p = model(passages["input_ids"], passages["attention_mask"])     # the same for the B·G passages
    s_dense = dense_score(q["dense"].float(), p["dense"].float())
    s_lex = sparse_score(q["sparse"].float(), p["sparse"].float())
    s_mul = colbert_score(q["colbert"].float(), p["colbert"].float(), query["attention_mask"][:, 1:],
                          passages["attention_mask"][:, 1:])
    return s_dense / temperature, s_lex / temperature, s_mul / temperature


def m3_step(model, temperature: float, group_size: int, teacher_weights=M3_TEACHER_WEIGHTS,
            loss_weights=M3_LOSS_WEIGHTS, self_distill: bool = True):
    """The loss_fn for loop.train: a collated batch → m3_loss's dict."""
    def loss_fn(batch: dict) -> dict:
        return m3_loss(*m3_scores(model, batch, temperature), group_size, teacher_weights, loss_weights, self_distill)
    return loss_fn


def finetune_m3(model, train_file, output_dir, config: TrainConfig, temperature: float = 0.02, group_size: int = 8,
                query_max_length: int = 32, passage_max_length: int = 128, query_instruction: str | None = None,
                teacher_weights=M3_TEACHER_WEIGHTS, loss_weights=M3_LOSS_WEIGHTS, self_distill: bool = True,
                skip_bad_lines: bool = False, resume: bool = False) -> dict:
    """Unified fine-tuning of `model` (an M3 folder, or any BERT / XLM-R encoder folder, which gets fresh
    heads) on `train_file`; writes an M3 folder to output_dir. Returns the last logged metrics."""
    from ..m3 import load_m3

    check_temperature(temperature)
    examples = read_train_file(train_file, skip_bad_lines)  # user mistakes surface before the model loads
    check_group_size(examples, group_size, train_file)
    device = setup_distributed()
    torch.manual_seed(config.seed)  # fresh heads come from the global RNG (and rank 0's are broadcast anyway)
    m3 = load_m3(model, device=device, fresh_heads=True)
    collate = GroupCollator(m3.embedder, group_size, query_max_length, passage_max_length, query_instruction)
    batches = Batches(examples, collate, config.batch_size, seed=config.seed)
    run_info = {"model": str(model), "train_file": str(Path(train_file).resolve()),
                DATA_KEY: file_fingerprint(train_file), "config": vars(config), "stage": "m3",
                "temperature": temperature, "group_size": group_size, "query_max_length": query_max_length,
                "passage_max_length": passage_max_length, "query_instruction": query_instruction,
                "teacher_weights": list(teacher_weights), "loss_weights": list(loss_weights),
                "self_distill": self_distill}
    logger.info("unified M3 fine-tuning of %s on %d queries: group size %d, temperature %g, self-distillation %s, "
                "%d rank(s)", model, len(examples), group_size, temperature, "on" if self_distill else "off",
                rank_and_world()[1])
    return train(m3.model, m3_step(m3.model, temperature, group_size, teacher_weights, loss_weights, self_distill),
                 batches, config, output_dir, save_fn=m3.save_pretrained, resume=resume, run_info=run_info)
