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

The FlagModel followed is FlagEmbedding 1.4's, where FlagModel is its encoder-only BaseEmbedder, with
the same parameters in the same order (so positional calls mean the same thing):

    FlagModel(model_name_or_path, normalize_embeddings=True, use_fp16=True, use_bf16=False,
              query_instruction_for_retrieval=None, query_instruction_format="{}{}", devices=None,
              pooling_method="cls", trust_remote_code=False, cache_dir=None, batch_size=256,
              query_max_length=512, passage_max_length=512, convert_to_numpy=True, **kwargs)

How each maps onto the embedder (every one is honoured, or refused with a one-line error):

    query_instruction_for_retrieval   None = NO instruction, as in FlagEmbedding. This is the one
                                      place where None does not mean "the model's own default"
                                      (load_embedder and MiniBGEEmbeddings pick BGE's instruction
                                      from the model's name or config): FlagModel code always says
                                      which instruction it wants, so I keep its meaning.
    query_instruction_format          how instruction and query are joined: format(instruction, query);
                                      "{}{}" is plain concatenation; a literal "\\n" in it means a newline,
                                      as in FlagEmbedding. Read at each call, like the instruction.
    passage_instruction_for_retrieval, passage_instruction_format (keywords, as FlagEmbedding's
                                      **kwargs): an instruction for encode_corpus; none by default
    pooling_method="cls"              wins over the folder's 1_Pooling/config.json, as in
                                      FlagEmbedding (pass "mean" for all-MiniLM-L6-v2)
    use_fp16 / use_bf16               float16 / bfloat16 weights on a GPU (bf16 wins when both are set,
                                      since use_fp16 defaults to True); on a CPU float32, quietly, as
                                      FlagEmbedding switches use_fp16 off there
    trust_remote_code=True            refused: minibge runs no code from a model folder, it loads
                                      BERT weights into its own model
    cache_dir                         where a Hub id is looked up and downloaded (<cache_dir>/<name>);
                                      by default minibge's weights folder (minibge.hub)
    query_max_length / passage_max_length
                                      the truncation length of encode_queries / of encode and
                                      encode_corpus (a call's max_length= overrides it), capped
                                      only by the model's position embeddings: 512 tokens for
                                      all-MiniLM-L6-v2 too, whose folder says 256 to others
    batch_size, convert_to_numpy      per-call defaults, each overridable in the call
    devices                           one device: "cuda:0", "cpu", 0 or ["cuda:1"]; None picks
                                      CUDA (its first GPU) when available. FlagEmbedding spreads
                                      several GPUs (and None on a multi-GPU machine) over worker
                                      processes; minibge encodes on one device and refuses a list
                                      of several: run one FlagModel per GPU
    other keywords                    refused (FlagEmbedding stores them as attributes for its
                                      subclasses; none of those applies to a BERT model)

encode / encode_queries / encode_corpus take FlagEmbedding's (sentences, batch_size=None,
max_length=None, convert_to_numpy=None, **kwargs); encode also instruction= and instruction_format=.
Of the keywords, `device=` is honoured (the model moves there, as FlagEmbedding does); the others
FlagEmbedding hands to the Hugging Face tokenizer, which minibge does not use, so they are refused.

Where the outputs differ from FlagEmbedding's: arrays are always float32 (FlagEmbedding returns
float16 arrays when the model ran in fp16). Batching differs too, though not the vectors' order
(the input order either way): FlagEmbedding tokenizes the whole input and sorts it by token length,
longest first; minibge's default (fast) path sorts by token length too, but a window of
embedder.sort_window texts at a time (memory bounded by the window), and caps each batch at
embedder.max_tokens real tokens besides batch_size; the plain path (fast=False, or a model the
fast path cannot run) sorts by characters, as sentence-transformers does.

FlagAutoModel.from_finetuned(path, ...) picks the class by the folder's name, as FlagEmbedding's does;
minibge has one class, for BERT-based BGE models (FlagEmbedding's model_class "encoder-only-base"),
and says so for the others (BGE-M3, the decoder-only and ICL models).
"""
import logging
import os
from pathlib import Path

import torch

from .. import hub
from ..embedder import load_embedder
from ..tokenizer import check_texts


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


logger = logging.getLogger(__name__)

PASSAGE_KEYWORDS = ("passage_instruction_for_retrieval", "passage_instruction_format")


def device_and_half_precision(devices, use_fp16: bool, use_bf16: bool) -> tuple[torch.device, str | None]:
    """The one device `devices` names (CUDA when available by default) and the dtype use_fp16 / use_bf16
    ask for. As FlagEmbedding: half precision is for accelerators; on the CPU it computes in float32
    (said quietly, at INFO). FlagModel and FlagReranker both decide it here."""
    device = torch.device(_single_device(devices) or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (use_bf16 or use_fp16):
        return device, None
    if device.type == "cpu":
        logger.info("use_fp16/use_bf16 on the CPU: computing in float32, as FlagEmbedding does")
        return device, None
    return device, "bfloat16" if use_bf16 else "float16"


def _check_format(instruction_format, name: str) -> str:
    """FlagEmbedding's instruction template: a str with two {} (instruction, text); "\\n" means a newline."""
    if not isinstance(instruction_format, str):
        raise TypeError(f"{name} must be a str like '{{}}{{}}', got {type(instruction_format).__name__}")
    instruction_format = instruction_format.replace("\\n", "\n")
    try:
        instruction_format.format("", "")
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"{name} {instruction_format!r} must take two {{}} fields, instruction then text ({error})") \
            from None
    return instruction_format


