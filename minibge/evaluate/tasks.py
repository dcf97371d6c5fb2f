"""Evaluate an embedder the way MTEB does: STS, retrieval and classification.

**STS** (semantic textual similarity). Each pair of sentences gets the cosine of its two
embeddings; the score is the *Spearman* rank correlation between those cosines and the
human gold scores (Pearson is reported too). Spearman is Pearson computed on ranks, and
tied values share the average of the ranks they occupy.

**Retrieval** (BEIR format). Every query is compared with every document by the dot
product of normalised embeddings (= cosine); the best ``k`` documents are kept. The
metrics follow ``trec_eval``, the program behind ``pytrec_eval``/BEIR/MTEB. For a query
with relevant set ``R`` (qrels rows with relevance > 0) and a ranking ``d_1, d_2, ...``:

* ``nDCG@k = DCG@k / IDCG@k`` with ``DCG@k = sum_{i<=k} rel(d_i) / log2(i + 1)`` and
  IDCG the same sum over the qrels' relevance values sorted from high to low;
* ``MAP@k = (sum of precision@i over the ranks i <= k that hold a relevant doc) / |R|``;
* ``Recall@k = |relevant in top k| / |R|`` and ``P@k = |relevant in top k| / k``;
* ``MRR@k = 1 / (rank of the first relevant doc)`` if it is within ``k``, else 0.

Documents with equal scores are ordered as trec_eval orders them: by document id,
*descending*. Queries without any relevant document are not scored.

With a reranker (``retrieval(..., reranker=, rerank_top=100)``), each query's ``rerank_top``
best documents are re-ordered by the cross-encoder's score of (query, "title text"); the
documents below them keep the embedder's order. Recall@rerank_top is therefore unchanged:
reranking moves documents within the shortlist, it cannot bring in new ones.

**Classification**. Embed train and test texts, then ten times: draw 8 training examples
per label, fit an L2-regularised multinomial logistic regression, predict the test set.
Report mean accuracy and macro-F1 (the mean over labels of each label's F1).

All scores are returned ×100, as MTEB tables print them.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import document_text, load_beir, load_sick, load_sts_csv
from .search import RERANK_BATCH_SIZE, rerank, top_k
from ..embedder import BATCH_SIZE
from ..tokenizer import check_texts

logger = logging.getLogger(__name__)

__all__ = ["sts", "retrieval", "retrieval_metrics", "per_query_metrics", "classification",
           "evaluate_task", "task_key", "format_markdown", "spearman", "pearson", "rank_average", "rerank_results",
           "TASKS"]

# name -> (kind, display name, main metric, published MTEB scores x100 from the results repo)
TASKS = {
    "stsb": ("sts", "STSBenchmark", "cosine_spearman",
             {"all-MiniLM-L6-v2": 82.0325, "bge-small-en-v1.5": 85.8630, "bge-base-en-v1.5": 86.4180}),
    "sickr": ("sts", "SICK-R", "cosine_spearman",
              {"all-MiniLM-L6-v2": 77.5825, "bge-small-en-v1.5": 79.4099, "bge-base-en-v1.5": 80.3011}),
    "scifact": ("retrieval", "SciFact", "ndcg_at_10",
                {"all-MiniLM-L6-v2": 64.508, "bge-small-en-v1.5": 71.273, "bge-base-en-v1.5": 74.345}),
}


def _encode(fn: Callable, texts: list[str], batch_size: int, normalize: bool, show_progress_bar) -> torch.Tensor:
    """Call one of the embedder's encode methods and return a float32 (N, D) tensor."""
    out = fn(texts, batch_size=batch_size, normalize_embeddings=normalize,
             convert_to_tensor=False, show_progress_bar=show_progress_bar)
    emb = out.detach().cpu().float() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out, dtype=np.float32))
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"the embedder returned shape {tuple(emb.shape)} for {len(texts)} texts; expected (N, D)")
    return emb


def _text_list(name: str, texts) -> list[str]:
    """`texts` as a list, if the tokenizer's check_texts accepts it; the TypeError names the argument too."""
    try:
        check_texts(texts)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from None
    return list(texts)


