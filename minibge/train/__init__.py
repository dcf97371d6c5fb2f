"""Training: the one loop (loop.py) and what runs on it, contrastive fine-tuning (finetune.py, with
hard negatives mined by mine.py) and RetroMAE pre-training (pretrain.py).

    from minibge.train import Batches, TrainConfig, train
"""
from .loop import (CHECKPOINT_PREFIX, LOG_FILE, PRECISIONS, RUN_FILE, STATE_FILE, Batches, TrainConfig,
                   average_gradients, broadcast_parameters, build_optimizer, checkpoints, enable_gradient_checkpointing,
                   is_main_process, linear_schedule, load_checkpoint, move_to, prepare_output_dir, rank_and_world,
                   save_checkpoint, setup_distributed, train)

__all__ = ["CHECKPOINT_PREFIX", "LOG_FILE", "PRECISIONS", "RUN_FILE", "STATE_FILE", "Batches", "TrainConfig",
           "average_gradients", "broadcast_parameters", "build_optimizer", "checkpoints",
           "enable_gradient_checkpointing", "is_main_process", "linear_schedule", "load_checkpoint",
           "move_to", "prepare_output_dir", "rank_and_world", "save_checkpoint", "setup_distributed", "train"]
