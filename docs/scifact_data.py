"""SciFact for docs/training.md: BEIR train queries → fine-tuning jsonl, a dev split, dev nDCG@10.

    python docs/scifact_data.py prepare runs/scifact          # train.jsonl, train_fit.jsonl, dev.jsonl
    python docs/scifact_data.py subset runs/scifact           # train.mined.jsonl → train_fit.mined.jsonl
    python docs/scifact_data.py dev-eval runs/scifact MODEL   # nDCG@10 of MODEL on the dev queries
    python docs/scifact_data.py dev-rerank runs/scifact MODEL RERANKER   # MODEL's top 100, reranked (docs/reranking.md)

The dev split is 20% of the 809 train queries (seeded shuffle), scored against the full corpus
exactly as `minibge eval --task scifact` scores the test queries (minibge.evaluate.retrieval).
$SCIFACT_DIR overrides where the BEIR folder is (default ../shared/eval/data/scifact).
"""
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minibge.evaluate.data import load_beir  # noqa: E402

SCIFACT = Path(os.environ.get("SCIFACT_DIR", REPO.parent / "shared" / "eval" / "data" / "scifact"))
DEV_FRACTION, SEED = 0.2, 0


def split_ids(qrels: dict) -> tuple[list[str], list[str]]:
    ids = sorted(qrels)
    random.Random(SEED).shuffle(ids)
    n_dev = round(DEV_FRACTION * len(ids))
    return ids[n_dev:], ids[:n_dev]  # (fit, dev)


def prepare(out: Path) -> None:
    corpus, queries, qrels = load_beir(SCIFACT, split="train")
    out.mkdir(parents=True, exist_ok=True)
    fit, dev = split_ids(qrels)

    def write(name, ids):
        with open(out / name, "w", encoding="utf-8") as f:
            for qid in ids:
                pos = [(corpus[d]["title"] + " " + corpus[d]["text"]).strip() for d, r in qrels[qid].items() if r > 0]
                f.write(json.dumps({"query": queries[qid], "pos": pos, "id": qid}) + "\n")
        print(f"wrote {len(ids)} queries to {out / name}")

    write("train.jsonl", sorted(qrels))
    write("train_fit.jsonl", fit)
    write("dev.jsonl", dev)


def subset(out: Path) -> None:
    """The mined lines of the fit queries: mining runs once, over all train queries."""
    fit_queries = {json.loads(line)["query"] for line in open(out / "train_fit.jsonl", encoding="utf-8")}
    lines = [line for line in open(out / "train.mined.jsonl", encoding="utf-8") if json.loads(line)["query"] in fit_queries]
    (out / "train_fit.mined.jsonl").write_text("".join(lines), encoding="utf-8")
    print(f"wrote {len(lines)} of {len(fit_queries)} fit queries to {out / 'train_fit.mined.jsonl'}")


def dev_eval_score(model: str) -> dict:
    from minibge import load_embedder
    from minibge.evaluate import retrieval

    corpus, queries, qrels = load_beir(SCIFACT, split="train")
    _, dev = split_ids(qrels)
    scores = retrieval(load_embedder(model), corpus, {q: queries[q] for q in dev}, {q: qrels[q] for q in dev})
    return {"model": model, "dev_queries": len(dev), "ndcg_at_10": round(scores["ndcg_at_10"], 2),
            "recall_at_100": round(scores["recall_at_100"], 2)}


def dev_rerank_score(model: str, reranker: str, top: int = 100) -> dict:
    """nDCG@10 / MAP@10 / Recall@100 on the dev queries: MODEL retrieves, RERANKER re-orders its top 100."""
    from minibge import load_embedder, load_reranker
    from minibge.evaluate import retrieval

    corpus, queries, qrels = load_beir(SCIFACT, split="train")
    _, dev = split_ids(qrels)
    scores = retrieval(load_embedder(model), corpus, {q: queries[q] for q in dev}, {q: qrels[q] for q in dev},
                       reranker=load_reranker(reranker), rerank_top=top)
    return {"model": model, "reranker": reranker, "dev_queries": len(dev), "ndcg_at_10": round(scores["ndcg_at_10"], 2),
            "map_at_10": round(scores["map_at_10"], 2), "recall_at_100": round(scores["recall_at_100"], 2)}


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        prepare(folder)
    elif command == "subset":
        subset(folder)
    elif command == "dev-rerank":
        print(json.dumps(dev_rerank_score(sys.argv[3], sys.argv[4])))
    else:
        print(json.dumps(dev_eval_score(sys.argv[3])))
