"""minibge: BGE text embeddings in plain PyTorch, small enough to read.

    import minibge
    embedder = minibge.load_embedder("weights/all-MiniLM-L6-v2")
    vectors = embedder.encode(["a sentence", "another one"])  # (2, 384) numpy, unit length

    batch = embedder.tokenize(["a sentence"])                 # {"input_ids", "attention_mask"} (B, T)
    hidden = embedder.model(**batch)                          # BertModel: always the last hidden state (B, T, H)
    layers = embedder.model.inspect(**batch)                  # every layer's hidden states and attention maps
    emb = embedder.embed(["a sentence"])                      # (B, D) with gradients, for training loops
    embedder.save_pretrained("my-model")                      # loads in minibge, transformers, sentence-transformers
"""
from .config import PRESETS, BertConfig, preset
from .model import BertModel, EncoderOutput, cls_pool, l2_normalize, mean_pool
from .weights import load_model, save_pretrained
from .tokenizer import Tokenizer
from .embedder import Embedder, load_embedder
from .integrations.flag_model import FlagModel

__all__ = ["BertConfig", "BertModel", "EncoderOutput", "PRESETS", "preset", "load_model", "save_pretrained",
           "cls_pool", "mean_pool", "l2_normalize", "Tokenizer", "Embedder", "load_embedder",
           "FlagModel"]
__version__ = "0.1.0"
