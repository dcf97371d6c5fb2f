"""Hard-negative mining: let the model itself find passages that look relevant but are not.

Random negatives are too easy: after a few steps the model separates them without learning
anything. FlagEmbedding's `hn_mine.py` recipe finds harder ones with the model being tuned:

    1. embed a candidate pool: a corpus file, or every passage (pos and neg) of the training file
    2. for each query (with its instruction), rank the pool by cosine similarity
    3. keep the hits ranked in a window [start, end), by default 10–100 (0-based ranks):
       the very top is skipped because it is full of unlabelled positives (false negatives)
    4. drop the query's positives (and the query text itself), sample `negatives` of the rest;
       too few left: top up with random pool passages that are not positives
    5. write the same jsonl, with "neg" replaced by the mined passages

The teacher scores of old negatives no longer apply, so "neg_scores" is dropped.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from ..common import LineError, iter_lines
from ..embedder import BATCH_SIZE
from ..evaluate.data import document_text
from ..evaluate.search import top_k
from .finetune import DataError, TrainExample, query_text

logger = logging.getLogger(__name__)

SEARCH_CHUNK = 10_000  # pool rows scored at a time


def read_corpus(path) -> list[str]:
    """Candidate passages from a jsonl file ({"text"}, plus "title" as BEIR corpora have; .gz is fine)
    or, for any other suffix, a plain text file with one passage per line. Duplicates are removed."""
    path = Path(path)
    jsonl = ".jsonl" in path.suffixes or ".json" in path.suffixes
    texts = []
    try:
        for number, line in iter_lines(path, skip_blank=True):
            if not jsonl:
                texts.append(line)
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj["text"], str):
                    raise TypeError
                text = document_text(obj)  # the text evaluate/ embeds
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise DataError(f"{path} line {number}: expected a JSON object with a \"text\" string") from None
            texts.append(text)
    except LineError as e:
        raise DataError(str(e)) from None
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise DataError(f"{path} holds no passages")
    return texts


def mine_hard_negatives(embedder, examples: list[TrainExample], pool: list[str] | None = None,
                        window: tuple[int, int] = (10, 100), negatives: int = 15, query_instruction: str | None = None,
                        batch_size: int = BATCH_SIZE, seed: int = 0, show_progress_bar: bool | None = None) -> list[dict]:
    """The examples as jsonl-ready dicts with mined "neg" lists (see the module docstring)."""
    start, end = window
    if not 0 <= start < end:
        raise ValueError(f"the rank window must satisfy 0 <= start < end, got {start}-{end}")
    if negatives < 1:
        raise ValueError(f"negatives must be at least 1, got {negatives}")
    if pool is None:
        pool = list(dict.fromkeys(text for ex in examples for text in ex.pos + ex.neg))
    instruction = embedder.query_instruction if query_instruction is None else query_instruction
    queries = [query_text(ex, instruction) for ex in examples]

    logger.info("mining: %d queries against a pool of %d passages, ranks %d-%d", len(queries), len(pool), start, end)
    q = torch.from_numpy(embedder.encode(queries, batch_size=batch_size, show_progress_bar=show_progress_bar))
    p = torch.from_numpy(embedder.encode_corpus(pool, batch_size=batch_size, show_progress_bar=show_progress_bar))
    _, hits = top_k(q, p.split(SEARCH_CHUNK), end)  # (Q, min(end, N)), best first

    rng = random.Random(seed)
    mined, topped_up = [], 0
    for ex, ranked in zip(examples, hits.tolist()):
        banned = set(ex.pos) | {ex.query}
        candidates = [pool[j] for j in ranked[start:end] if pool[j] not in banned]
        chosen = rng.sample(candidates, min(negatives, len(candidates)))
        if len(chosen) < negatives:  # a small pool: fill up with random passages, as hn_mine.py does
            rest = [t for t in pool if t not in banned and t not in chosen]
            chosen += rng.sample(rest, min(negatives - len(chosen), len(rest)))
            topped_up += 1
        record = {"query": ex.query, "pos": ex.pos, "neg": chosen}
        if ex.prompt is not None:
            record["prompt"] = ex.prompt
        if ex.pos_scores is not None:
            record["pos_scores"] = ex.pos_scores
        mined.append(record)
    if topped_up:
        logger.warning("%d queries had fewer than %d candidates in ranks %d-%d; topped up with random passages",
                       topped_up, negatives, start, end)
    return mined
