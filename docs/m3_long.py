"""One 8,192-token document through BGE-M3 on the CPU: peak memory and time (docs/benchmarks.md, "BGE-M3: one
8k-token document"). A random model with bge-m3's width (hidden 1024, 16 heads, FFN 4096, 8194 positions) and
--layers layers (24 in the real model), a small vocabulary (the embedding table is a lookup: its size adds
memory, not time), saved in the official layout and loaded back with minibge.load_m3.

    PYTHONPATH=$PWD python docs/m3_long.py --layers 2 --threads 1 --folder /tmp/m3-long
"""
import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", default="/tmp/m3-long")
    parser.add_argument("--fast", choices=["fast", "plain"], default="fast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from minibge import BertModel, Tokenizer
    from minibge.config import preset
    from minibge.m3 import M3Model, fresh_head, load_m3
    from rerank_fixtures import write_xlmr_tokenizer  # a small XLM-R tokenizer in the official layout

    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        config = dataclasses.replace(preset("bge-m3"), num_hidden_layers=args.layers, vocab_size=400)
        torch.manual_seed(0)
        folder.mkdir(parents=True, exist_ok=True)
        write_xlmr_tokenizer(folder, model_max_length=8192)
        M3Model(BertModel(config), fresh_head(1024, "colbert"), fresh_head(1024, "sparse")).save_pretrained(
            folder, Tokenizer.from_pretrained(folder))
    m3 = load_m3(folder, device="cpu", fast=args.fast == "fast")
    text = "the giant panda is a bear species endemic to China " * 2000
    m3.encode(["warm up"], return_sparse=True, return_colbert_vecs=True)
    loaded = peak_bytes()
    start = time.perf_counter()
    out = m3.encode([text], max_length=8192, return_sparse=True, return_colbert_vecs=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"layers": m3.model.config.num_hidden_layers, "threads": args.threads, "path": args.fast,
                      "tokens": int(out["colbert_vecs"][0].shape[0]) + 1, "seconds": round(seconds, 2),
                      "peak_after_load_MiB": round(loaded / 2**20), "peak_MiB": round(peak_bytes() / 2**20),
                      "added_by_encode_MiB": round((peak_bytes() - loaded) / 2**20)}))


if __name__ == "__main__":
    main()
