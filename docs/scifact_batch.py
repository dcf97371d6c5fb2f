"""The batch-size experiment behind docs/training.md ("The batch size, measured"): fine-tune
all-MiniLM-L6-v2 on the SciFact fit queries with each setting, then score nDCG@10 on the dev queries
and on the test queries from one encoding of the corpus; one JSON line per setting.

    python docs/scifact_batch.py RUNS_DIR MODEL [OUT_JSONL] [SETTING ...]

RUNS_DIR holds train_fit.mined.jsonl (docs/scifact_data.py prepare + `minibge mine` + subset). A
SETTING is b<N> (batch N queries, gradient caching with chunk 32) or a<N>x<K> (batch N, K micro-
batches accumulated); default: b16 b64 b256 b647 a16x16. Everything else is the recipe chosen on dev
in docs/training.md (group size 4, lr 1e-4, τ 0.05, lengths 32/128), with $EPOCHS epochs (default 1)
and $PASSAGE_MAX_LENGTH (default 128). The dev and test queries are searched together (their ids
are disjoint), and each set is scored against its own qrels exactly as minibge.evaluate.retrieval
scores it.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minibge.cli import main  # noqa: E402
from scifact_data import SCIFACT, split_ids  # noqa: E402

SETTINGS = ["b16", "b64", "b256", "b647", "a16x16"]
EPOCHS = int(os.environ.get("EPOCHS", "1"))
PASSAGE_MAX_LENGTH = int(os.environ.get("PASSAGE_MAX_LENGTH", "128"))


def training_args(setting: str) -> list[str]:
    if setting.startswith("b"):
        return ["--batch-size", setting[1:], "--cache-chunk-size", "32"]
    batch, accumulation = setting[1:].split("x")
    return ["--batch-size", batch, "--grad-accumulation", accumulation]


def dev_and_test_scores(model: str) -> dict:
    from minibge import load_embedder
    from minibge.evaluate.data import load_beir
    from minibge.evaluate.tasks import _search, retrieval_metrics

    corpus, train_queries, train_qrels = load_beir(SCIFACT, split="train")
    _, test_queries, test_qrels = load_beir(SCIFACT, split="test")
    _, dev = split_ids(train_qrels)
    dev_qrels = {q: train_qrels[q] for q in dev}
    test_qrels = {q: r for q, r in test_qrels.items() if any(v > 0 for v in r.values())}
    assert not set(dev_qrels) & set(test_qrels), "dev and test query ids overlap"
    queries = {**{q: train_queries[q] for q in dev_qrels}, **{q: test_queries[q] for q in test_qrels}}
    results = _search(load_embedder(model), corpus, queries, 1000, 32, 50_000, False)
    dev_scores, test_scores = retrieval_metrics(dev_qrels, results), retrieval_metrics(test_qrels, results)
    return {"dev_queries": dev_scores["n_queries"], "dev_ndcg_at_10": round(dev_scores["ndcg_at_10"], 2),
            "test_queries": test_scores["n_queries"], "test_ndcg_at_10": round(test_scores["ndcg_at_10"], 2),
            "test_recall_at_100": round(test_scores["recall_at_100"], 2)}


if __name__ == "__main__":
    runs, model = Path(sys.argv[1]), sys.argv[2]
    results = open(sys.argv[3], "a") if len(sys.argv) > 3 else sys.stdout
    for setting in sys.argv[4:] or SETTINGS:
        if setting == "base":
            start = time.perf_counter()
            print(json.dumps({"setting": "base", **dev_and_test_scores(model),
                              "eval_s": round(time.perf_counter() - start)}), file=results, flush=True)
            continue
        out = runs / "batch" / setting
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        rc = main(["finetune", "-m", model, "--train", str(runs / "train_fit.mined.jsonl"), "--out", str(out),
                   "--group-size", "4", "--lr", "1e-4", "--temperature", "0.05", "--epochs", str(EPOCHS),
                   "--passage-max-length", str(PASSAGE_MAX_LENGTH), "--log-steps", "1", *training_args(setting)])
        trained = time.perf_counter()
        row = {"setting": setting, "epochs": EPOCHS, "passage_max_length": PASSAGE_MAX_LENGTH, "rc": rc,
               "train_s": round(trained - start)}
        if rc == 0:
            row.update(dev_and_test_scores(str(out)), eval_s=round(time.perf_counter() - trained))
        print(json.dumps(row), file=results, flush=True)
