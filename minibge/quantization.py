"""Quantized embeddings: float32 vectors stored in 8 bits or 1 bit per dimension.

    q = quantize_embeddings(vectors, "int8", calibration_embeddings=sample)   # (N, D) int8
    b = quantize_embeddings(vectors, "ubinary")                               # (N, D/8) uint8

The values are sentence-transformers' `quantize_embeddings` for the same input, bit for bit, so an
index built with either library reads with the other. The exact choices:

    float32   the input as float32, nothing else
    int8 / uint8  scalar quantization, per dimension d, with 256 buckets over [start_d, end_d]:
              step_d = (end_d - start_d) / 255 (1 where end_d == start_d, so a constant dimension
              does not divide by zero), bucket = clip(floor((x - start_d) / step_d), 0, 255);
              uint8 stores the bucket, int8 stores bucket - 128.
              The ranges (2, D) are [per-dimension min; per-dimension max] of, in this order of
              preference: `ranges` as given, `calibration_embeddings`, the embeddings themselves.
              The ranges are rounded to float32 before use, and the arithmetic runs in the
              embeddings' own dtype (float32 for float32 input) — the two places where a
              re-implementation that computes in float64 gets a different bucket at the edges.
              Ranges from a single embedding are refused (min == max: every value is one bucket).
    binary / ubinary  one bit per dimension, set where x > 0 (0.0 and -0.0 give 0), packed 8 to a
              byte with the first dimension in the high bit (numpy's packbits, big-endian bit order),
              the last byte padded with zero bits; ubinary stores the byte, binary stores byte - 128.

Input: an (N, D) or (D,) numpy array or torch tensor (bfloat16 goes through float32), or a list of
vectors (stacked into one array). A list of (n_i, D) matrices, e.g. one per text of
output_value="token_embeddings", comes back as a list, every matrix quantized with the same
ranges (calibrated once on all of them together, unless ranges/calibration are given).
Integer input is refused: it is already quantized.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def _to_numpy(embeddings) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach()
        if embeddings.dtype == torch.bfloat16:  # numpy has no bfloat16
            embeddings = embeddings.float()
        return embeddings.cpu().numpy()
    return np.asarray(embeddings)


def quantization_ranges(calibration) -> np.ndarray:
    """(2, D): each dimension's minimum and maximum over the calibration rows, in their own dtype."""
    calibration = _to_numpy(calibration)
    return np.vstack((calibration.min(axis=0), calibration.max(axis=0)))


def quantize_embeddings(embeddings, precision: str = "float32", ranges: np.ndarray | None = None,
                        calibration_embeddings=None):
    """Embeddings in `precision` (see the module docstring): numpy, or a list of numpy for a list of matrices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if calibration_embeddings is not None:
        calibration_embeddings = _to_numpy(calibration_embeddings)
    if isinstance(embeddings, (list, tuple)):
        if not embeddings:
            return []
        items = [_to_numpy(item) for item in embeddings]
        if items[0].ndim == 2:  # multi-vector: one matrix per text, one set of ranges for all
            if precision.endswith("int8") and ranges is None:
                calibration = np.concatenate(items) if calibration_embeddings is None else calibration_embeddings
                if len(calibration):
                    ranges = _ranges(calibration, precision, calibration_embeddings)
            return [quantize_embeddings(item, precision, ranges, calibration_embeddings) for item in items]
        embeddings = np.array(items)
    embeddings = _to_numpy(embeddings)
    if embeddings.dtype.kind in "iub":
        raise TypeError(f"embeddings must be floats to quantize, got {embeddings.dtype}")

    if precision == "float32":
        return embeddings.astype(np.float32)

    if precision in ("int8", "uint8"):
        dim = embeddings.shape[-1]
        if embeddings.ndim == 2 and embeddings.shape[0] == 0:  # nothing to calibrate on
            return np.zeros((0, dim), dtype=np.dtype(precision))
        if ranges is None:
            ranges = _ranges(embeddings, precision, calibration_embeddings)
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        if ranges.shape != (2, dim):
            raise ValueError(f"ranges must have shape (2, {dim}) (min row, max row), got {ranges.shape}")
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)  # a constant dimension: every value in bucket 0
        with np.errstate(over="ignore"):  # a tiny step overflows to ±inf, which the clip makes bucket 255 / 0
            buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        if precision == "uint8":
            return buckets.astype(np.uint8)
        return (buckets - 128).astype(np.int8)

    # binary / ubinary: the sign bits, 8 dimensions to a byte, first dimension in the high bit
    packed = np.packbits(embeddings > 0, axis=-1)  # (..., ceil(D / 8)) uint8
    if precision == "ubinary":
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)


def _ranges(embeddings: np.ndarray, precision: str, calibration_embeddings) -> np.ndarray:
    """The calibration set's ranges if one is given (any number of rows, as the caller chose),
    else the embeddings' own, which must be more than one."""
    if calibration_embeddings is not None:
        return quantization_ranges(calibration_embeddings)
    if embeddings.ndim == 1 or embeddings.shape[0] == 1:
        raise ValueError(f"cannot compute {precision} ranges from a single embedding; "
                         "pass ranges= or calibration_embeddings= from a representative sample")
    if embeddings.shape[0] < 100:
        logger.warning("%s ranges from only %d embeddings; pass calibration_embeddings= from more "
                       "for stable buckets", precision, embeddings.shape[0])
    return quantization_ranges(embeddings)
