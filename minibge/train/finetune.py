"""Contrastive fine-tuning, BGE's second training stage: (query, positive, hard negatives) → InfoNCE.

The data is FlagEmbedding's jsonl, one training query per line:

    {"query": "what is BGE?", "pos": ["BGE is an embedding model ..."], "neg": ["BERT is ...", ...],
     "prompt": "optional instruction for this query", "pos_scores": [..], "neg_scores": [..]}

Each step, every query in the batch gets a group of G passages, sampled afresh:

    group = [ one positive drawn from pos,  G−1 negatives drawn from neg without replacement ]
            (too few negatives: the list is tiled ⌈(G−1)/len(neg)⌉ times before drawing)

Queries (instruction + text, ≤ 32 tokens) and passages (≤ 128 tokens) are embedded with the
model's own pooling and L2-normalised, by Embedder.embed, which keeps the gradients; losses.py
turns them into InfoNCE with in-batch (and, under torchrun, cross-device) negatives, plus
distillation from pos_scores/neg_scores when asked; loop.py runs the optimisation. The result
is a complete embedder folder (Embedder.save_pretrained): the weights in the official layout,
the tokenizer and the sentence-transformers files, with the base model's pooling, maximum
length and query instruction, so load_embedder, transformers and sentence-transformers load it.

Everything random here (which positive, which negatives) comes from the generator loop.Batches
hands to collate, so a resumed run samples exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common import LineError, file_fingerprint, iter_lines, rank_and_world, setup_distributed
from ..losses import check_temperature, contrastive_loss
from .loop import DATA_KEY, Batches, TrainConfig, train

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem with a training file, already phrased for the user (file, line, what is wrong)."""


@dataclass
class TrainExample:
    query: str
    pos: list[str]
    neg: list[str]
    prompt: str | None = None                   # overrides the query instruction for this query
    pos_scores: list[float] | None = None       # teacher scores, aligned with pos / neg
    neg_scores: list[float] | None = None
    line: int = field(default=0, compare=False)  # where it came from, for messages


# -----------------------------------------------------------------------------
# Reading the jsonl

def _string_list(obj: dict, key: str) -> list[str]:
    value = obj.get(key, [])
    if isinstance(value, str):
        value = [value]  # a lone string is a one-element list; I do not make users wrap it
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'"{key}" must be a list of strings')
    return value


def _score_list(obj: dict, key: str, expected: int) -> list[float] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value) or len(value) != expected:
        raise ValueError(f'"{key}" must be a list of {expected} numbers, one per passage')
    return [float(v) for v in value]


