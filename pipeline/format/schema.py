"""Column layout of a shard: the Arrow schema, the dtypes chosen from the vocabulary, and the format version.

Owned here so the writer, the reader, `verify` and docs/FORMAT.md agree on one definition. Imports no torch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FORMAT_NAME = "distill-logits"
FORMAT_VERSION = 2  # 2: position_ids (packed examples restart at 0), targets only where trained; version 1 still reads
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
PROGRESS_DIR = "_progress"  # work-in-progress markers; removed once the manifest is written
SHARD_NAME_DIGITS = 5
# Where targets are stored (`capture.positions`): "all" = at every position of a window (fixed-size [T] lists; version
# 1, and version 2 when every position is trained, but a stream's last window end), "trained" = only where loss_mask is 1
# (version 2): a window's row holds one entry per trained position, in position order (docs/FORMAT.md).
POSITIONS = ("all", "trained")
# The columns with one value per position that are targets: in "trained" datasets they hold trained positions only.
TARGET_COLUMNS = ("target_logprob", "topk_ids", "topk_logprobs", "topk_logprob_hi", "topk_logprob_lo", "log_norm", "sample_n")


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_NAME_DIGITS}d}"


def token_dtype(vocab_size: int) -> str:
    """Narrowest unsigned integer that holds every token id of the vocabulary."""
    if vocab_size <= 2**8:
        return "uint8"
    if vocab_size <= 2**16:
        return "uint16"
    return "uint32"


def position_dtype(seq_len: int) -> str:
    """`position_ids` are below seq_len: two bytes a position up to 65,536 positions a window (format 2)."""
    return "uint16" if seq_len <= 2**16 else "int32"


def window_schema(
    seq_len: int,
    token_type: str,
    targets: tuple[str, ...] = ("topk",),
    top_k: int = 0,
    encoding: str = "exact",
    count_type: str = "uint8",
    sample_weights: bool = False,
    version: int | None = None,
    log_norms: int = 0,
    positions: str = "all",
) -> pa.Schema:
    """One row per window of `seq_len` tokens; see docs/FORMAT.md for each column.

    Per-position values are fixed-size lists so a reader gets (windows, seq_len[, k]) numpy views without copying, and
    `datasets.Dataset.from_file` shows them as nested sequences. Sampled targets have a variable number of unique ids per
    position: `sample_n` gives the count per position and the ids/counts of all positions are concatenated in one list.
    The compact encoding replaces id and log-prob lists by bit-packed binary blobs, one per window.
    `version`: the format version whose columns to describe (1 has no `position_ids`). `log_norms`: temperatures whose
    tempered log-normalizer is stored (column `log_norm`, only with top-k; 0: no column). `positions`: "all" (a target
    column holds T entries per window) or "trained" (a variable-length list of one entry per trained position; version 2).
    """
    version = FORMAT_VERSION if version is None else version  # looked up now, so a test can write version 1
    id_type = pa.from_numpy_dtype(np.dtype(token_type))
    per_pos = lambda t: pa.list_(t, seq_len)
    fields = [
        pa.field("window_index", pa.int64()),  # global position of the window in the packed corpus
        pa.field("input_ids", per_pos(id_type)),
        pa.field("labels", per_pos(id_type)),  # next token at each position (meaningful where loss_mask == 1)
        pa.field("loss_mask", per_pos(pa.uint8())),  # 1 where the student learns the label; 0 for context and padding
    ]
    if version >= 2:  # restart at 0 at each packed example; version 1 datasets have none (0..T-1 for every window)
        fields.append(pa.field("position_ids", per_pos(pa.from_numpy_dtype(np.dtype(position_dtype(seq_len))))))
    if positions == "trained":  # targets: one entry per trained position (loss_mask 1), in position order
        per_pos = lambda t: pa.list_(t)
    fields += [
        pa.field("target_logprob", per_pos(pa.float32())),  # teacher log p(labels[t] | prefix)
    ]
    if "topk" in targets:
        if encoding == "exact":
            fields += [
                pa.field("topk_ids", per_pos(pa.list_(id_type, top_k))),  # sorted by probability, highest first
                pa.field("topk_logprobs", per_pos(pa.list_(pa.float16(), top_k))),
            ]
        else:
            fields += [
                pa.field("topk_ids_packed", pa.binary()),  # K ids per stored position (capture.topk_id_coding)
                pa.field("topk_logprobs_packed", pa.binary()),  # K quantized log-probs of logprob_bits each, the same order
                pa.field("topk_logprob_hi", per_pos(pa.float16())),  # log-prob of rank 1 (the quantization range)
                pa.field("topk_logprob_lo", per_pos(pa.float16())),  # log-prob of rank K
            ]
        if log_norms:  # log sum_v p_v^(1/T) per temperature of capture.log_norm_temperatures (optional, any version)
            fields.append(pa.field("log_norm", per_pos(pa.list_(pa.float32(), log_norms))))
    if "sampled" in targets:
        cnt = pa.from_numpy_dtype(np.dtype(count_type))
        fields.append(pa.field("sample_n", per_pos(cnt)))  # unique ids drawn at each position
        if encoding == "exact":
            fields += [pa.field("sample_ids", pa.list_(id_type)), pa.field("sample_counts", pa.list_(cnt))]
        else:
            fields += [pa.field("sample_ids_packed", pa.binary()), pa.field("sample_counts_packed", pa.binary())]
        if sample_weights:
            fields.append(pa.field("sample_logweights", pa.list_(pa.float16())))  # log p/q, only when sampling at T != 1
    return pa.schema(fields, metadata={b"format": FORMAT_NAME.encode(), b"format_version": str(version).encode()})


def schema_description(schema: pa.Schema) -> dict[str, str]:
    """Column name -> Arrow type string, as recorded in the manifest and checked by `verify`."""
    return {f.name: str(f.type) for f in schema}