# ---------------------------------------------------------------- STS
def rank_average(x) -> np.ndarray:
    """1-based ranks of ``x``; tied values all get the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_group = np.r_[True, xs[1:] != xs[:-1]]  # True where a run of equal values begins
    group = np.cumsum(starts_group) - 1
    first = np.flatnonzero(starts_group)
    last = np.r_[first[1:], len(x)] - 1
    ranks = np.empty(len(x))
    ranks[order] = ((first + last) / 2 + 1)[group]
    return ranks


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0.0:
        logger.warning("correlation is undefined: one of the inputs is constant")
        return float("nan")
    return float(xc @ yc) / denom


def spearman(x, y) -> float:
    return pearson(rank_average(x), rank_average(y))


def sts(embedder, sentences1, sentences2, gold_scores, batch_size: int = BATCH_SIZE, show_progress_bar=None) -> dict:
    """Cosine Spearman/Pearson (×100) between sentence-pair embeddings and gold scores."""
    s1, s2 = _text_list("sentences1", sentences1), _text_list("sentences2", sentences2)
    gold = np.asarray(gold_scores, dtype=np.float64)
    if not (len(s1) == len(s2) == len(gold)):
        raise ValueError(f"lengths differ: {len(s1)} sentences1, {len(s2)} sentences2, {len(gold)} scores")
    if not s1:
        raise ValueError("sts: no sentence pairs given")
    if not np.all(np.isfinite(gold)):
        raise ValueError("sts: gold_scores contains NaN or infinite values")
    # Many sentences repeat (SICK: 9,927 pairs but ~10k unique texts, not ~20k), so I
    # embed each distinct sentence once and look pairs up by index.
    unique = list(dict.fromkeys(s1 + s2))
    where = {s: i for i, s in enumerate(unique)}
    emb = F.normalize(_encode(embedder.encode, unique, batch_size, True, show_progress_bar).double(), dim=1)
    a = emb[[where[s] for s in s1]]
    b = emb[[where[s] for s in s2]]
    cos = (a * b).sum(dim=1).numpy()
    return {"cosine_spearman": 100 * spearman(cos, gold), "cosine_pearson": 100 * pearson(cos, gold),
            "n_pairs": len(s1)}


# ---------------------------------------------------------------- retrieval
def _trec_order(doc_scores: Mapping[str, float]) -> list[str]:
    """Doc ids by score descending, ties by doc id descending (trec_eval's rule)."""
    by_id = sorted(doc_scores, reverse=True)
    return sorted(by_id, key=lambda d: doc_scores[d], reverse=True)  # stable: keeps id order in ties


def per_query_metrics(qrels: Mapping[str, Mapping[str, int]], results: Mapping[str, Mapping[str, float]],
                      k_values: Sequence[int] = (1, 3, 5, 10, 100, 1000)) -> dict[str, dict[str, float]]:
    """Per-query metrics as fractions (0..1), for queries in ``results`` with >= 1 relevant doc."""
    ks = sorted({int(k) for k in k_values})
    if not ks or ks[0] < 1:
        raise ValueError(f"k_values must be positive integers, got {list(k_values)}")
    out = {}
    for qid, doc_scores in results.items():
        relevant = {d: r for d, r in qrels.get(qid, {}).items() if r > 0}
        if not relevant:
            continue  # nothing to find: the query is not scored at all
        ideal = sorted(relevant.values(), reverse=True)
        gains = [relevant.get(d, 0) for d in _trec_order(doc_scores)]
        m = {}
        for k in ks:
            dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
            idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
            hits, precision_sum, first_hit = 0, 0.0, 0
            for rank, g in enumerate(gains[:k], start=1):
                if g > 0:
                    hits += 1
                    precision_sum += hits / rank
                    first_hit = first_hit or rank
            m[f"ndcg_at_{k}"] = dcg / idcg
            m[f"map_at_{k}"] = precision_sum / len(relevant)
            m[f"recall_at_{k}"] = hits / len(relevant)
            m[f"precision_at_{k}"] = hits / k
            m[f"mrr_at_{k}"] = 1.0 / first_hit if first_hit else 0.0
        out[qid] = m
    return out


def retrieval_metrics(qrels, results, k_values: Sequence[int] = (1, 3, 5, 10, 100, 1000)) -> dict:
    """Mean over scored queries of nDCG/MAP/Recall/P/MRR at each k, ×100, plus ``n_queries``."""
    per_query = per_query_metrics(qrels, results, k_values)
    if not per_query:
        raise ValueError("no query in the results has a relevant document in the qrels")
    names = next(iter(per_query.values())).keys()
    scores = {n: 100 * sum(m[n] for m in per_query.values()) / len(per_query) for n in names}
    scores["n_queries"] = len(per_query)
    return scores


def _search(embedder, corpus, queries, k, batch_size, chunk_size, show_progress_bar) -> dict:
    """Exact dot-product search; returns {qid: {doc_id: score}} with at most k docs each."""
    qids, doc_ids = list(queries), list(corpus)
    q = F.normalize(_encode(embedder.encode_queries, [queries[i] for i in qids], batch_size, True,
                            show_progress_bar), dim=1)

    def doc_chunks():  # embedded one chunk at a time, just before top_k scores it
        for start in range(0, len(doc_ids), chunk_size):
            ids = doc_ids[start:start + chunk_size]
            texts = [document_text(corpus[d]) for d in ids]
            logger.info("encoding documents %d-%d of %d", start + 1, start + len(ids), len(doc_ids))
            yield F.normalize(_encode(embedder.encode_corpus, texts, batch_size, True, show_progress_bar), dim=1)

    qpos = {qid: i for i, qid in enumerate(qids)}
    own_documents = [(qpos[d], j) for j, d in enumerate(doc_ids) if d in qpos]  # never its own answer (ArguAna)
    best_scores, best_index = top_k(q, doc_chunks(), k, exclude=own_documents)
    results = {}
    for i, qid in enumerate(qids):
        results[qid] = {doc_ids[j]: s for s, j in zip(best_scores[i].tolist(), best_index[i].tolist())
                        if s != float("-inf")}
    return results


def rerank_results(reranker, corpus, queries, results: dict, top: int, batch_size: int = RERANK_BATCH_SIZE) -> dict:
    """{qid: {doc_id: score}} re-ordered: each query's `top` best documents by the cross-encoder, then
    the rest in their order. The new scores are ranks turned around (n, n−1, ...), so any metric
    reads the new order; ties among the cross-encoder's scores keep the embedder's order."""
    qids = list(results)
    orders = [_trec_order(results[qid]) for qid in qids]
    shortlists = [order[:top] for order in orders]
    scores = rerank(reranker, [queries[qid] for qid in qids],
                    [[document_text(corpus[d]) for d in docs] for docs in shortlists], batch_size)
    reranked = {}
    for qid, order, docs, doc_scores in zip(qids, orders, shortlists, scores):
        by_score = [docs[i] for i in sorted(range(len(docs)), key=lambda i: -doc_scores[i])]  # stable
        final = by_score + order[top:]
        reranked[qid] = {d: float(len(final) - i) for i, d in enumerate(final)}
    return reranked


def retrieval(embedder, corpus: Mapping[str, Mapping[str, str]], queries: Mapping[str, str],
              qrels: Mapping[str, Mapping[str, int]], k_values: Sequence[int] = (1, 3, 5, 10, 100, 1000),
              batch_size: int = BATCH_SIZE, chunk_size: int = 50_000, show_progress_bar=None, reranker=None,
              rerank_top: int = 100, rerank_batch_size: int = RERANK_BATCH_SIZE) -> dict:
    """Retrieve with ``embedder`` (and rerank its top ``rerank_top`` with ``reranker``, a
    minibge Reranker, when given) and score against ``qrels``; see the module docstring."""
    if reranker is not None and (isinstance(rerank_top, bool) or not isinstance(rerank_top, int) or rerank_top < 1):
        raise ValueError(f"rerank_top must be a positive int, got {rerank_top!r}")
    if not queries:
        raise ValueError("retrieval: the query set is empty")
    if not corpus:
        raise ValueError("retrieval: the corpus is empty")
    for doc_id, doc in corpus.items():
        if not isinstance(doc, Mapping):
            raise TypeError(f"corpus[{doc_id!r}] must be a dict with 'title' and 'text', got {type(doc).__name__}")
    _text_list("queries' values", list(queries.values()))
    unknown_docs = sorted({d for rels in qrels.values() for d in rels if d not in corpus})
    if unknown_docs:
        # trec_eval still counts them as relevant, so recall can never reach 100 here.
        logger.warning("%d document id(s) in the qrels are not in the corpus, e.g. %s",
                       len(unknown_docs), unknown_docs[:5])
    unknown_queries = sorted(q for q, rels in qrels.items() if q not in queries and any(r > 0 for r in rels.values()))
    if unknown_queries:
        logger.warning("%d query id(s) in the qrels have no query text and are not scored, e.g. %s",
                       len(unknown_queries), unknown_queries[:5])
    # Queries without a relevant document would not be scored, so I don't embed them.
    scored = {q: t for q, t in queries.items() if any(r > 0 for r in qrels.get(q, {}).values())}
    if not scored:
        raise ValueError("retrieval: none of the queries has a relevant document in the qrels")
    ks = sorted({int(k) for k in k_values} | {10, 100})  # the headline metrics are always there
    results = _search(embedder, corpus, scored, max(ks), batch_size, chunk_size, show_progress_bar)
    if reranker is not None:
        results = rerank_results(reranker, corpus, scored, results, rerank_top, rerank_batch_size)
    scores = retrieval_metrics(qrels, results, ks)
    scores.update(n_docs=len(corpus), unknown_qrels_docs=len(unknown_docs),
                  unknown_qrels_queries=len(unknown_queries))
    return scores


# ---------------------------------------------------------------- classification
def _fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0,
                             max_iter: int = 100) -> Callable[[torch.Tensor], torch.Tensor]:
    """sklearn-style LogisticRegression(C, lbfgs): returns a function mapping x to labels.

    Objective, as sklearn scales it: mean cross-entropy + 0.5 / (C * n) * ||W||^2 (the bias
    is not penalised). With two classes sklearn fits one weight vector, so I do too by
    fixing class 0's logit at zero.
    """
    n, dim = x.shape
    out = 1 if n_classes == 2 else n_classes
    W = torch.zeros(dim, out, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(out, dtype=torch.float64, requires_grad=True)

    def logits(inp):
        z = inp @ W + b
        return torch.cat([torch.zeros(len(inp), 1, dtype=z.dtype), z], dim=1) if out == 1 else z

    # tolerance_grad=1e-4 is sklearn's tol (stop when max |gradient| <= tol).
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-4, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits(x), y) + 0.5 / (C * n) * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda inp: logits(inp).detach().argmax(dim=1)


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over labels (seen in truth or predictions) of 2TP / (2TP + FP + FN)."""
    f1s = []
    for label in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == label) & (y_true == label))
        fp_fn = np.sum(y_pred == label) + np.sum(y_true == label) - 2 * tp
        f1s.append(2 * tp / (2 * tp + fp_fn))
    return float(np.mean(f1s))


def classification(embedder, train_texts, train_labels, test_texts, test_labels, n_experiments: int = 10,
                   samples_per_label: int = 8, seed: int = 42, batch_size: int = BATCH_SIZE,
                   normalize_embeddings: bool = True, show_progress_bar=None) -> dict:
    """MTEB's few-shot logistic-regression protocol; mean accuracy and macro-F1 (×100) with std.

    MTEB calls ``model.encode`` without asking for normalisation, but both all-MiniLM-L6-v2
    and BGE v1.5 end their sentence-transformers pipeline with a Normalize layer, so the
    embeddings MTEB actually fed to sklearn were unit length: hence the default True.
    """
    train_texts, test_texts = _text_list("train_texts", train_texts), _text_list("test_texts", test_texts)
    if len(train_texts) != len(train_labels) or len(test_texts) != len(test_labels):
        raise ValueError("each text list needs exactly one label per text")
    if not train_texts or not test_texts:
        raise ValueError("classification needs non-empty train and test sets")
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ValueError(f"classification needs at least two labels in train_labels, got {classes}")
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({str(t) for t in test_labels if t not in index})
    if unseen:
        logger.warning("test labels never seen in training (always wrong): %s", unseen[:5])
    y_train = np.array([index[c] for c in train_labels])
    y_test = np.array([index.get(c, -1) for c in test_labels])
    x_train = _encode(embedder.encode, train_texts, batch_size, normalize_embeddings, show_progress_bar).double()
    x_test = _encode(embedder.encode, test_texts, batch_size, normalize_embeddings, show_progress_bar).double()

    # MTEB seeds one generator and reshuffles the *same* index array every experiment.
    rng = np.random.RandomState(seed)
    idxs = np.arange(len(y_train))
    accuracies, f1s = [], []
    for _ in range(n_experiments):
        rng.shuffle(idxs)
        taken, chosen = defaultdict(int), []
        for i in idxs:  # the first samples_per_label of each label in shuffled order
            if taken[y_train[i]] < samples_per_label:
                taken[y_train[i]] += 1
                chosen.append(i)
        sample_classes = np.unique(y_train[chosen])  # all labels (each label has >= 1 example)
        remap = torch.as_tensor(np.searchsorted(sample_classes, y_train[chosen]))
        predict = _fit_logistic_regression(x_train[torch.as_tensor(chosen)], remap, len(sample_classes))
        y_pred = sample_classes[predict(x_test).numpy()]
        accuracies.append(float(np.mean(y_pred == y_test)))
        f1s.append(_macro_f1(y_test, y_pred))
    return {"accuracy": 100 * float(np.mean(accuracies)), "f1": 100 * float(np.mean(f1s)),
            "accuracy_std": 100 * float(np.std(accuracies)), "f1_std": 100 * float(np.std(f1s))}


# ---------------------------------------------------------------- built-in tasks and reporting
def task_key(task: str) -> str:
    """The TASKS key a spelling like "STS-B" or "sick_r" names; ValueError for an unknown task."""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return key


def evaluate_task(embedder, task: str, data_dir: Path | str, batch_size: int = BATCH_SIZE, show_progress_bar=None,
                  reranker=None, rerank_top: int = 100, rerank_batch_size: int = RERANK_BATCH_SIZE) -> dict:
    """Run a built-in task (``stsb``, ``sickr``, ``scifact``) on the shared data folder; a reranker
    re-orders each query's rerank_top best documents (retrieval tasks only)."""
    key = task_key(task)
    kind, display, main_metric, reference = TASKS[key]
    if reranker is not None and kind != "retrieval":
        raise ValueError(f"a reranker applies to retrieval tasks; {display} is {kind}")
    data_dir = Path(data_dir)
    if key == "stsb":
        scores = sts(embedder, *load_sts_csv(data_dir / "stsbenchmark" / "sts-test.csv"),
                     batch_size=batch_size, show_progress_bar=show_progress_bar)
    elif key == "sickr":
        files = [data_dir / "sick2014" / f for f in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt")]
        scores = sts(embedder, *load_sick(files), batch_size=batch_size, show_progress_bar=show_progress_bar)
    else:
        corpus, queries, qrels = load_beir(data_dir / "scifact", split="test")
        scores = retrieval(embedder, corpus, queries, qrels, batch_size=batch_size,
                           show_progress_bar=show_progress_bar, reranker=reranker, rerank_top=rerank_top,
                           rerank_batch_size=rerank_batch_size)
    logger.info("%s: %s = %.2f", display, main_metric, scores[main_metric])
    return {"task": key, "task_name": display, "main_metric": main_metric,
            "main_score": scores[main_metric], "reference": dict(reference), **scores}


def _published(reference: Mapping[str, float], model_name: str | None) -> float | None:
    """Look up a model's published score; 'BAAI/bge-small-en-v1.5' matches 'bge-small-en-v1.5'."""
    if not model_name:
        return None
    short = model_name.rstrip("/").split("/")[-1].lower()
    return next((v for k, v in reference.items() if k.lower() == short), None)


def format_markdown(results: Sequence[Mapping], model_name: str | None = None) -> str:
    """A markdown table: task | metric | measured | published | difference."""
    lines = ["| task | metric | measured | published | difference |", "|---|---|---:|---:|---:|"]
    for r in results:
        published = _published(r.get("reference", {}), model_name)
        pub = "–" if published is None else f"{published:.2f}"
        # rounded first, then + 0.0: a -0.0 (a tiny negative difference) prints as +0.00, not -0.00
        diff = "–" if published is None else f"{round(r['main_score'] - published, 2) + 0.0:+.2f}"
        metric = r.get("main_metric", "main_score")
        lines.append(f"| {r.get('task_name', r.get('task', '?'))} | {metric} | {r['main_score']:.2f} | {pub} | {diff} |")
    return "\n".join(lines)
