"""minibge: BGE text embeddings in plain PyTorch, small enough to read.

    import minibge
    embedder = minibge.load_embedder("weights/all-MiniLM-L6-v2")
    vectors = embedder.encode(["a sentence", "another one"])  # (2, 384) numpy, unit length

    batch = embedder.tokenize(["a sentence"])                 # {"input_ids", "attention_mask"} (B, T)
    hidden = embedder.model(**batch)                          # BertModel: always the last hidden state (B, T, H)
    layers = embedder.model.inspect(**batch)                  # every layer's hidden states and attention maps
    emb = embedder.embed(["a sentence"])                      # (B, D) with gradients, for training loops
    embedder.save_pretrained("/tmp/my-model")                 # loads in minibge, transformers, sentence-transformers

Reading order, the textbook first (the flat modules of this package):

    config.py      BertConfig: the numbers that pin down an encoder, and the BGE presets
    model.py       the encoder, in the order the data flows through it
    weights.py     official checkpoint names <-> this model's, checked loading, save_pretrained
    tokenizer.py   text -> token ids
    embedder.py    the pipeline: tokenize, order by length, run the model, pool, normalise, restore order
    reranker.py    cross-encoders: a (query, passage) pair read as one sequence, one score out
    m3.py          BGE-M3: dense, lexical and ColBERT outputs of one forward pass, and their scores
    losses.py      InfoNCE, the contrastive loss BGE is fine-tuned with
    retromae.py    RetroMAE, BGE's pre-training objective
    lab.py         each classic re-implementation mistake, measured

then the tooling, one package each: train/ (loop.py first), evaluate/, fast/ (the backend
`encode` plugs in), integrations/, cli/, bench/; hub.py and common.py are small helpers, and
quantization.py, similarity.py (sentence-transformers' quantized embeddings and scores) and index.py
(a saved index, `minibge.index.build/open`) sit beside them. The README's file tree has one line on
every module.
"""
from .config import PRESETS, BertConfig, preset
from .model import BertModel, EncoderOutput, cls_pool, l2_normalize, mean_pool
from .weights import load_model, save_pretrained
from .tokenizer import Tokenizer
from .embedder import Embedder, load_embedder
from .reranker import CrossEncoder, Reranker, load_reranker
from .integrations.flag_model import FlagAutoModel, FlagModel
from .integrations.flag_reranker import FlagReranker
from .m3 import M3Embedder, M3Model, load_m3
from .integrations.flag_m3 import BGEM3FlagModel

__all__ = ["BertConfig", "BertModel", "EncoderOutput", "PRESETS", "preset", "load_model", "save_pretrained",
           "cls_pool", "mean_pool", "l2_normalize", "Tokenizer", "Embedder", "load_embedder",
           "FlagModel", "FlagAutoModel", "CrossEncoder", "Reranker", "load_reranker", "FlagReranker",
           "M3Model", "M3Embedder", "load_m3", "BGEM3FlagModel"]
__version__ = "0.1.0"
