"""The dataset format: the only contract between stage one, stage two and outside readers (see docs/FORMAT.md).

Imports no torch, so `distill inspect`/`verify` and other teams' readers stay light.
"""

from .files import sha256_file
from .reader import Dataset, Shard, open_dataset
from .schema import FORMAT_NAME, FORMAT_VERSION, MANIFEST, PROGRESS_DIR, SHARDS_DIR, shard_name, token_dtype, window_schema
from .verify import verify_dataset, verify_shard
from .writer import ShardWriter

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "PROGRESS_DIR", "SHARDS_DIR", "Dataset", "Shard", "ShardWriter",
    "open_dataset", "sha256_file", "shard_name", "token_dtype", "verify_dataset", "verify_shard", "window_schema",
]
