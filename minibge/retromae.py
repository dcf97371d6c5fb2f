"""RetroMAE: BGE's first training stage, masked auto-encoding *through the sentence embedding*.

RetroMAE (Xiao et al., arXiv 2205.12035) pre-trains an encoder so that its [CLS] vector holds the
whole sentence: a deliberately weak decoder must rebuild the text from that one vector plus a
heavily masked view of the text. BGE (arXiv 2309.07597) runs it before contrastive fine-tuning.

One training example, two masks drawn on the same tokens:

  1. Encoder, a plain masked LM at 30%. Whole words are masked (a word is a token plus the
     "##" pieces after it), then BERT's 80/10/10 rule: 80% [MASK], 10% a random token, 10% kept.

         tokens    [CLS] the  cell  ##s   divide [SEP]
         encoder   [CLS] the [MASK] [MASK] divide [SEP]        labels: "cell" "##s" (else -100)

  2. Decoder, 50%, and a different mask for every query row. For each example K = min(L, 128)
     whole-word masks are drawn; row i copies one of them at random and also hides position i,
     so no row can copy its own answer. Column 0 carries the sentence embedding h_X instead of
     [CLS]; it is never a candidate, so every other row always sees it. Padding is never visible.
     (■ may attend, ⬚ hidden; here L = 6 and each pooled mask hides round(6·0.5) = 3 tokens)

                          keys / values: the content stream h2
                          h_X  the  cell  ##s  divide [SEP] [PAD]
         queries  pos 0    ⬚    ■    ⬚    ⬚     ⬚     ■     ⬚     label -100
         (h1)     pos 1    ■    ⬚    ⬚    ⬚     ■     ■     ⬚     → "the"
                  pos 2    ■    ⬚    ⬚    ■     ⬚     ■     ⬚     → "cell"
                  pos 3    ■    ⬚    ⬚    ⬚     ■     ■     ⬚     → "##s"
                  pos 4    ■    ⬚    ■    ■     ⬚     ■     ⬚     → "divide"
                  pos 5    ■    ■    ⬚    ⬚     ⬚     ⬚     ⬚     label -100
                  pad      ⬚    ⬚    ⬚    ⬚     ⬚     ⬚     ⬚

The model ("enhanced decoding"):

    h_X = Encoder(masked ids)[:, :1]                      (B, 1, H)  the sentence embedding
    h2  = [h_X ; Embeddings(unmasked ids)[:, 1:]]         (B, L, H)  content stream: keys, values
    h1  = h_X + P[:L]                   original RetroMAE  (B, L, H)  query stream
        = Embeddings(inputs_embeds=h_X) BGE's script: LayerNorm(h_X + P + T_0), dropout
    out = EncoderLayer(h1, mask, key_value_states=h2)     ONE fresh post-LN layer; residual adds h1
    loss = MLM(Encoder) + CE(head(out), unmasked ids)     on every real token but [CLS] / [SEP]

The embeddings and the MLM head (its output matrix tied to the word embeddings) are shared by
encoder and decoder; only the decoder layer is new. The decoder sees nothing of the encoder's
token states, so its gradient reaches the encoder layers through h_X alone.

Where the two upstream codebases (staoxiao/RetroMAE and FlagEmbedding's pre-training script) differ,
and where I do:

    thing                    RetroMAE (staoxiao)      FlagEmbedding (BGE)      minibge
    query stream h1          h_X + P (raw rows)       through Embeddings       variant="bge" (default) | "retromae"
    decoder mask pool K      min(L, 256)              min(L, 128)              decoder_mask_pool=128
    input                    pre-tokenized ids        jsonl {"text"}           texts (tokenized here)
    nothing to predict       loss NaN                 loss NaN                 loss 0 (an empty text is fine)
    padded query rows        see nothing              see nothing              see h_X (fused kernels may NaN)
    [UNK] / [MASK] in text   decoder may hide them    decoder may hide them    never masked by either mask
    head on                  every position           every position           labelled positions (same value)

The whole-word rule is that of transformers 4.x's DataCollatorForWholeWordMask, which both upstream
collators subclass (transformers 5 replaced it with per-token Bernoulli draws): count = max(1, round(L·p))
with L counting [CLS]/[SEP], words visited in random order, a word that would overshoot the count
skipped. Every random number comes from a torch.Generator, so a batch is a pure function of its seed
(what train/loop.py's exact resume needs).
"""
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from .common import atomic_folder
from .embedder import write_sentence_transformers_files
from .hub import resolve_model_path
from .model import BertModel, EncoderLayer, activation
from .tokenizer import Tokenizer
from .weights import KEY_MAP, copy_checked, load_model, read_state_dict, save_pretrained, write_safetensors

