"""Recall@10 of the approximate FAISS backends against exact search, on a saved SciFact index.

    minibge index -m weights/all-MiniLM-L6-v2 --corpus ../shared/eval/data/scifact --out scifact-index
    python docs/index_recall.py scifact-index ../shared/eval/data/scifact

Every SciFact query (all splits: queries.jsonl) is embedded once; each backend answers the same
query vectors. recall@10 = |approximate top 10 ∩ exact top 10| / 10 (/ N for an index under 10 documents), averaged over the queries.
Prints the markdown table that docs/usage.md shows.
"""
import json
import sys
import time

import numpy as np
import torch

import minibge
import minibge.index
from minibge import common


def main(index_dir: str, beir_dir: str) -> None:
    torch.set_num_threads(1)
    index = minibge.index.open(index_dir)
    embedder = minibge.load_embedder(index.info["model"]["folder"])
    index.check_model(embedder)
    queries = [json.loads(line)["text"] for _, line in common.iter_lines(f"{beir_dir}/queries.jsonl", skip_blank=True)]
    q = embedder.encode_queries(queries, show_progress_bar=False)  # (Q, D)
    _, exact = index.search_vectors(q, k=10, backend="exact")
    print(f"{len(index)} documents, {len(queries)} queries, model {index.info['model']['name']}\n")
    print("| backend | recall@10 vs exact | top-1 equal | search time, all queries |")
    print("|---|---:|---:|---:|")
    for backend in minibge.index.BACKENDS:
        index.search_vectors(q[:1], k=10, backend=backend)  # builds (or loads) the FAISS structure
        start = time.perf_counter()
        _, rows = index.search_vectors(q, k=10, backend=backend)
        seconds = time.perf_counter() - start
        recall = np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(rows.tolist(), exact.tolist())])
        top1 = np.mean(rows[:, 0] == exact[:, 0])
        print(f"| {backend} | {recall:.4f} | {top1:.4f} | {seconds:.3f} s |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
