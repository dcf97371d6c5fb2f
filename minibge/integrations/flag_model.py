"""FlagEmbedding's `FlagModel`, with minibge underneath: change the import line, keep the code.

BGE's model card shows this (abridged); with `from minibge import FlagModel` it runs unchanged:

    model = FlagModel("BAAI/bge-large-zh-v1.5", use_fp16=True,
                      query_instruction_for_retrieval="为这个句子生成表示以用于检索相关文章：")
    q = model.encode_queries(["query_1", "query_2"])    # instruction + query,  (2, 1024) numpy
    p = model.encode_corpus(["样例文档-1", "样例文档-2"])  # passages as they are, (2, 1024) numpy
    scores = q @ p.T                                     # cosine similarities

FlagModel is only a set of defaults around one `Embedder` (embedder.py): every call below
becomes exactly one call of `Embedder.encode` / `encode_queries`, so the model, the batching and
the input checks are the embedder's own, and a bad input gets the same error either way.

The FlagModel followed is FlagEmbedding ≥ 1.3's, where FlagModel is its encoder-only BaseEmbedder:
defaults query_instruction_for_retrieval=None, pooling_method="cls", use_fp16=True, batch_size=256,
query_max_length=passage_max_length=512, convert_to_numpy=True; encode_queries builds each text as
instruction + query, encode_corpus and encode add nothing; on a CPU it runs in float32. How those
arguments map onto the embedder:

    query_instruction_for_retrieval   None = NO instruction, as in FlagEmbedding. This is the one
                                      place where None does not mean "the model's own default"
                                      (load_embedder and MiniBGEEmbeddings pick BGE's instruction
                                      from the model's name or config): FlagModel code always says
                                      which instruction it wants, so I keep its meaning.
    pooling_method="cls"              wins over the folder's 1_Pooling/config.json, as in
                                      FlagEmbedding (pass "mean" for all-MiniLM-L6-v2)
    use_fp16                          float16 weights on a GPU; on a CPU one warning and float32.
                                      FlagEmbedding's default is True, minibge's False (exact by default)
    query_max_length / passage_max_length
                                      the truncation length of encode_queries / of encode and
                                      encode_corpus (a call's max_length= overrides it), capped
                                      only by the model's position embeddings: 512 tokens for
                                      all-MiniLM-L6-v2 too, whose folder says 256 to others
    batch_size, convert_to_numpy      per-call defaults, each overridable in the call
    devices                           one device: "cuda:0", "cpu", 0 or ["cuda:1"]; None picks
                                      CUDA when available. FlagEmbedding spreads a list of several
                                      GPUs over worker processes; minibge encodes on one device

Where the outputs differ from FlagEmbedding's: arrays are always float32 (FlagEmbedding returns
float16 arrays when the model ran in fp16). Batching differs too, though not the vectors' order
(the input order either way): FlagEmbedding tokenizes the whole input and sorts it by token length,
longest first; minibge's default (fast) path sorts by token length too, but a window of
embedder.sort_window texts at a time (memory bounded by the window), and caps each batch at
embedder.max_tokens real tokens besides batch_size; the plain path (fast=False, or a model the
fast path cannot run) sorts by characters, as sentence-transformers does.
"""
from ..embedder import load_embedder


def _single_device(devices):
    """FlagEmbedding's `devices` argument → the one device load_embedder takes (None: its default)."""
    if isinstance(devices, (list, tuple)):
        if len(devices) != 1:
            raise ValueError(f"minibge encodes on one device; got devices={devices!r}. "
                             "Pass one, e.g. devices='cuda:0', and run one FlagModel per GPU for more")
        devices = devices[0]
    if isinstance(devices, int) and not isinstance(devices, bool):
        return f"cuda:{devices}"  # FlagEmbedding reads an int as a CUDA index
    if devices is None or isinstance(devices, str):
        return devices
    raise TypeError(f"devices must be None, a str like 'cuda:0', an int or a list of one, got {devices!r}")


class FlagModel:
    """FlagEmbedding's FlagModel API over a minibge Embedder (the embedder is `.embedder`)."""

    def __init__(self, model_name_or_path, query_instruction_for_retrieval: str | None = None,
                 use_fp16: bool = False, pooling_method: str = "cls", normalize_embeddings: bool = True,
                 batch_size: int = 256, query_max_length: int = 512, passage_max_length: int = 512,
                 devices=None, convert_to_numpy: bool = True):
        # "" rather than None: for the embedder None would mean "BGE's instruction by model name"
        self.embedder = load_embedder(model_name_or_path, device=_single_device(devices),
                                      dtype="float16" if use_fp16 else None, pooling=pooling_method,
                                      query_instruction=query_instruction_for_retrieval or "")
        # FlagEmbedding cuts each call at the max_length it asks for, whatever the folder's
        # sentence_bert_config.json says; the embedder caps that at its own limit, so I lift the
        # limit to what the model can take (its position embeddings)
        self.embedder.max_length = self.embedder.model.config.max_sequence_length
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.normalize_embeddings = normalize_embeddings
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.convert_to_numpy = convert_to_numpy

    def __repr__(self):
        return f"FlagModel({self.embedder!r}, query_instruction_for_retrieval={self.query_instruction_for_retrieval!r})"

    def _options(self, batch_size, max_length, convert_to_numpy) -> dict:
        """FlagModel's per-call arguments (None: the instance's defaults) as Embedder.encode keywords."""
        to_numpy = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        # FlagEmbedding without numpy returns one (N, D) tensor on the device, as convert_to_tensor does
        return dict(batch_size=self.batch_size if batch_size is None else batch_size,
                    max_length=max_length, normalize_embeddings=self.normalize_embeddings,
                    convert_to_numpy=to_numpy, convert_to_tensor=not to_numpy)

    def encode_queries(self, queries, batch_size: int | None = None, max_length: int | None = None,
                       convert_to_numpy: bool | None = None):
        """Queries with the retrieval instruction prepended (if one was given) → (N, D), or (D,) for one str."""
        max_length = self.query_max_length if max_length is None else max_length
        # read at each call, so that setting model.query_instruction_for_retrieval later works as in FlagEmbedding
        instruction = self.query_instruction_for_retrieval or ""  # "": none (None would be the embedder's own)
        return self.embedder.encode_queries(queries, instruction=instruction,
                                            **self._options(batch_size, max_length, convert_to_numpy))

    def encode_corpus(self, corpus, batch_size: int | None = None, max_length: int | None = None,
                      convert_to_numpy: bool | None = None):
        """Passages, never an instruction → (N, D), or (D,) for one str."""
        max_length = self.passage_max_length if max_length is None else max_length
        return self.embedder.encode_corpus(corpus, **self._options(batch_size, max_length, convert_to_numpy))

    def encode(self, sentences, batch_size: int | None = None, max_length: int | None = None,
               convert_to_numpy: bool | None = None):
        """Texts as they are (no instruction), cut at passage_max_length → (N, D), or (D,) for one str."""
        max_length = self.passage_max_length if max_length is None else max_length
        return self.embedder.encode(sentences, **self._options(batch_size, max_length, convert_to_numpy))
