"""Loaders for the evaluation sets: STS Benchmark, SICK, BEIR-style retrieval folders.

Everything comes out as plain Python data (lists, dicts, floats) so that the
evaluation code in :mod:`minibge.evaluate` never has to know about file formats.

Two traps in these files shape the code below:

* The STS and SICK files are TAB-separated and contain bare ``"`` characters
  (``He said "hi"``). The ``csv`` module's default quoting would treat such a quote
  as the start of a quoted field and silently merge rows, so I split lines on
  ``\\t`` myself.
* ``SICK_test_annotated.txt`` has Windows (CRLF) line endings. I read bytes, split
  on ``\\n`` only and strip one trailing ``\\r`` per line, so a stray ``\\r`` inside
  a sentence (or any exotic Unicode line separator) can never split a row in two.

A malformed row raises ``ValueError`` naming the file and the 1-based line number,
because a silently skipped row would shift every score we try to reproduce.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

from .. import common

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = ["load_sts_csv", "load_sick", "load_beir", "load_pairs_table"]


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` without the line ending; blank lines are skipped.

    common.iter_lines does the reading (bytes, ``\\n`` only, one ``\\r`` dropped, ``.gz``);
    errors name the file by its name alone, as every message of this module does."""
    return common.iter_lines(path, name=path.name, skip_blank=True)


def _parse_float(value: str, path: Path, number: int, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path.name} line {number}: {what} {value!r} is not a number") from None


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    return path


def load_sts_csv(path: PathLike) -> tuple[list[str], list[str], list[float]]:
    """Read an STS Benchmark file (``sts-test.csv``, ``sts-dev.csv``).

    No header; columns ``genre, filename, year, sid, score, sentence1, sentence2`` and,
    on some rows, two extra columns (source/attribution) that I ignore.
    Returns ``(sentences1, sentences2, scores)``.
    """
    path = _existing(path)
    s1, s2, scores = [], [], []
    for number, line in _iter_lines(path):
        cols = line.split("\t")
        if len(cols) < 7:
            raise ValueError(
                f"{path.name} line {number}: expected at least 7 tab-separated columns, got {len(cols)}"
            )
        scores.append(_parse_float(cols[4], path, number, "score"))
        s1.append(cols[5])
        s2.append(cols[6])
    logger.info("loaded %d pairs from %s", len(scores), path)
    return s1, s2, scores


