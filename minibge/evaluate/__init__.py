"""Evaluation as MTEB computes it: the tasks and their metrics (tasks.py), the data loaders (data.py)
and the exact top-k search, then optional reranking (search.py)."""
from .data import document_text, load_beir, load_pairs_table, load_sick, load_sts_csv
from .search import rerank, top_k
from .tasks import (TASKS, classification, evaluate_task, format_markdown, pearson, per_query_metrics,
                    rank_average, rerank_results, retrieval, spearman, sts, task_key)

__all__ = ["document_text", "load_beir", "load_pairs_table", "load_sick", "load_sts_csv", "top_k", "rerank", "TASKS",
           "classification", "evaluate_task", "format_markdown", "pearson", "per_query_metrics",
           "rank_average", "rerank_results", "retrieval", "spearman", "sts", "task_key"]
