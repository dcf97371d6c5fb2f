"""Training: the one loop (loop.py) and what runs on it, contrastive fine-tuning (finetune.py, with
hard negatives mined by mine.py) and RetroMAE pre-training (pretrain.py).

    from minibge.train import Batches, TrainConfig, train

Gradient checkpointing is a flag of the model (`model.gradient_checkpointing = True`), which
TrainConfig(gradient_checkpointing=True) sets for the length of the loop. Gradient caching
(gradcache.py: a big contrastive batch's gradient with one chunk's memory) is
TrainConfig(cache_chunk_size=N), for losses split at the embeddings (gradcache.EmbeddingLoss).
"""
from ..common import is_main_process, rank_and_world, setup_distributed
from .loop import (CHECKPOINT_PREFIX, LOG_FILE, AUTOCAST_DTYPES, RUN_FILE, STATE_FILE, Batches, TrainConfig,
                   average_gradients, broadcast_parameters, build_optimizer, checkpoints, linear_schedule,
                   load_checkpoint, move_to, prepare_output_dir, save_checkpoint, train)

__all__ = ["CHECKPOINT_PREFIX", "LOG_FILE", "AUTOCAST_DTYPES", "RUN_FILE", "STATE_FILE", "Batches", "TrainConfig",
           "average_gradients", "broadcast_parameters", "build_optimizer", "checkpoints", "is_main_process",
           "linear_schedule", "load_checkpoint", "move_to", "prepare_output_dir", "rank_and_world",
           "save_checkpoint", "setup_distributed", "train"]