def _read_table(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` of a delimited file, header included."""
    if delimiter == "\t":
        # No quoting at all for TSV: the data has bare quotes (see module docstring).
        for number, line in _iter_lines(path):
            yield number, line.split("\t")
        return
    # For comma-separated files quoting is the only way to put a comma inside a
    # sentence, so here I do let the csv module handle standard CSV quoting.
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        for fields in reader:
            if fields and any(x.strip() for x in fields):
                yield reader.line_num, fields


def _columns(header: list[str], wanted: Sequence[str], path: Path) -> list[int]:
    names = [h.strip() for h in header]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"{path.name} line 1: missing column(s) {missing}; the header has {names}")
    return [names.index(w) for w in wanted]


def load_pairs_table(
    path: PathLike,
    sentence1_column: str,
    sentence2_column: str,
    score_column: str,
    delimiter: str | None = None,
) -> tuple[list[str], list[str], list[float]]:
    """Read a sentence-pair table with a header row (csv or tsv).

    ``delimiter`` defaults to a tab for ``.tsv``/``.txt`` files and a comma for ``.csv``.
    Returns ``(sentences1, sentences2, scores)``.
    """
    path = _existing(path)
    if delimiter is None:
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".txt", ".tab"):
            delimiter = "\t"
        elif suffix == ".csv":
            delimiter = ","
        else:
            raise ValueError(f"cannot guess the delimiter of {path.name}; pass delimiter='\\t' or ','")
    rows = _read_table(path, delimiter)
    try:
        _, header = next(rows)
    except StopIteration:
        raise ValueError(f"{path.name}: the file is empty (expected a header row)") from None
    i1, i2, isc = _columns(header, [sentence1_column, sentence2_column, score_column], path)
    need = max(i1, i2, isc) + 1
    s1, s2, scores = [], [], []
    for number, fields in rows:
        if len(fields) < need:
            raise ValueError(
                f"{path.name} line {number}: expected at least {need} columns, got {len(fields)}"
            )
        scores.append(_parse_float(fields[isc], path, number, score_column))
        s1.append(fields[i1])
        s2.append(fields[i2])
    logger.info("loaded %d pairs from %s", len(scores), path)
    return s1, s2, scores


def load_sick(path_or_paths: PathLike | Sequence[PathLike]) -> tuple[list[str], list[str], list[float]]:
    """Read one or several SICK 2014 files and concatenate them in the given order.

    Header ``pair_ID, sentence_A, sentence_B, relatedness_score, entailment_judgment``;
    CRLF endings are fine. MTEB's SICK-R is train + trial + test together (9,927 pairs).
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    if not paths:
        raise ValueError("load_sick: no files given")
    s1, s2, scores = [], [], []
    for p in paths:
        a, b, c = load_pairs_table(p, "sentence_A", "sentence_B", "relatedness_score", delimiter="\t")
        s1 += a
        s2 += b
        scores += c
    return s1, s2, scores


def document_text(doc: Mapping) -> str:
    """A BEIR document as MTEB embeds it: title + " " + text, stripped (either may be missing)."""
    return ((doc.get("title") or "") + " " + (doc.get("text") or "")).strip()


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in _iter_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name} line {number}: bad JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "_id" not in obj:
            raise ValueError(f"{path.name} line {number}: expected a JSON object with an '_id' field")
        yield number, obj


def _load_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for number, line in _iter_lines(path):
        cols = line.split("\t")
        if number == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # BEIR's header row
        if len(cols) < 3:
            raise ValueError(
                f"{path.name} line {number}: expected 3 tab-separated columns "
                f"(query-id, corpus-id, score), got {len(cols)}"
            )
        value = _parse_float(cols[2], path, number, "relevance score")
        if not value.is_integer():
            raise ValueError(f"{path.name} line {number}: relevance {cols[2]!r} is not an integer")
        qrels.setdefault(cols[0].strip(), {})[cols[1].strip()] = int(value)
    return qrels


def load_beir(
    folder: PathLike, split: str = "test"
) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    """Read a BEIR folder: ``corpus.jsonl[.gz]``, ``queries.jsonl``, ``qrels/{split}.tsv``.

    Returns ``(corpus, queries, qrels)``:
    ``corpus = {doc_id: {"title": ..., "text": ...}}``, ``queries = {query_id: text}``
    (only the queries that appear in this split's qrels) and
    ``qrels = {query_id: {doc_id: relevance}}``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BEIR folder not found: {folder}")
    corpus_path = next((folder / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (folder / n).is_file()), None)
    if corpus_path is None:
        raise FileNotFoundError(f"no corpus.jsonl or corpus.jsonl.gz in {folder}")
    qrels = _load_qrels(_existing(folder / "qrels" / f"{split}.tsv"))

    corpus: dict[str, dict[str, str]] = {}
    for number, obj in _read_jsonl(corpus_path):
        doc_id = str(obj["_id"])
        if doc_id in corpus:
            raise ValueError(f"{corpus_path.name} line {number}: duplicate document id {doc_id!r}")
        corpus[doc_id] = {"title": obj.get("title") or "", "text": obj.get("text") or ""}

    queries: dict[str, str] = {}
    for number, obj in _read_jsonl(_existing(folder / "queries.jsonl")):
        qid = str(obj["_id"])
        if qid in qrels:
            queries[qid] = obj.get("text") or ""
    logger.info(
        "loaded %s/%s: %d documents, %d queries, %d qrels rows",
        folder.name, split, len(corpus), len(queries), sum(len(v) for v in qrels.values()),
    )
    return corpus, queries, qrels
