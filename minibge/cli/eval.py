"""`minibge eval`: score a model on the built-in MTEB tasks from the shell.

    minibge eval --task stsb --output results.json --markdown results.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..common import write_text_atomic
from ..evaluate import TASKS, evaluate_task, format_markdown
from .args import DEFAULT_DATA_DIR, Formatter, examples, rerank_options
from .args import task as task_name
from .io import PROG, CliError, UsageError, check_writable, progress_setting
from .model import load


def add_eval_command(commands, verbose, model, model_only) -> None:
    """Add eval to the subparsers."""

    def command(name, help, description, epilog, parents=(verbose, model)):
        return commands.add_parser(name, help=help, description=description, epilog=epilog,
                                   parents=list(parents), formatter_class=Formatter)

    p = command("eval", "score a model on STS-B, SICK-R and SciFact (as MTEB does)",
                "Run built-in MTEB tasks and print a markdown table of the measured main score next "
                "to the published one: stsb and sickr (cosine Spearman), scifact (nDCG@10).",
                examples("minibge eval", "minibge eval --task stsb --task sickr -m weights/all-MiniLM-L6-v2",
                          "minibge eval --output results.json --markdown results.md",
                          "minibge eval --task scifact -m EMBEDDER --rerank RERANKER --rerank-top 100"))
    p.add_argument("-t", "--task", action="append", type=task_name, metavar="TASK",
                   help=f"task to run, repeatable: {', '.join(TASKS)} (default: all)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"folder with stsbenchmark/, sick2014/, scifact/ (default: {DEFAULT_DATA_DIR} if it exists)")
    p.add_argument("-o", "--output", metavar="JSON", help="write the list of result dicts to this JSON file")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown table to this file too")
    rerank_options(p, "documents")  # retrieval tasks only
    p.set_defaults(run=cmd_eval)


def cmd_eval(args) -> int:
    tasks = list(dict.fromkeys(args.task or TASKS))
    if args.data_dir is not None:
        data_dir = Path(args.data_dir).expanduser()
        if not data_dir.is_dir():
            raise CliError(f"--data-dir {data_dir} is not a folder")
    elif DEFAULT_DATA_DIR.is_dir():
        data_dir = DEFAULT_DATA_DIR
    else:
        raise UsageError(f"--data-dir is required (the default {DEFAULT_DATA_DIR} does not exist)")
    check_writable(args.output, "--output")
    check_writable(args.markdown, "--markdown")

    if args.rerank and any(TASKS[t][0] != "retrieval" for t in tasks):
        raise UsageError(f"--rerank applies to retrieval tasks only ({', '.join(t for t in TASKS if TASKS[t][0] == 'retrieval')})")
    embedder, folder, _ = load(args)
    reranker = None
    if args.rerank:
        from ..reranker import load_reranker
        reranker = load_reranker(args.rerank, device=args.device or embedder.device, max_length=args.rerank_max_length)
        print(f"{PROG}: reranking the top {args.rerank_top} of each query with {args.rerank}", file=sys.stderr)
    results = []
    for task in tasks:
        print(f"{PROG}: running {task} ...", file=sys.stderr)
        result = evaluate_task(embedder, task, data_dir, batch_size=args.batch_size,
                               show_progress_bar=progress_setting(), reranker=reranker, rerank_top=args.rerank_top,
                               rerank_batch_size=args.rerank_batch_size)
        extra = {"reranker": args.rerank, "rerank_top": args.rerank_top,
                 "rerank_max_length": reranker.max_length} if reranker is not None else {}
        results.append({"model": folder.name, **extra, **result})
    table = format_markdown(results, folder.name)  # the folder name is what the published scores use
    print(table)
    for path, text in ((args.output, json.dumps(results, indent=2)), (args.markdown, table)):
        if path:
            write_text_atomic(Path(path).expanduser(), text + "\n")
            print(f"{PROG}: wrote {path}", file=sys.stderr)
    return 0
