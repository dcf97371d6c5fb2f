"""The dev-split hyper-parameter sweep behind docs/training.md: fine-tune on train_fit.mined.jsonl
with each setting, score nDCG@10 on the dev queries, print one JSON line per setting.

    python docs/scifact_sweep.py RUNS_DIR MODEL [OUT_JSONL]

Each setting runs `minibge finetune` (in-process) into RUNS_DIR/sweep/<name>, then
docs/scifact_data.py's dev evaluation. Fixed: batch 16, group size 4, lengths 32/128.
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minibge.cli import main  # noqa: E402
from scifact_data import dev_eval_score  # noqa: E402

GRID = [(lr, temperature, epochs) for epochs in (1, 2) for temperature in (0.02, 0.05) for lr in (2e-5, 5e-5, 1e-4)]


if __name__ == "__main__":
    runs, model = Path(sys.argv[1]), sys.argv[2]
    results = open(sys.argv[3], "a") if len(sys.argv) > 3 else sys.stdout
    print(json.dumps({"setting": "base", **dev_eval_score(model)}), file=results, flush=True)
    for lr, temperature, epochs in GRID:
        name = f"lr{lr:g}_t{temperature:g}_e{epochs}"
        out = runs / "sweep" / name
        shutil.rmtree(out, ignore_errors=True)
        rc = main(["finetune", "-m", model, "--train", str(runs / "train_fit.mined.jsonl"), "--out", str(out),
                   "--batch-size", "16", "--group-size", "4", "--lr", str(lr), "--temperature", str(temperature),
                   "--epochs", str(epochs), "--log-steps", "1000"])
        print(json.dumps({"setting": name, "rc": rc, **(dev_eval_score(str(out)) if rc == 0 else {})}),
              file=results, flush=True)
