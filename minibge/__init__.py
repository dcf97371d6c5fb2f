"""minibge: BGE text embeddings in plain PyTorch, small enough to read.

    import minibge
    model = minibge.load_model("weights/bge-base-en-v1.5")   # BertModel, eval mode
    hidden = model(input_ids, attention_mask)                # (B, T, H)

    embedder = minibge.load_embedder("weights/all-MiniLM-L6-v2")
    vectors = embedder.encode(["a sentence", "another one"])  # (2, 384), unit length
"""
from .config import PRESETS, BertConfig, preset
from .model import BertModel, EncoderOutput, cls_pool, l2_normalize, mean_pool
from .weights import load_model, save_pretrained
from .embedder import Embedder, load_embedder

__all__ = ["BertConfig", "BertModel", "EncoderOutput", "PRESETS", "preset", "load_model", "save_pretrained",
           "cls_pool", "mean_pool", "l2_normalize", "Embedder", "load_embedder"]
__version__ = "0.1.0"
