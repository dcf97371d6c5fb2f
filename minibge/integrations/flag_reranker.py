"""FlagEmbedding's `FlagReranker`, with minibge underneath: change the import line, keep the code.

BGE's reranker model card shows this; with `from minibge import FlagReranker` it runs unchanged:

    reranker = FlagReranker("BAAI/bge-reranker-base", use_fp16=True)
    score = reranker.compute_score(["query", "passage"])                  # one float (the raw logit)
    scores = reranker.compute_score([["what is panda?", "hi"],
                                     ["what is panda?", "The giant panda is a bear species endemic to China."]])
    scores = reranker.compute_score(pairs, normalize=True)                # sigmoid(logit), in (0, 1)

FlagReranker is a set of defaults around one `Reranker` (reranker.py): each compute_score is one
`Reranker.score` call. The FlagReranker followed is FlagEmbedding 1.4's encoder-only reranker:

    use_fp16 / use_bf16           half-precision weights on a GPU; on a CPU one warning and float32
                                  (FlagEmbedding also runs float32 on a CPU). bf16 wins over fp16.
    query_instruction_for_rerank  prepended to each query by query_instruction_format ("{}{}":
    passage_instruction_...       plain concatenation); None = no instruction
    query_max_length=None         the query alone is cut to this many tokens; None = 3/4 of max_length
    max_length=512                the whole pair (specials included); only the passage is cut to fit
    normalize=False               sigmoid on the logits
    batch_size=128                pairs per forward pass, longest first
    devices                       one device ("cuda:0", "cpu", 0, ["cuda:1"]); None picks CUDA when
                                  available. FlagEmbedding spreads several GPUs over worker processes;
                                  minibge scores on one device

compute_score returns a float for one pair (a 2-element list or tuple of str), a list of floats for a
list of pairs, in input order. FlagEmbedding's other keyword arguments (trust_remote_code, cache_dir,
...) are accepted and ignored with a warning; minibge runs no code from a checkpoint.
"""
import logging

from ..embedder import resolve_dtype
from ..reranker import check_pairs, load_reranker
from .flag_model import device_and_half_precision

logger = logging.getLogger(__name__)


class FlagReranker:
    """FlagEmbedding's FlagReranker API over a minibge Reranker (the reranker is `.reranker`)."""

    def __init__(self, model_name_or_path, use_fp16: bool = False, use_bf16: bool = False,
                 query_instruction_for_rerank: str | None = None, query_instruction_format: str = "{}{}",
                 passage_instruction_for_rerank: str | None = None, passage_instruction_format: str = "{}{}",
                 devices=None, batch_size: int = 128, query_max_length: int | None = None, max_length: int = 512,
                 normalize: bool = False, **kwargs):
        if kwargs.get("trust_remote_code"):
            raise ValueError("trust_remote_code=True: minibge runs no code from a checkpoint")
        if kwargs:
            logger.warning("FlagReranker: ignoring %s (FlagEmbedding options minibge does not use)", sorted(kwargs))
        device, half = device_and_half_precision(devices, use_fp16, use_bf16)
        dtype = resolve_dtype(half, device)
        self.reranker = load_reranker(model_name_or_path, device=device, dtype=dtype)
        # FlagEmbedding cuts at the max_length asked for: lift the reranker's own cap to the model's positions
        self.reranker.max_length = self.reranker.model.config.max_sequence_length
        self.query_instruction_for_rerank = query_instruction_for_rerank
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_rerank = passage_instruction_for_rerank
        self.passage_instruction_format = passage_instruction_format
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.max_length = max_length
        self.normalize = normalize

    def __repr__(self):
        return f"FlagReranker({self.reranker!r}, normalize={self.normalize})"

    def _with_instructions(self, pairs: list) -> list:
        """FlagEmbedding's get_detailed_inputs: format(instruction, text) on each side that has one."""
        def side(text, instruction, template):
            return text if instruction is None else template.format(instruction, text)
        return [(side(q, self.query_instruction_for_rerank, self.query_instruction_format),
                 side(p, self.passage_instruction_for_rerank, self.passage_instruction_format)) for q, p in pairs]

    def compute_score(self, sentence_pairs, batch_size: int | None = None, max_length: int | None = None,
                      query_max_length: int | None = None, normalize: bool | None = None):
        """Scores of (query, passage) pairs: a float for one pair, a list of floats for a list of pairs."""
        single = isinstance(sentence_pairs, (list, tuple)) and len(sentence_pairs) == 2 \
            and all(isinstance(t, str) for t in sentence_pairs)
        pairs = check_pairs([sentence_pairs] if single else sentence_pairs)
        scores = self.reranker.score(
            self._with_instructions(pairs),
            batch_size=self.batch_size if batch_size is None else batch_size,
            max_length=self.max_length if max_length is None else max_length,
            query_max_length=self.query_max_length if query_max_length is None else query_max_length,
            normalize=self.normalize if normalize is None else normalize)
        return scores[0] if single else scores