def _model_folder(model_name_or_path, cache_dir) -> Path:
    """The local folder: a folder as given; a Hub id under cache_dir (downloaded there if missing) or minibge's weights."""
    path = Path(model_name_or_path).expanduser()
    if cache_dir is None or path.is_dir():
        return hub.resolve_model_path(model_name_or_path)
    hub.check_hub_id(str(model_name_or_path))
    folder = Path(cache_dir).expanduser() / str(model_name_or_path).split("/")[1]
    if (folder / "config.json").is_file():
        return folder
    return hub.download(str(model_name_or_path), dest=folder)


class FlagModel:
    """FlagEmbedding's FlagModel API over a minibge Embedder (the embedder is `.embedder`)."""

    def __init__(self, model_name_or_path, normalize_embeddings: bool = True, use_fp16: bool = True,
                 use_bf16: bool = False, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str = "{}{}", devices=None, pooling_method: str = "cls",
                 trust_remote_code: bool = False, cache_dir: str | None = None, batch_size: int = 256,
                 query_max_length: int = 512, passage_max_length: int = 512, convert_to_numpy: bool = True,
                 **kwargs):
        if trust_remote_code:
            raise ValueError("trust_remote_code=True: minibge runs no code from a model folder (it loads the BERT "
                             "weights into its own model); leave trust_remote_code=False")
        unknown = sorted(set(kwargs) - set(PASSAGE_KEYWORDS))
        if unknown:
            raise TypeError(f"FlagModel got unexpected keyword argument(s) {unknown}; minibge's FlagModel takes "
                            f"FlagEmbedding's parameters and {', '.join(PASSAGE_KEYWORDS)}")
        self.query_instruction_format = _check_format(query_instruction_format, "query_instruction_format")
        self.passage_instruction_for_retrieval = kwargs.get("passage_instruction_for_retrieval")
        self.passage_instruction_format = _check_format(kwargs.get("passage_instruction_format", "{}{}"),
                                                        "passage_instruction_format")
        device, dtype = device_and_half_precision(devices, use_fp16, use_bf16)
        folder = _model_folder(model_name_or_path, cache_dir)
        # "" rather than None: for the embedder None would mean "BGE's instruction by model name". FlagModel
        # joins its instruction itself (query_instruction_format, in encode); the embedder gets it too, so that
        # model.embedder.encode_queries agrees with model.encode_queries under the default "{}{}"
        self.embedder = load_embedder(folder, device=device, dtype=dtype, pooling=pooling_method,
                                      query_instruction=query_instruction_for_retrieval or "")
        # FlagEmbedding cuts each call at the max_length it asks for, whatever the folder's
        # sentence_bert_config.json says; the embedder caps that at its own limit, so I lift the
        # limit to what the model can take (its position embeddings)
        self.embedder.max_length = self.embedder.model.config.max_sequence_length
        self.model_name_or_path = model_name_or_path
        self.use_fp16, self.use_bf16 = use_fp16 and dtype == "float16", use_bf16 and dtype == "bfloat16"
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.normalize_embeddings = normalize_embeddings
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.convert_to_numpy = convert_to_numpy
        self.target_devices = [str(device)]

    def __repr__(self):
        return f"FlagModel({self.embedder!r}, query_instruction_for_retrieval={self.query_instruction_for_retrieval!r})"

    def encode_queries(self, queries, batch_size: int | None = None, max_length: int | None = None,
                       convert_to_numpy: bool | None = None, **kwargs):
        """Queries with the retrieval instruction (if one was given) → (N, D), or (D,) for one str."""
        # read at each call, so that setting model.query_instruction_for_retrieval later works as in FlagEmbedding
        return self.encode(queries, batch_size, self.query_max_length if max_length is None else max_length,
                           convert_to_numpy, instruction=self.query_instruction_for_retrieval,
                           instruction_format=self.query_instruction_format, **kwargs)

    def encode_corpus(self, corpus, batch_size: int | None = None, max_length: int | None = None,
                      convert_to_numpy: bool | None = None, **kwargs):
        """Passages (with passage_instruction_for_retrieval, if one was given: none by default) → (N, D), or (D,)."""
        return self.encode(corpus, batch_size, max_length, convert_to_numpy,
                           instruction=self.passage_instruction_for_retrieval,
                           instruction_format=self.passage_instruction_format, **kwargs)

    def encode(self, sentences, batch_size: int | None = None, max_length: int | None = None,
               convert_to_numpy: bool | None = None, instruction: str | None = None,
               instruction_format: str | None = None, **kwargs):
        """Texts, with `instruction` joined by `instruction_format` when given, cut at passage_max_length
        (or max_length) → (N, D), or (D,) for one str."""
        device = kwargs.pop("device", None)
        if kwargs:
            raise TypeError(f"FlagModel.encode got {sorted(kwargs)}: FlagEmbedding hands such keywords to the "
                            "Hugging Face tokenizer, which minibge does not use (it knows device=)")
        if device is not None and torch.device(device) != self.embedder.device:
            self.embedder.model.to(device)  # as FlagEmbedding's encode_single_device does
            self.target_devices = [str(torch.device(device))]
        if instruction is not None:
            template = _check_format("{}{}" if instruction_format is None else instruction_format, "instruction_format")
            if isinstance(sentences, str):
                sentences = template.format(instruction, sentences)
            else:
                check_texts(sentences)  # the embedder's own check, before the texts are rebuilt
                sentences = [template.format(instruction, sentence) for sentence in sentences]
        to_numpy = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        # FlagEmbedding without numpy returns one (N, D) tensor on the device, as convert_to_tensor does
        return self.embedder.encode(sentences, batch_size=self.batch_size if batch_size is None else batch_size,
                                    max_length=self.passage_max_length if max_length is None else max_length,
                                    normalize_embeddings=self.normalize_embeddings,
                                    convert_to_numpy=to_numpy, convert_to_tensor=not to_numpy)


