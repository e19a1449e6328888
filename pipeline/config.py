"""PrecomputeConfig: every setting of `distill precompute`, shared by the CLI and the Python API. Imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .common.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")
TARGETS = ("topk", "sampled", "both")
ENCODINGS = ("exact", "compact")


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
    targets: str = "topk"
    """What to store per position: topk (exact head + tail mass), sampled (unique ids and counts of N draws: an
    unbiased estimate of the whole distribution), or both."""
    samples: int = 32
    """Draws per position for sampled targets (N)."""
    sample_temperature: float = 1.0
    """Temperature the draws are made at; other than 1, importance weights log(p/q) are stored to stay unbiased."""
    seed: int = 0
    """Seed of the sampling; each batch's generator is seeded from it and the batch's first window."""
    encoding: str = "exact"
    """exact: ids and float16 log-probs; compact: ids bit-packed in ceil(log2 vocab) bits, log-probs quantized."""
    logprob_bits: int = 7
    """Bits per quantized top-k log-prob in the compact encoding."""
    compression: str = "none"
    """Arrow buffer compression of the shard files: none (memory-mappable, zero-copy) or zstd."""
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
    storage_options: str | None = None
    """JSON object of extra fsspec filesystem arguments for a URL --out (e.g. '{"profile": "team"}'); credentials
    otherwise come from the standard places (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL). Never recorded."""
    stage_dir: str | None = None
    """Local folder where the shards of a URL --out are written before upload, one sub-folder per rank (default
    $XDG_CACHE_HOME/distill/stage); each is removed once the dataset is complete in the bucket."""
    progress: bool = True
    """Show progress bars."""
    command: list[str] | None = None
    """Command line recorded in the manifest (set by the CLI)."""

    @property
    def target_kinds(self) -> list[str]:
        return ["topk", "sampled"] if self.targets == "both" else [self.targets]

    def resolve(self) -> "PrecomputeConfig":
        """Fill rank/world size from torchrun's environment and check every value; raise one UserError listing all problems."""
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        problems = []
        if not self.data:
            problems.append("no --data given; pass at least one corpus file or folder")
        if "topk" in self.target_kinds and self.top_k < 1:
            problems.append(f"--top-k is {self.top_k}; expected 1 or more")
        for name in ("seq_len", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive integer")
        if self.max_tokens is not None and self.max_tokens < 2:
            problems.append(f"--max-tokens is {self.max_tokens}; expected at least 2")
        if self.targets not in TARGETS:
            problems.append(f"--targets is {self.targets!r}; expected one of {', '.join(TARGETS)}")
        if self.encoding not in ENCODINGS:
            problems.append(f"--encoding is {self.encoding!r}; expected one of {', '.join(ENCODINGS)}")
        if self.compression not in ("none", "zstd"):
            problems.append(f"--compression is {self.compression!r}; expected none or zstd")
        if not 1 <= self.samples <= 65535:
            problems.append(f"--samples is {self.samples}; expected 1 to 65535")
        if not self.sample_temperature > 0:
            problems.append(f"--sample-temperature is {self.sample_temperature}; expected a positive number")
        if not 2 <= self.logprob_bits <= 16:
            problems.append(f"--logprob-bits is {self.logprob_bits}; expected 2 to 16")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype is {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            problems.append(f"--rank {self.rank} --world-size {self.world_size}: expected 0 <= rank < world size")
        from .format.remote import looks_like_url, parse_storage_options

        if self.storage_options:
            parse_storage_options(self.storage_options)  # refused here, before the teacher loads
        if self.stage_dir is not None and looks_like_url(self.stage_dir):
            problems.append(f"--stage-dir {self.stage_dir} is a URL; it is the local folder shards are written to "
                            "before upload: pass a local path")
        if problems:
            raise UserError("; ".join(problems))
        return self
