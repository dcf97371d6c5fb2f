"""`minibge lab`: the divergence lab on the command line (registered by cli/__init__.py; the lab itself is minibge/lab.py).

    minibge lab -m weights/all-MiniLM-L6-v2 --output docs/lab.md   # regenerates the docs page
    minibge lab --limit 100                                         # the first 100 STS-B pairs: quick
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..common import write_text_atomic
from .args import DEFAULT_DATA_DIR, Formatter, examples, positive_int
from .io import PROG, CliError, UsageError, check_writable
from .model import load
from ..evaluate.data import load_sts_csv
from ..lab import MISTAKES, format_page, format_table, run_lab


def add_lab_command(commands, parents) -> None:
    """Add `lab` to the `minibge` parser's subcommands (parents: the shared -v and model options)."""
    p = commands.add_parser(
        "lab", parents=parents, formatter_class=Formatter,
        help="the divergence lab: measure classic re-implementation mistakes on a real checkpoint",
        description="Apply each classic BERT re-implementation mistake (tanh GELU, eps 1e-5, pre-LN, mask "
                    "polarity, pooler instead of CLS, ...) to a copy of the model, one at a time, and print a "
                    "markdown table of its effect on the hidden states and on STS-B Spearman.",
        epilog=examples("minibge lab -m weights/all-MiniLM-L6-v2 --output docs/lab.md",
                         "minibge lab --limit 100                 (the first 100 STS-B pairs: quick)",
                         "minibge lab --only tanh-gelu --only pre-ln"))
    p.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N STS-B test pairs")
    p.add_argument("--only", action="append", choices=[m.name for m in MISTAKES], metavar="NAME",
                   help=f"run only this mistake, repeatable: {', '.join(m.name for m in MISTAKES)}")
    p.add_argument("--data-dir", metavar="DIR", help="folder with stsbenchmark/ (default: ../shared/eval/data)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the whole page (table + how it was made) here")
    p.set_defaults(run=cmd_lab)


def cmd_lab(args) -> int:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else DEFAULT_DATA_DIR
    test_file = data_dir / "stsbenchmark" / "sts-test.csv"
    if not test_file.is_file():
        raise CliError(f"STS-B test file not found: {test_file} (use --data-dir)")
    check_writable(args.output, "--output")
    s1, s2, gold = load_sts_csv(test_file)
    n_total = len(gold)
    if args.limit:
        s1, s2, gold = s1[:args.limit], s2[:args.limit], gold[:args.limit]
    if args.int8:
        raise UsageError("the lab compares the exact model with its classic mistakes; leave out --int8")
    embedder, folder, _ = load(args)
    mistakes = [m for m in MISTAKES if m.name in args.only] if args.only else None
    rows = run_lab(embedder, s1, s2, gold, mistakes=mistakes, batch_size=args.batch_size)
    print(format_table(rows))
    if args.output:
        # the page names the command that regenerates it, rebuilt from the options that shape the table
        command = [PROG, "lab", "-m", str(folder), "--output", args.output]
        command += ["--limit", str(args.limit)] if args.limit else []
        command += [option for name in args.only or [] for option in ("--only", name)]
        write_text_atomic(Path(args.output).expanduser(),
                          format_page(rows, folder.name, len(gold), n_total, shlex.join(command)))
        print(f"{PROG}: wrote {args.output}", file=sys.stderr)
    return 0