logger = logging.getLogger(__name__)

IGNORE = -100  # the label of a position that is not scored (PyTorch's cross_entropy ignore_index)
VARIANTS = ("bge", "retromae")
DECODER_NAME = "retromae_decoder.safetensors"  # the decoder layer, beside the official model.safetensors


# -----------------------------------------------------------------------------
# The collator: texts → encoder batch (30% masked) + decoder batch (per-row 50% attention masks)

class RetroMAECollator:
    """Called on a list of texts, returns a dict of tensors (B = texts, L = longest, in tokens):

        encoder_input_ids       (B, L)     masked ids              encoder_attention_mask (B, L) 0/1
        encoder_labels          (B, L)     original id at masked positions, -100 elsewhere
        decoder_input_ids       (B, L)     the unmasked ids
        decoder_attention_mask  (B, L, L)  bool, True = query row i may attend to position j
        decoder_labels          (B, L)     original ids; -100 at [CLS], [SEP] and padding
    """

    def __init__(self, tokenizer: Tokenizer, encoder_mlm_probability: float = 0.3,
                 decoder_mlm_probability: float = 0.5, max_length: int = 512,
                 generator: torch.Generator | None = None, decoder_mask_pool: int = 128):
        for name, p in (("encoder_mlm_probability", encoder_mlm_probability),
                        ("decoder_mlm_probability", decoder_mlm_probability)):
            if not 0 < p < 1:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {p!r}")
        if not isinstance(decoder_mask_pool, int) or decoder_mask_pool < 1:
            raise ValueError(f"decoder_mask_pool must be a positive int, got {decoder_mask_pool!r}")
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no [MASK] token, which masked-LM pre-training needs")
        self.tokenizer = tokenizer
        self.encoder_mlm_probability = encoder_mlm_probability
        self.decoder_mlm_probability = decoder_mlm_probability
        self.max_length = max_length  # checked by tokenizer.encode_batch on first use
        self.generator = generator
        self.decoder_mask_pool = decoder_mask_pool
        self.mask_token_id = tokenizer.mask_token_id
        self.special_tokens = set(tokenizer.specials.values())  # [CLS] [SEP] [PAD] [UNK] [MASK]

    def words(self, ids: list[int]) -> list[list[int]]:
        """Token positions grouped into whole words: a token, then the "##" pieces right after it.
        Special tokens belong to no word, so they can never be masked."""
        words = []
        for pos, token in enumerate(self.tokenizer.convert_ids_to_tokens(ids)):
            if token in self.special_tokens:
                continue
            if words and token.startswith("##") and words[-1][-1] == pos - 1:
                words[-1].append(pos)  # "##s" continues "cell"
            else:
                words.append([pos])
        return words

    def whole_word_masks(self, words: list[list[int]], n_tokens: int, probability: float, count: int,
                         generator) -> torch.Tensor:
        """(count, n_tokens) bool: `count` independent masks, each of random whole words covering about
        probability·n_tokens tokens (transformers' rule: walk the words in a random order, take each
        one that still fits the budget). All masks walk their own orders in lockstep, one word a step."""
        budget = max(1, round(n_tokens * probability))
        lengths = torch.tensor([len(word) for word in words], dtype=torch.long)  # (W,)
        order = torch.rand(count, len(words), generator=generator).argsort(dim=1)  # (count, W): a shuffle per mask
        taken = torch.zeros(count, len(words), dtype=torch.bool)
        covered = torch.zeros(count, dtype=torch.long)
        rows = torch.arange(count)
        for step in range(len(words)):
            word = order[:, step]  # (count,): each mask's next word
            fits = covered + lengths[word] <= budget  # a word is masked whole or not at all
            taken[rows, word] = fits
            covered += fits * lengths[word]
        word_of_token = torch.full((n_tokens,), len(words), dtype=torch.long)  # special tokens → a dummy word
        for w, positions in enumerate(words):
            word_of_token[positions] = w
        taken = torch.cat([taken, torch.zeros(count, 1, dtype=torch.bool)], dim=1)  # the dummy is never taken
        return taken[:, word_of_token]  # (count, n_tokens)

    def decoder_visibility(self, words: list[list[int]], n_tokens: int, generator) -> torch.Tensor:
        """(n, n) bool, True = row i may attend to position j: one pooled 50% mask per row, plus i itself."""
        pool = self.whole_word_masks(words, n_tokens, self.decoder_mlm_probability,
                                     min(n_tokens, self.decoder_mask_pool), generator)  # (K, n)
        hidden = pool[torch.randint(len(pool), (n_tokens,), generator=generator)]  # (n, n): row i's pick
        hidden.fill_diagonal_(True)  # no row sees its own token
        return ~hidden

    def __call__(self, texts: list[str], generator: torch.Generator | None = None) -> dict:
        """`generator` (train/loop.py passes one per batch) overrides the one given at construction."""
        generator = generator if generator is not None else self.generator
        if isinstance(texts, (list, tuple)) and not texts:
            raise ValueError("RetroMAECollator got an empty list of texts")
        ids_per_text = self.tokenizer.encode_batch(texts, self.max_length)  # [CLS] … [SEP], truncated
        input_ids, attention_mask = self.tokenizer.pad(ids_per_text)  # (B, L) long, right-padded
        B, L = input_ids.shape

        encoder_mask = torch.zeros(B, L, dtype=torch.bool)
        decoder_attention_mask = torch.zeros(B, L, L, dtype=torch.bool)  # padding rows and columns stay False
        decoder_labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        for b, ids in enumerate(ids_per_text):
            n, words = len(ids), self.words(ids)
            encoder_mask[b, :n] = self.whole_word_masks(words, n, self.encoder_mlm_probability, 1, generator)[0]
            decoder_attention_mask[b, :n, :n] = self.decoder_visibility(words, n, generator)
            decoder_labels[b, [0, n - 1]] = IGNORE  # [CLS] and [SEP] are not reconstructed

        # BERT's 80/10/10 on the chosen positions, from one uniform draw per token
        u = torch.rand(B, L, generator=generator)
        random_ids = torch.randint(self.tokenizer.vocab_size, (B, L), generator=generator)
        encoder_input_ids = input_ids.clone()
        encoder_input_ids[encoder_mask & (u < 0.8)] = self.mask_token_id
        replace = encoder_mask & (u >= 0.8) & (u < 0.9)
        encoder_input_ids[replace] = random_ids[replace]
        return {
            "encoder_input_ids": encoder_input_ids,
            "encoder_attention_mask": attention_mask,
            "encoder_labels": input_ids.masked_fill(~encoder_mask, IGNORE),
            "decoder_input_ids": input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "decoder_labels": decoder_labels,
        }


