"""The fast inference backend of `Embedder.encode`: the same function as model.py, computed faster.

encoder.py packs real tokens, fuses QKV and runs the matmuls through oneDNN (onednn.py); its gate
(`model_blocker`) lets it run only where it computes exactly what the model computes.
"""
from .encoder import (ATTENTION_MODES, FastEncoder, Packing, cpu_has_native_bf16, iter_fast_batches, model_blocker,
                      pool_packed, speed_options, token_budget_batches)

__all__ = ["ATTENTION_MODES", "FastEncoder", "Packing", "cpu_has_native_bf16", "iter_fast_batches",
           "model_blocker", "pool_packed", "speed_options", "token_budget_batches"]
