"""Column layout of a shard: the Arrow schema, the dtypes chosen from the vocabulary, and the format version.

Owned here so the writer, the reader, `verify` and docs/FORMAT.md agree on one definition. Imports no torch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FORMAT_NAME = "distill-logits"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
PROGRESS_DIR = "_progress"  # work-in-progress markers; removed once the manifest is written
SHARD_NAME_DIGITS = 5


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_NAME_DIGITS}d}"


def token_dtype(vocab_size: int) -> str:
    """Narrowest unsigned integer that holds every token id of the vocabulary."""
    if vocab_size <= 2**8:
        return "uint8"
    if vocab_size <= 2**16:
        return "uint16"
    return "uint32"


def window_schema(seq_len: int, top_k: int, token_type: str, logprob_type: str = "float16") -> pa.Schema:
    """One row per window of `seq_len` tokens.

    Per-position values are fixed-size lists so a reader gets (windows, seq_len[, k]) numpy views without copying, and
    `datasets.Dataset.from_file` shows them as nested sequences.
    """
    tok = pa.from_numpy_dtype(np.dtype(token_type))
    per_pos = lambda t: pa.list_(t, seq_len)  # noqa: E731
    fields = [
        pa.field("window_index", pa.int64()),  # global position of the window in the packed corpus
        pa.field("input_ids", per_pos(tok)),
        pa.field("labels", per_pos(tok)),  # next token at each position (meaningful where loss_mask == 1)
        pa.field("loss_mask", per_pos(pa.uint8())),  # 1 where a next token exists; 0 for padding and the corpus end
        pa.field("target_logprob", per_pos(pa.float32())),  # teacher log p(labels[t] | prefix)
    ]
    if top_k > 0:
        fields += [
            pa.field("topk_ids", per_pos(pa.list_(tok, top_k))),  # sorted by probability, highest first
            pa.field("topk_logprobs", per_pos(pa.list_(pa.from_numpy_dtype(np.dtype(logprob_type)), top_k))),
        ]
    return pa.schema(fields, metadata={b"format": FORMAT_NAME.encode(), b"format_version": str(FORMAT_VERSION).encode()})


def schema_description(schema: pa.Schema) -> dict[str, str]:
    """Column name -> Arrow type string, as recorded in the manifest and checked by `verify`."""
    return {f.name: str(f.type) for f in schema}
