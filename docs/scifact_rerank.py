"""The reranker's dev-split selection for docs/reranking.md: the embedder's shortlist once, then each
candidate cross-encoder re-orders it.

    python docs/scifact_rerank.py shortlist runs/scifact MODEL                 # dev.shortlist.json, "before" on dev
    python docs/scifact_rerank.py dev runs/scifact RERANKER [TOP] [MAX_LENGTH] # dev nDCG@10 etc. after reranking

docs/scifact_data.py's `dev-rerank` does the same in one call, but it encodes the 5,183 abstracts again
for every candidate; on a 2-core CPU that is minutes per setting, so here the embedder's top 100 of
each dev query is computed once and saved (a json of {query id: {document id: score}}). The metrics
are the ones `minibge eval` reports (minibge.evaluate.retrieval_metrics, MTEB's).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scifact_data import SCIFACT, split_ids  # noqa: E402

from minibge.evaluate.data import load_beir  # noqa: E402

KEEP = ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_10", "recall_at_100")


def dev_set():
    corpus, queries, qrels = load_beir(SCIFACT, split="train")
    _, dev = split_ids(qrels)
    return corpus, {q: queries[q] for q in dev}, {q: qrels[q] for q in dev}


def shortlist(out: Path, model: str, k: int = 100) -> dict:
    from minibge import load_embedder
    from minibge.evaluate.tasks import _search, retrieval_metrics

    corpus, queries, qrels = dev_set()
    start = time.perf_counter()
    results = _search(load_embedder(model), corpus, queries, k, 32, 50_000, False)
    (out / "dev.shortlist.json").write_text(json.dumps(results), encoding="utf-8")
    scores = retrieval_metrics(qrels, results, [10, 100])
    return {"model": model, "dev_queries": len(queries), "seconds": round(time.perf_counter() - start, 1),
            **{m: round(scores[m], 2) for m in KEEP}}


def dev_rerank(out: Path, reranker: str, top: int = 100, max_length: int = 512) -> dict:
    from minibge import load_reranker
    from minibge.evaluate.tasks import rerank_results, retrieval_metrics

    corpus, queries, qrels = dev_set()
    results = json.loads((out / "dev.shortlist.json").read_text(encoding="utf-8"))
    start = time.perf_counter()
    reranked = rerank_results(load_reranker(reranker, max_length=max_length), corpus, queries, results, top)
    scores = retrieval_metrics(qrels, reranked, [10, 100])
    return {"reranker": reranker, "top": top, "max_length": max_length, "dev_queries": len(queries),
            "seconds": round(time.perf_counter() - start, 1), **{m: round(scores[m], 2) for m in KEEP}}


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "shortlist":
        print(json.dumps(shortlist(folder, sys.argv[3])))
    elif command == "dev":
        args = [int(a) for a in sys.argv[4:6]]
        print(json.dumps(dev_rerank(folder, sys.argv[3], *args)))
    else:
        raise SystemExit(__doc__)