# -----------------------------------------------------------------------------
# The MLM head, under transformers' BertForMaskedLM names

class MLMHead(nn.Module):
    """Hidden states → vocabulary logits: dense → GELU → LayerNorm → decoder (· Eᵀ + b).

    The decoder is an nn.Linear whose weight *is* the word-embedding table E (BERT ties them, as
    transformers' BertLMPredictionHead does): no second copy of it. Being a plain nn.Linear, it is
    switched to oneDNN by train/'s switch like every other Linear; it is the biggest matmul of
    pre-training (V = 30,522 columns). `bias` is the decoder's bias, under its official name.
    """

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # on the meta device: placeholders that cost no memory and draw no random numbers, replaced at once
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, device="meta")
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = self.decoder.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden):
        """hidden (..., H) → logits (..., V)."""
        return self.decoder(self.norm(self.act(self.dense(hidden))))


HEAD_NAMES = {  # minibge name → official name (transformers BertForMaskedLM / BertForPreTraining)
    "dense.weight": "cls.predictions.transform.dense.weight",
    "dense.bias": "cls.predictions.transform.dense.bias",
    "norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "bias": "cls.predictions.bias",
}
# Not loaded: cls.predictions.decoder.weight, the tied word embeddings (BertForMaskedLM ties them on
# load too). DECODER_BIAS is read only when cls.predictions.bias is absent: the alias some files store.
DECODER_BIAS = "cls.predictions.decoder.bias"