# FlagEmbedding's names of the BERT-based BGE models (its model_class "encoder-only-base", CLS pooling)
BERT_BGE_MODELS = tuple(f"bge-{size}-{lang}{version}" for size in ("small", "base", "large")
                        for lang in ("en", "zh") for version in ("", "-v1.5"))
OTHER_BGE_MODELS = ("bge-m3", "bge-en-icl", "bge-multilingual-gemma2")  # not BERT: minibge cannot run them


class FlagAutoModel:
    """FlagEmbedding's FlagAutoModel: FlagAutoModel.from_finetuned(path, ...) → a FlagModel."""

    def __init__(self):
        raise EnvironmentError("FlagAutoModel is made with FlagAutoModel.from_finetuned(model_name_or_path)")

    @classmethod
    def from_finetuned(cls, model_name_or_path, model_class: str | None = None, normalize_embeddings: bool = True,
                       use_fp16: bool = True, use_bf16: bool = False,
                       query_instruction_for_retrieval: str | None = None, devices=None,
                       pooling_method: str | None = None, trust_remote_code: bool | None = None,
                       query_instruction_format: str | None = None, **kwargs) -> FlagModel:
        """As FlagEmbedding: the class from the folder's name (the parent's for a checkpoint-N folder),
        or model_class="encoder-only-base" for a fine-tune under another name; CLS pooling and "{}{}" by
        default. As there, no instruction unless query_instruction_for_retrieval is given."""
        name = os.path.basename(os.path.normpath(str(model_name_or_path)))
        if name.startswith("checkpoint-"):
            name = os.path.basename(os.path.dirname(os.path.normpath(str(model_name_or_path))))
        model_class = getattr(model_class, "value", model_class)  # FlagEmbedding's EmbedderModelClass works too
        if model_class is None:
            if name in OTHER_BGE_MODELS:
                raise ValueError(f"{name} is not a BERT model; minibge runs the BERT-based BGE models only")
            if name not in BERT_BGE_MODELS:
                raise ValueError(f"model name {name!r} is not a BGE model FlagAutoModel knows; for a BERT-based "
                                 "fine-tune pass model_class='encoder-only-base'")
        elif model_class != "encoder-only-base":
            raise ValueError(f"model_class {model_class!r}: minibge runs BERT-based BGE models only "
                             "(model_class='encoder-only-base')")
        return FlagModel(model_name_or_path, normalize_embeddings=normalize_embeddings, use_fp16=use_fp16,
                         use_bf16=use_bf16, query_instruction_for_retrieval=query_instruction_for_retrieval,
                         query_instruction_format="{}{}" if query_instruction_format is None
                         else query_instruction_format, devices=devices,
                         pooling_method="cls" if pooling_method is None else pooling_method,
                         trust_remote_code=bool(trust_remote_code), **kwargs)
