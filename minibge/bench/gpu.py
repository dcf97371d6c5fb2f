"""One short GPU check: half-precision equivalence and throughput against transformers.

    python -m minibge.bench.gpu --out gpu-results          # on a CUDA machine, < 4 minutes
    python -m minibge.bench.gpu --out /tmp/smoke --smoke   # tiny shapes on the CPU, a few seconds

The development machines have no GPU, so this script is the whole GPU story, written to run
once, unattended, in a short lease. Everything it needs is in this repository: the models are
random-weight bge-base-en-v1.5 and bge-large-en-v1.5 shapes (minibge.preset), written to disk in
the official layout and read back, so no network is touched. transformers is optional: when it
imports, its BertModel (SDPA) reads the very same folder and serves as the reference; otherwise
its rows say "skipped".

1. Equivalence. Half precision rounds differently in every implementation, so "equal to fp32"
   is not the test; "no worse than transformers" is. On one right-padded batch:

       err(impl, dtype) = max |h_dtype − h_fp32| over real tokens     (same impl, same weights)
       minibge passes when err(minibge, dtype) ≤ 3 × err(transformers, dtype)

   and the smallest [CLS] cosine (float64) between each dtype and fp32 is reported beside it.
2. Throughput. texts/s and real tokens/s for a few (batch, length) settings whose lengths are
   drawn uniformly in [T/4, T] (right padding, as a tokenizer pads), median of a few repeats
   after warm-up, with torch.cuda.synchronize() around every timed call. minibge's padded SDPA
   path, minibge.fast's unpadded path in each attention mode (when importable; "varlen", PyTorch's
   variable-length Flash kernel, runs on CUDA in fp16/bf16 only, its fp32 reference is the plain
   model's), transformers' SDPA.

Every section runs inside its own try/except: a failure is written into the results and the
script goes on. results.json and results.md are rewritten after each section, so even a run cut
short leaves what it measured.
"""
import argparse
import copy
import datetime
import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..common import write_text_atomic
from ..config import BertConfig, preset
from ..model import BertModel
from ..weights import load_model, save_pretrained

# (batch, max length) settings: short sentences, paragraphs, full-length passages
GPU_SETTINGS = [(128, 64), (64, 256), (32, 512)]
GPU_PRESETS = ["bge-base-en-v1.5", "bge-large-en-v1.5"]
SMOKE_SETTINGS = [(8, 32)]
SMOKE_CONFIG = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64)
EQUIVALENCE_BATCH = (16, 128)  # (B, T) for the equivalence check; the smoke run caps T at its positions
ERROR_RATIO_LIMIT = 3.0
FAST_MODES = ("buckets", "padded", "nested", "varlen")  # minibge.fast attention modes
HALF_ONLY = ("varlen",)  # Flash has no fp32 kernel: their fp32 reference is the plain model's
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# -----------------------------------------------------------------------------
# Inputs, models, timing

