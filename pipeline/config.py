"""PrecomputeConfig: every setting of `distill precompute`, shared by the CLI and the Python API. Imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class PrecomputeConfig:
    teacher: str
    """Teacher model: a local folder or a Hugging Face hub id (any causal LM)."""
    data: list[str]
    """Corpus: files (.txt, .jsonl/.json, .parquet, .arrow) or folders; other files in a folder are one document each."""
    out: str
    """Dataset folder to write. Rerunning the same command on it resumes after the last complete shard."""
    text_column: str = "text"
    """Column holding the text in .jsonl/.json/.parquet/.arrow inputs."""
    top_k: int = 64
    """Number of highest-probability tokens stored per position, with their log-probs over the full vocabulary."""
    hidden_layers: list[int] = field(default_factory=list)
    """Indices into the teacher's hidden_states tuple to store per token (0 = embeddings, -1 = last layer)."""
    seq_len: int = 512
    """Tokens per window; documents are packed with EOS between them."""
    batch_size: int = 8
    """Windows per teacher forward pass."""
    shard_size: int = 256
    """Windows per shard file; also the unit of resume and of splitting work across ranks."""
    dtype: str = "auto"
    """Teacher weights dtype: auto (bfloat16 on CUDA with bf16 support, else float32), bfloat16, float16 or float32."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    max_tokens: int | None = None
    """Stop after this many corpus tokens (None: the whole corpus)."""
    rank: int | None = None
    """This process's rank; defaults to $RANK (torchrun) or 0. Shard i belongs to rank i % world_size."""
    world_size: int | None = None
    """Number of processes sharing the work; defaults to $WORLD_SIZE or 1."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the teacher's repository to run. Only for teachers you trust."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the teacher."""
    progress: bool = True
    """Show progress bars."""
    command: list[str] | None = None
    """Command line recorded in the manifest (set by the CLI)."""

    def resolve(self) -> "PrecomputeConfig":
        """Fill rank/world size from torchrun's environment and check every value; raise one UserError listing all problems."""
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        problems = []
        if not self.data:
            problems.append("no --data given; pass at least one corpus file or folder")
        if self.top_k < 1:
            problems.append(f"--top-k is {self.top_k}; expected 1 or more")
        for name in ("seq_len", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive integer")
        if self.max_tokens is not None and self.max_tokens < 2:
            problems.append(f"--max-tokens is {self.max_tokens}; expected at least 2")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype is {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            problems.append(f"--rank {self.rank} --world-size {self.world_size}: expected 0 <= rank < world size")
        if problems:
            raise UserError("; ".join(problems))
        return self
