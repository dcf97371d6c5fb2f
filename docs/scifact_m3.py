"""BGE-M3's SciFact table for docs/m3.md: each retrieval mode of a fine-tuned M3 folder, on the dev
split of the train queries (to choose the run and the combination weights) or on the test queries.

    python docs/scifact_m3.py dev MODEL                 # 162 dev queries, every mode, every weighting below
    python docs/scifact_m3.py test MODEL W1 W2 W3       # the 300 test queries, once, with the chosen weights

Each query is scored against all 5,183 abstracts by each mode (minibge.evaluate.m3: exact search,
no index), and MTEB's metrics are computed per mode. Passages are cut at 256 tokens, the length
`minibge eval` embeds SciFact with all-MiniLM-L6-v2 (its max_seq_length), so the dense row is
comparable with docs/training.md's dense-only fine-tune.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from scifact_data import SCIFACT, split_ids  # noqa: E402

from minibge.evaluate.data import document_text, load_beir  # noqa: E402

# [dense, sparse, colbert]: compute_score's default, FlagEmbedding's README example, the paper's teacher
WEIGHTINGS = ([1.0, 1.0, 1.0], [0.4, 0.2, 0.4], [1.0, 0.3, 1.0])
MAX_PASSAGE_LENGTH, MAX_QUERY_LENGTH = 256, 64


def table(model: str, split: str, weightings) -> dict:
    from minibge import load_m3
    from minibge.m3 import combine_scores
    from minibge.evaluate.m3 import mode_metrics, score_matrices

    corpus, queries, qrels = load_beir(SCIFACT, split="train" if split == "dev" else "test")
    if split == "dev":
        qrels = {q: qrels[q] for q in split_ids(qrels)[1]}
    qids = [q for q in queries if any(r > 0 for r in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    start = time.perf_counter()
    base = score_matrices(load_m3(model), [queries[q] for q in qids], [document_text(corpus[d]) for d in doc_ids],
                          max_query_length=MAX_QUERY_LENGTH, max_passage_length=MAX_PASSAGE_LENGTH)
    rows = {}
    for w in weightings:  # the single modes once, the two combinations once per weighting
        combined = combine_scores(base["dense"], base["sparse"], base["colbert"], w)
        wanted = {mode: np.asarray(s) for mode, s in combined.items() if "+" in mode or w is weightings[0]}
        for mode, m in mode_metrics(wanted, qids, doc_ids, qrels, (10, 100)).items():
            rows[mode if "+" not in mode else f"{mode} {w}"] = {
                "ndcg_at_10": round(m["ndcg_at_10"], 2), "map_at_10": round(m["map_at_10"], 2),
                "recall_at_100": round(m["recall_at_100"], 2)}
    return {"model": model, "split": split, "queries": len(qids), "seconds": round(time.perf_counter() - start, 1),
            "modes": rows}


if __name__ == "__main__":
    command, model = sys.argv[1], sys.argv[2]
    if command == "dev":
        print(json.dumps(table(model, "dev", WEIGHTINGS), indent=1))
    elif command == "test":
        print(json.dumps(table(model, "test", ([float(w) for w in sys.argv[3:6]],)), indent=1))
    else:
        raise SystemExit(__doc__)
