"""Benchmarks: minibge's encode against its peers (run.py, peers.py), one contrastive training step
(train.py), timing helpers (timing.py) and the GPU check (`python -m minibge.bench.gpu`).
The command line is `minibge bench` (cli/bench.py)."""
from .run import encoder_flops, markdown, run_benchmark
from .timing import PeakRSS, best_seconds, matmul_libraries, matmul_peaks

__all__ = ["encoder_flops", "markdown", "run_benchmark", "PeakRSS", "best_seconds", "matmul_libraries",
           "matmul_peaks"]