def decoder_names(layer: EncoderLayer) -> dict:
    """{minibge name: file name} for the decoder layer: KEY_MAP's per-layer rows under FlagEmbedding's
    name for it, c_head (so "attention.query.weight" ↔ "c_head.attention.self.query.weight")."""
    rows = {ours.removeprefix("layers.{i}."): "c_head." + official.removeprefix("encoder.layer.{i}.")
            for official, ours in KEY_MAP.items() if "{i}" in official}
    names = {}
    for name in layer.state_dict():
        module, leaf = name.rsplit(".", 1)
        names[name] = f"{rows[module]}.{leaf}"
    return names


# -----------------------------------------------------------------------------
# The model

class RetroMAEForPretraining(nn.Module):
    """A minibge BertModel (the encoder), one decoder layer and the shared MLM head."""

    def __init__(self, encoder: BertModel, variant: str = "bge"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.encoder = encoder
        self.variant = variant
        self.decoder = EncoderLayer(encoder.config, encoder.attn_impl)  # the only decoder-specific weights
        self.head = MLMHead(encoder.config, encoder.embeddings.word_embeddings)
        self.decoder.apply(encoder._init_weights)  # HF init, as upstream applies lm._init_weights to c_head
        for module in (self.head.dense, self.head.norm):  # not the decoder: its weight is the loaded embeddings
            encoder._init_weights(module)

    @classmethod
    def from_pretrained(cls, path, variant: str = "bge", attn_impl: str = "sdpa") -> "RetroMAEForPretraining":
        """A checkpoint folder (or Hub id) → encoder + head + decoder. A BertForMaskedLM / BertForPreTraining
        checkpoint brings its MLM head; one of our outputs also brings its decoder; the rest starts fresh.
        Returned in eval mode, like load_model's encoder: call .train() to train (train/loop.py does)."""
        folder = resolve_model_path(path)
        model = cls(load_model(folder, attn_impl=attn_impl), variant)
        state = read_state_dict(folder)
        head = {official: state[official] for official in HEAD_NAMES.values() if official in state}
        if HEAD_NAMES["bias"] not in head and DECODER_BIAS in state:
            head[HEAD_NAMES["bias"]] = state[DECODER_BIAS]
        if head:
            copy_checked(model.head, head, f"MLM head in {folder}", HEAD_NAMES, what="an MLM head")
            logger.info("loaded the MLM head from %s", folder)
        else:
            logger.info("%s has no MLM head (cls.predictions.*); starting a fresh one", folder)
        if (folder / DECODER_NAME).is_file():
            names = decoder_names(model.decoder)
            stored = {name: tensor for name, tensor in load_file(folder / DECODER_NAME).items()
                      if name in names.values()}
            copy_checked(model.decoder, stored, str(folder / DECODER_NAME), names, what="the RetroMAE decoder layer")
            logger.info("loaded the RetroMAE decoder from %s", folder / DECODER_NAME)
        return model.eval()

    # ---- the forward pass, in the order of the module docstring

    def mlm_loss(self, hidden, labels):
        """Mean cross-entropy over the labelled positions; 0 (not NaN) when there are none.

        I run the head on the labelled positions only: the same value as scoring every position and
        ignoring -100, without a (B, L, V) logits tensor for the 70% the encoder does not predict."""
        scored = labels != IGNORE  # (B, L)
        logits = self.head(hidden[scored])  # (N, V)
        return F.cross_entropy(logits.float(), labels[scored], reduction="sum") / scored.sum().clamp(min=1)

    def query_stream(self, sentence_embedding, length: int):
        """h1 (B, L, H): the sentence embedding at every position, told which position it is."""
        B, _, H = sentence_embedding.shape
        if self.variant == "retromae":
            return sentence_embedding + self.encoder.embeddings.position_embeddings.weight[:length]  # (B, 1, H) + (L, H)
        # BGE: through the shared embedding module as inputs_embeds: + positions + token type 0, LayerNorm, dropout
        return self.encoder.embeddings(inputs_embeds=sentence_embedding.expand(B, length, H))

    def decoder_loss(self, sentence_embedding, decoder_input_ids, decoder_attention_mask, decoder_labels):
        """Rebuild the unmasked text from the sentence embedding (B, 1, H) through one layer."""
        L = decoder_input_ids.shape[1]
        tokens = self.encoder.embeddings(decoder_input_ids)  # (B, L, H): shared module, unmasked ids
        content = torch.cat([sentence_embedding, tokens[:, 1:]], dim=1)  # h2 (B, L, H): h_X replaces [CLS]
        visible = decoder_attention_mask.bool()  # (B, L, L)
        # A padded query row sees nothing; some fused kernels turn a fully masked row into NaN, which
        # would poison the gradient of h_X. I let it see h_X instead: its output is never scored.
        sees_nothing = ~visible.any(dim=-1, keepdim=True)  # (B, L, 1)
        visible = torch.cat([visible[..., :1] | sees_nothing, visible[..., 1:]], dim=-1)
        query = self.query_stream(sentence_embedding, L)
        if self.encoder.gradient_checkpointing and self.training and torch.is_grad_enabled():  # the encoder's flag
            out, _ = checkpoint(self.decoder, query, visible[:, None], key_value_states=content, use_reentrant=False)
        else:  # (B, L, H); the mask (B, 1, L, L) broadcasts over heads
            out, _ = self.decoder(query, visible[:, None], key_value_states=content)
        return self.mlm_loss(out, decoder_labels)

    def forward(self, encoder_input_ids, encoder_attention_mask, encoder_labels,
                decoder_input_ids, decoder_attention_mask, decoder_labels) -> dict:
        hidden = self.encoder(encoder_input_ids, encoder_attention_mask)  # (B, L, H)
        encoder_loss = self.mlm_loss(hidden, encoder_labels)
        decoder_loss = self.decoder_loss(hidden[:, :1], decoder_input_ids, decoder_attention_mask, decoder_labels)
        return {"loss": encoder_loss + decoder_loss, "encoder_loss": encoder_loss, "decoder_loss": decoder_loss}

    # ---- saving

    def save_pretrained(self, directory, tokenizer: Tokenizer | None = None, max_length: int = 512) -> Path:
        """An official-layout checkpoint with its MLM head, loadable by transformers' BertModel and
        BertForMaskedLM, by minibge.load_model and (given the tokenizer) by load_embedder:

            config.json, model.safetensors   the encoder (unprefixed BGE names) + cls.predictions.*
            tokenizer files, sentence-transformers files with CLS pooling (RetroMAE trains the CLS vector)
            retromae_decoder.safetensors     the decoder layer, so pre-training can continue from here
        """
        directory = Path(directory)
        # The head's five tensors go into the encoder's file, and config.json says it holds a masked-LM
        # head: "architectures" is what tools (the Hub's widgets, transformers' pipelines) read to pick
        # a class; AutoModel itself goes by model_type. (The tied decoder matrix is not stored:
        # transformers 5 does not store it either.)
        head = self.head.state_dict()
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(directory) as partial:  # built beside it, then moved in: never half a folder
            save_pretrained(self.encoder, partial, {official: head[ours] for ours, official in HEAD_NAMES.items()},
                            architectures=["BertForMaskedLM"])
            if tokenizer is not None:  # what Embedder.save_pretrained adds, with CLS pooling and no instruction
                tokenizer.save_pretrained(partial)
                write_sentence_transformers_files(partial, "cls",
                                                  min(max_length, self.encoder.config.max_position_embeddings),
                                                  self.encoder.config.hidden_size, None)
            decoder = self.decoder.state_dict()
            write_safetensors({official: decoder[ours].detach().cpu().contiguous()
                               for ours, official in decoder_names(self.decoder).items()}, partial / DECODER_NAME)
        return directory
