"""The fast inference backend of `Embedder.encode`: the same function as model.py, computed faster.

encoder.py packs real tokens, fuses QKV and runs the matmuls through oneDNN (onednn.py); a
FastEncoder is called like the model (token ids and mask in, (B, T, H) out), and its gate
(`model_blocker`) lets encode() run it only where it computes exactly what the model computes.
"""
from ..common import cpu_has_native_bf16
from .encoder import ATTENTION_MODES, SPEED_PRECISIONS, FastEncoder, Packing, model_blocker, speed_options

__all__ = ["ATTENTION_MODES", "SPEED_PRECISIONS", "FastEncoder", "Packing", "cpu_has_native_bf16", "model_blocker",
           "speed_options"]
