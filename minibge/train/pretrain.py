"""RetroMAE pre-training on raw text: `minibge pretrain`, on the shared training loop (loop.py).

    texts ──RetroMAECollator──▶ encoder batch (30% masked) + decoder batch ((B, L, L) masks)
          ──RetroMAEForPretraining──▶ {"loss", "encoder_loss", "decoder_loss"} ──▶ loop.py

The corpus is read by mine.read_corpus, the reader hard-negative mining uses for its pool: jsonl
lines {"text": ...} (a BEIR "title" is put in front), or any other file as one text per line;
.gz is fine, blank lines are skipped, repeated texts kept once, and an empty corpus is an error.

Everything the loop needs for an exact resume is in place: the collator draws its masks from the
per-batch generator loop.Batches hands it, and the decoder layer and MLM head are ordinary
parameters of the model, so they are checkpointed with the encoder and its optimizer state.
The output folder (and every checkpoint-N/) holds RetroMAEForPretraining.save_pretrained's
files: the encoder with its MLM head in the official layout, the tokenizer, sentence-transformers
files declaring CLS pooling, and the decoder layer, so `minibge finetune -m <out>` starts from it
and `minibge pretrain -m <out>` continues pre-training with the same decoder.
"""
import logging
from pathlib import Path

import torch

from ..hub import resolve_model_path
from .mine import read_corpus
from ..retromae import RetroMAECollator, RetroMAEForPretraining
from ..tokenizer import Tokenizer
from ..common import file_fingerprint, setup_distributed
from .loop import DATA_KEY, Batches, TrainConfig, train

logger = logging.getLogger(__name__)


def pretrain(model, train_file, output_dir, config: TrainConfig, max_length: int = 512,
             encoder_mlm_probability: float = 0.3, decoder_mlm_probability: float = 0.5, variant: str = "bge",
             resume: bool = False) -> dict:
    """Pre-train `model` (a folder or Hub id) with RetroMAE on the texts of `train_file`.

    variant: "bge" (FlagEmbedding's query stream, through the embeddings' LayerNorm) or "retromae"
    (the original paper's, raw position rows). Returns the last logged training metrics.
    """
    texts = read_corpus(train_file)  # a bad or empty file fails before the model loads
    device = setup_distributed()
    folder = resolve_model_path(model)
    tokenizer = Tokenizer.from_pretrained(folder)
    torch.manual_seed(config.seed)  # a fresh head and decoder come from the global RNG: same seed, same start
    retromae = RetroMAEForPretraining.from_pretrained(folder, variant=variant).to(device)
    max_length = min(max_length, retromae.encoder.config.max_position_embeddings)  # as the Embedder clamps
    collate = RetroMAECollator(tokenizer, encoder_mlm_probability, decoder_mlm_probability, max_length)
    batches = Batches(texts, collate, config.batch_size, seed=config.seed)
    run_info = {"model": str(model), "train_file": str(Path(train_file).resolve()),
                DATA_KEY: file_fingerprint(train_file), "config": vars(config),
                "max_length": max_length, "encoder_mlm_probability": encoder_mlm_probability,
                "decoder_mlm_probability": decoder_mlm_probability, "variant": variant}
    logger.info("RetroMAE pre-training of %s on %d texts: masks %.2f / %.2f, max length %d, %s query stream",
                model, len(texts), encoder_mlm_probability, decoder_mlm_probability, max_length, variant)

    def loss_fn(batch: dict) -> dict:
        return retromae(**batch)

    def save_fn(directory: Path) -> None:
        retromae.save_pretrained(directory, tokenizer, max_length)

    return train(retromae, loss_fn, batches, config, output_dir, save_fn=save_fn, resume=resume, run_info=run_info)