def padded_batch(config: BertConfig, batch_size: int, max_len: int, device, seed: int = 0):
    """Random token ids (B, T) right-padded to T, lengths uniform in [T/4, T], the first row full."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, max_len // 4), max_len + 1, (batch_size,), generator=gen)
    lengths[0] = max_len
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()  # (B, T)
    ids = torch.randint(1, config.vocab_size, (batch_size, max_len), generator=gen) * mask  # [PAD] = 0
    return ids.to(device), mask.to(device)


def build_model_folder(config: BertConfig, folder: Path, seed: int = 0) -> Path:
    """A random-weight model (HF's init) written in the official layout."""
    torch.manual_seed(seed)
    save_pretrained(BertModel(config), folder)
    return folder


def load_transformers(folder: Path, device):
    """transformers' BertModel (SDPA) from the same folder, or the reason it is unavailable."""
    try:
        import transformers
    except ImportError as err:
        return None, f"transformers not importable ({err})"
    try:
        model = transformers.BertModel.from_pretrained(str(folder), attn_implementation="sdpa")
    except Exception as err:  # a transformers version that reads the folder differently: report, go on
        return None, f"transformers could not load the checkpoint ({err!r})"
    return model.to(device).eval(), None


def load_fast():
    """minibge.fast's unpadded encoder, if this checkout has one."""
    try:
        from .. import fast
    except ImportError as err:
        return None, f"minibge.fast not importable ({err})"
    return fast, None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup: int, repeats: int) -> dict:
    """Median / min / max seconds of fn() after warm-up, synchronised around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def hidden_of(impl: str, model, ids, mask):
    """(B, T, H) float32 last hidden state from one implementation."""
    with torch.inference_mode():
        if impl == "transformers":
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:  # minibge and minibge.fast share the call
            out = model(ids, mask)
    return out.float()


def compare(out, ref, mask) -> dict:
    """max |diff| over real tokens and the smallest [CLS] cosine (float64)."""
    real = mask.bool()
    cos = torch.nn.functional.cosine_similarity(out[:, 0].double(), ref[:, 0].double(), dim=-1)
    return {"max_abs_diff": (out - ref)[real].abs().max().item(), "min_cls_cosine": cos.min().item(),
            "cls_cosine_gap": 1 - cos.min().item()}  # 1 − min cosine: readable where the cosine prints as 1


# -----------------------------------------------------------------------------
# The two sections

def equivalence(name, folder, config, device, batch_shape) -> list[dict]:
    """fp32 vs fp16/bf16 within each implementation; minibge fp32 vs transformers fp32."""
    ids, mask = padded_batch(config, *batch_shape, device, seed=1)
    fp32 = {"minibge": load_model(folder, device=device)}
    hf, reason = load_transformers(folder, device)
    if hf is not None:
        fp32["transformers"] = hf
    fast, fast_reason = load_fast()
    rows, refs = [], {}
    for mode in FAST_MODES if fast is not None else ():
        try:  # varlen is refused off CUDA
            fp32[f"minibge unpadded/{mode}"] = fast.FastEncoder(fp32["minibge"], attention=mode)
        except ValueError as err:
            rows.append({"model": name, "impl": f"minibge unpadded/{mode}", "note": f"skipped: {err}"})
    for impl, model in list(fp32.items()):
        try:
            refs[impl] = (refs["minibge"] if impl.split("/")[-1] in HALF_ONLY
                          else hidden_of(impl, model, ids, mask))
        except Exception as err:
            rows.append({"model": name, "dtype": "fp32", "impl": impl, "note": f"failed: {err!r}"})
            del fp32[impl]
    if "transformers" in refs and "minibge" in refs:
        rows.append({"model": name, "dtype": "fp32", "impl": "minibge vs transformers",
                     **compare(refs["minibge"], refs["transformers"], mask)})
    for dtype_name, dtype in DTYPES.items():
        errors = {}
        for impl, model in fp32.items():
            try:  # one failing implementation costs its own row only
                if impl.startswith("minibge unpadded"):
                    low = fast.FastEncoder(copy.deepcopy(fp32["minibge"]).to(dtype), attention=model.attention)
                else:
                    low = copy.deepcopy(model).to(dtype)
                errors[impl] = compare(hidden_of(impl, low, ids, mask), refs[impl], mask)
                del low
            except Exception as err:
                rows.append({"model": name, "dtype": dtype_name, "impl": impl, "note": f"failed: {err!r}"})
        hf_err = errors.get("transformers", {}).get("max_abs_diff")
        for impl, err in errors.items():
            row = {"model": name, "dtype": dtype_name, "impl": f"{impl} vs its fp32", **err}
            if impl != "transformers" and hf_err:
                row["ratio_to_transformers"] = err["max_abs_diff"] / hf_err
                row["within_3x"] = row["ratio_to_transformers"] <= ERROR_RATIO_LIMIT
            rows.append(row)
    for impl, why in (("transformers", reason), ("minibge unpadded", fast_reason)):
        if why:
            rows.append({"model": name, "impl": impl, "note": f"skipped: {why}"})
    return rows


def throughput(name, folder, config, device, settings, warmup, repeats, deadline) -> list[dict]:
    """texts/s and tokens/s per (dtype, batch, length, impl)."""
    rows = []
    fast, fast_reason = load_fast()
    for dtype_name, dtype in DTYPES.items():
        models = {"minibge sdpa": load_model(folder, device=device, dtype=dtype)}
        for mode in FAST_MODES if fast is not None else ():
            try:  # varlen is refused off CUDA
                models[f"minibge unpadded/{mode}"] = fast.FastEncoder(models["minibge sdpa"], attention=mode)
            except ValueError as err:
                rows.append({"model": name, "dtype": dtype_name, "impl": f"minibge unpadded/{mode}",
                             "note": f"skipped: {err}"})
        hf, reason = load_transformers(folder, device)
        if hf is not None:
            models["transformers sdpa"] = hf.to(dtype)
        for batch_size, max_len in settings:
            if time.monotonic() > deadline:
                rows.append({"model": name, "dtype": dtype_name, "note": "skipped: time budget spent"})
                break
            ids, mask = padded_batch(config, batch_size, max_len, device, seed=2)
            tokens = int(mask.sum())
            for impl, model in models.items():
                call = "transformers" if impl.startswith("transformers") else "minibge"
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    timing = time_call(lambda: hidden_of(call, model, ids, mask), device, warmup, repeats)
                except Exception as err:
                    rows.append({"model": name, "dtype": dtype_name, "batch": batch_size, "max_len": max_len,
                                 "impl": impl, "note": f"failed: {err!r}"})
                    continue
                rows.append({"model": name, "dtype": dtype_name, "batch": batch_size, "max_len": max_len,
                             "real_tokens": tokens, "padding_pct": 100 * (1 - tokens / ids.numel()), "impl": impl,
                             "texts_per_s": batch_size / timing["median_s"],
                             "tokens_per_s": tokens / timing["median_s"], **timing,
                             "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20
                             if device.type == "cuda" else None})
        for impl, why in (("transformers sdpa", reason), ("minibge unpadded", fast_reason)):
            if why:
                rows.append({"model": name, "dtype": dtype_name, "impl": impl, "note": f"skipped: {why}"})
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -----------------------------------------------------------------------------
# Writing results

def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    rows = [r for r in rows if "note" not in r]
    if not rows:
        return "(no rows)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    env = results["environment"]
    md = [f"# minibge GPU check ({env['date']})", "",
          f"device: **{env['device_name']}**, torch {env['torch']}, transformers {env['transformers']}, "
          f"Python {env['python']}", "", f"command: `{env['command']}`", "",
          "## Equivalence (max |diff| over real tokens; cls_cosine_gap = 1 − min CLS cosine, float64)", "",
          markdown_table(results["equivalence"], ["model", "dtype", "impl", "max_abs_diff", "cls_cosine_gap",
                                                  "ratio_to_transformers", "within_3x"]),
          "## Throughput (median of repeats; lengths uniform in [T/4, T], right-padded)", "",
          markdown_table(results["throughput"], ["model", "dtype", "batch", "max_len", "padding_pct", "impl",
                                                 "texts_per_s", "tokens_per_s", "median_s", "min_s", "max_s",
                                                 "peak_mem_mib"])]
    notes = [r for section in ("equivalence", "throughput") for r in results[section] if "note" in r]
    if notes:
        md += ["## Notes", ""] + [f"- {r.get('model', '')} {r.get('dtype', '')} {r.get('impl', '')}: {r['note']}"
                                  for r in notes] + [""]
    if results["errors"]:
        md += ["## Errors", ""] + [f"### {e['section']}\n\n```\n{e['traceback']}```\n" for e in results["errors"]]
    write_text_atomic(out / "results.md", "\n".join(md))


def environment(device, command: str) -> dict:
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "not installed"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers_version,
            "python": platform.python_version(), "command": command}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minibge.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script itself")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new throughput settings after this")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    out = Path(args.out)
    if args.smoke:
        device = torch.device("cpu")
        configs = {"tiny": BertConfig(**SMOKE_CONFIG)}
        settings, warmup, repeats, eq_shape = SMOKE_SETTINGS, 1, 1, (4, 32)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --smoke to check the script on the CPU")
        device = torch.device("cuda")
        configs = {name: preset(name) for name in GPU_PRESETS}
        settings, warmup, repeats, eq_shape = GPU_SETTINGS, 3, 7, EQUIVALENCE_BATCH
        # an fp32 reference must be fp32: TF32 matmuls would blur the very error being measured
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    command = "python -m minibge.bench.gpu " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    results = {"environment": environment(device, command), "equivalence": [], "throughput": [], "errors": []}
    print(f"device: {results['environment']['device_name']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            for section, run in (("equivalence", lambda: equivalence(name, folder, config, device, eq_shape)),
                                 ("throughput", lambda: throughput(name, folder, config, device, settings,
                                                                   warmup, repeats, deadline))):
                try:
                    if section == "equivalence":
                        folder = build_model_folder(config, Path(tmp) / name)
                    results[section] += run()
                except Exception:  # one broken section must not cost the rest of a short GPU lease
                    results["errors"].append({"section": f"{name} {section}", "traceback": traceback.format_exc()})
                print(f"[{time.monotonic() - start:6.1f}s] {name} {section} done", flush=True)
                write_results(out, results)
    results["environment"]["wall_s"] = time.monotonic() - start
    write_results(out, results)
    print((out / "results.md").read_text())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