def parse_example(line: str, number: int) -> TrainExample:
    """One jsonl line → TrainExample; ValueError saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError('"query" must be a non-empty string')
    pos, neg = _string_list(obj, "pos"), _string_list(obj, "neg")
    if not pos:
        raise ValueError(f"query {query!r} has no positive passage (\"pos\" is empty or missing)")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError('"prompt" must be a string')
    return TrainExample(query, pos, neg, prompt, _score_list(obj, "pos_scores", len(pos)),
                        _score_list(obj, "neg_scores", len(neg)), line=number)


def read_train_file(path, skip_bad_lines: bool = False) -> list[TrainExample]:
    """Every example of a jsonl training file. A bad line raises DataError naming the file and line,
    or, with skip_bad_lines, is logged as a warning and skipped. Blank lines are ignored."""
    path = Path(path)
    examples, skipped = [], 0

    def bad_line(error: LineError) -> None:
        nonlocal skipped
        if not skip_bad_lines:
            raise DataError(str(error)) from None
        logger.warning("%s line %d skipped: %s", error.name, error.number, error.problem)
        skipped += 1

    for number, line in iter_lines(path, skip_blank=True, on_error=bad_line):
        try:
            examples.append(parse_example(line, number))
        except ValueError as e:
            bad_line(LineError(str(path), number, str(e)))
    if not examples:
        raise DataError(f"{path} has no training examples" + (f" ({skipped} bad line(s) skipped)" if skipped else ""))
    logger.info("read %d training queries from %s%s", len(examples), path,
                f" ({skipped} bad lines skipped)" if skipped else "")
    return examples


def check_group_size(examples: list[TrainExample], group_size: int, path="the training file") -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group size must be a positive int, got {group_size!r}")
    if group_size > 1:
        lacking = next((ex for ex in examples if not ex.neg), None)
        if lacking is not None:
            raise DataError(f"{path} line {lacking.line}: query {lacking.query!r} has no negatives, but group size "
                            f"{group_size} needs {group_size - 1} per query; mine some with `minibge mine`, or "
                            f"use --group-size 1 (in-batch negatives only)")


def query_text(example: TrainExample, instruction: str | None) -> str:
    """What the encoder sees for a query: its own "prompt" if the line has one, else the instruction."""
    return (example.prompt if example.prompt is not None else instruction or "") + example.query


# -----------------------------------------------------------------------------
# Sampling a group and collating a batch

def _randint(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=generator))


def sample_group(example: TrainExample, group_size: int, generator: torch.Generator) -> tuple[list[str], list[float] | None]:
    """[positive, G−1 negatives] for one query, and the teacher scores of those passages (if any)."""
    i = _randint(len(example.pos), generator)
    passages, scores = [example.pos[i]], [example.pos_scores[i]] if example.pos_scores else None
    if group_size > 1:
        n = group_size - 1
        tiled = list(range(len(example.neg))) * math.ceil(n / len(example.neg))  # tile when too few
        picks = [tiled[j] for j in torch.randperm(len(tiled), generator=generator)[:n].tolist()]
        passages += [example.neg[j] for j in picks]
        if scores is not None:
            scores = scores + [example.neg_scores[j] for j in picks] if example.neg_scores else None
    return passages, scores


class GroupCollator:
    """A list of TrainExamples → {"query": tokens (B, Tq), "passages": tokens (B·G, Tp)[, "teacher_scores" (B, G)]}."""

    def __init__(self, embedder, group_size: int = 8, query_max_length: int = 32, passage_max_length: int = 128,
                 query_instruction: str | None = None, distill: bool = False):
        self.embedder = embedder
        self.group_size = group_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        # the model's own instruction unless told otherwise ("" means none); a line's "prompt" wins over both
        self.query_instruction = embedder.query_instruction if query_instruction is None else query_instruction
        self.distill = distill

    def query_text(self, example: TrainExample) -> str:
        return query_text(example, self.query_instruction)

    def __call__(self, examples: list[TrainExample], generator: torch.Generator) -> dict:
        passages, scores = [], []
        for example in examples:
            group, group_scores = sample_group(example, self.group_size, generator)
            passages += group  # query-major: query i's group is rows [i·G, (i+1)·G)
            scores.append(group_scores)
        batch = {"query": self.embedder.tokenize([self.query_text(ex) for ex in examples], self.query_max_length),
                 "passages": self.embedder.tokenize(passages, self.passage_max_length)}
        if self.distill:
            if any(s is None for s in scores):
                raise DataError("distillation needs pos_scores and neg_scores on every training line")
            batch["teacher_scores"] = torch.tensor(scores)  # (B, G)
        return batch


# -----------------------------------------------------------------------------
# Putting it together

def contrastive_step(embedder, temperature: float, in_batch_negatives: bool = True, cross_device: bool = False):
    """The loss_fn for train.train: a collated batch → {"loss", "info_nce"[, "distill"]}."""
    def loss_fn(batch: dict) -> dict:
        q = embedder.embed(batch["query"])       # (B, D), unit length, with gradients
        p = embedder.embed(batch["passages"])    # (B·G, D)
        return contrastive_loss(q.float(), p.float(), temperature, in_batch_negatives, cross_device,
                                batch.get("teacher_scores"))
    return loss_fn


def finetune(model, train_file, output_dir, config: TrainConfig, temperature: float = 0.02, group_size: int = 8,
             query_max_length: int = 32, passage_max_length: int = 128, query_instruction: str | None = None,
             in_batch_negatives: bool = True, cross_device: bool | None = None, distill: bool = False,
             skip_bad_lines: bool = False, resume: bool = False) -> dict:
    """Fine-tune `model` (a folder or Hub id) on `train_file`; writes an embedder folder to output_dir.

    cross_device defaults to True when running under torchrun with more than one rank.
    Returns the last logged training metrics.
    """
    from ..embedder import load_embedder

    check_temperature(temperature)  # every argument is checked before anything is written (Embedder.embed normalises)
    examples = read_train_file(train_file, skip_bad_lines)  # user mistakes surface before the model loads
    check_group_size(examples, group_size, train_file)
    if distill and not all(ex.pos_scores and (ex.neg_scores or group_size == 1) for ex in examples):
        raise DataError(f"{train_file}: distillation needs pos_scores and neg_scores on every line")
    device = setup_distributed()
    if cross_device is None:
        cross_device = rank_and_world()[1] > 1
    embedder = load_embedder(model, device=device)
    collate = GroupCollator(embedder, group_size, query_max_length, passage_max_length, query_instruction, distill)
    batches = Batches(examples, collate, config.batch_size, seed=config.seed)
    run_info = {"model": str(model), "train_file": str(Path(train_file).resolve()),
                DATA_KEY: file_fingerprint(train_file), "config": vars(config),
                "temperature": temperature, "group_size": group_size, "query_max_length": query_max_length,
                "passage_max_length": passage_max_length, "query_instruction": collate.query_instruction,
                "in_batch_negatives": in_batch_negatives, "cross_device": cross_device, "distill": distill}
    logger.info("fine-tuning %s on %d queries: group size %d, temperature %g, cross-device negatives %s",
                model, len(examples), group_size, temperature, "on" if cross_device else "off")
    return train(embedder.model, contrastive_step(embedder, temperature, in_batch_negatives, cross_device),
                 batches, config, output_dir, save_fn=embedder.save_pretrained, resume=resume, run_info=run_info)
