"""The benchmark scripts run end to end (tiny shapes, CPU) and report what they should.

Timings are never asserted: only that every section ran and that the numbers it reports are
the ones the equivalence checks promise.
"""
import json

from minibge import bench_gpu


def test_gpu_script_smoke_runs_every_section(tmp_path):
    status = bench_gpu.main(["--out", str(tmp_path), "--smoke"])
    results = json.loads((tmp_path / "results.json").read_text())
    errors = "\n".join(e["traceback"] for e in results["errors"])
    assert status == 0 and not errors, f"sections failed:\n{errors}"
    failed = [r for section in ("equivalence", "throughput") for r in results[section]
              if "failed" in r.get("note", "")]
    assert not failed, f"implementations failed: {failed}"
    impls = {r["impl"] for r in results["throughput"]}
    assert {"minibge sdpa", "minibge unpadded/buckets", "transformers sdpa"} <= impls, impls
    low_precision = [r for r in results["equivalence"] if "ratio_to_transformers" in r]
    assert low_precision and all(r["within_3x"] for r in low_precision), \
        [(r["impl"], r["dtype"], r["ratio_to_transformers"]) for r in low_precision]
    fp32 = [r for r in results["equivalence"] if r["impl"] == "minibge vs transformers"]
    assert fp32 and fp32[0]["max_abs_diff"] < 1e-4, fp32
    assert "## Throughput" in (tmp_path / "results.md").read_text()
