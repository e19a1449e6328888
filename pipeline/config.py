"""PrecomputeConfig: every setting of `distill precompute`, shared by the CLI and the Python API. Imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .common.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")
TARGETS = ("topk", "sampled", "both")
ENCODINGS = ("exact", "compact")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def parse_max_memory(text: str) -> dict:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'} (accelerate's max_memory)."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not size or not (key.isdigit() or key in ("cpu", "disk")):
            raise ValueError(f"--max-memory {text!r}: {part!r} is not DEVICE=SIZE; expected e.g. '0=70GiB,1=70GiB,cpu=200GiB'")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise ValueError(f"--max-memory {text!r} names no device; expected e.g. '0=70GiB,cpu=200GiB'")
    return out


@dataclass
class PrecomputeConfig:
    teacher: str
    """Teacher model: a local folder or a Hugging Face hub id (any causal LM)."""
    data: list[str]
    """Corpus: files (.txt, .jsonl/.json, .parquet, .arrow) or folders; other files in a folder are one document each."""
    out: str
    """Dataset folder or URL to write (s3://bucket/prefix or any fsspec URL: shards are staged locally, uploaded, the
    manifest last). Rerunning the same command on it resumes after the last complete shard."""
    text_column: str = "text"
    """Column holding the text in .jsonl/.json/.parquet/.arrow inputs."""
    format: str = "auto"
    """Input format, following TRL's conventions: auto (from the columns: 'messages' -> chat, 'prompt' and 'completion'
    -> prompt-completion, else --text-column -> text), text, chat or prompt-completion."""
    data_split: str = "train"
    """Split of a Hugging Face dataset --data (a hub id such as org/name, or a local dataset folder)."""
    data_config: str | None = None
    """Configuration (subset) of a Hugging Face dataset --data."""
    chat_template: str | None = None
    """Jinja file that sets or replaces the teacher tokenizer's chat template; the dataset's tokenizer keeps it, so the
    student carries it."""
    train_on: str | None = None
    """Positions the student learns from: assistant (every assistant turn and the end-of-turn token closing it),
    completion (the completion of prompt-completion rows; the last assistant turn of a conversation) or all.
    Default: assistant for chat, completion for prompt-completion, all for text."""
    packing: bool = True
    """Concatenate examples into windows with position ids restarting at each, so packed examples do not see each other
    (the teacher and the student get the position ids); --no-packing gives each example its own window(s), padded."""
    cross_document_attention: bool = False
    """Cut windows from one continuous stream in which examples attend to those before them (pretraining-style text,
    the windows of format version 1); position ids run 0..seq_len-1."""
    long_examples: str = "split"
    """Examples longer than --seq-len: split (pieces of --seq-len positions, each from position 0, nothing dropped) or
    truncate (keep the first --seq-len positions); both counted in the manifest."""
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
    """exact: ids and float16 log-probs; compact: top-k ids sorted and entropy-coded (sampled ids bit-packed in
    ceil(log2 vocab) bits), log-probs quantized."""
    logprob_bits: int = 7
    """Bits per quantized top-k log-prob in the compact encoding."""
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Temperatures at which `distill train --temperature T` can temper the stored top-k exactly, e.g. 1,2,4. For each
    T other than 1 the teacher's log-normalizer log sum_v p_v^(1/T) over the full vocabulary is stored per position
    (float32, 4 bytes per position per T, column `log_norm`); T = 1 needs nothing."""
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
    """Stop after N + 1 corpus tokens (None: the whole corpus; the example crossing the limit is cut): at most N
    predicted positions, since each position's label is the next token; exactly N in one stream
    (--cross-document-attention), where --max-tokens 4096 at --seq-len 256 gives 16 full windows."""
    rank: int | None = None
    """This process's rank; defaults to $RANK (torchrun) or 0. Shard i belongs to rank i % world_size."""
    world_size: int | None = None
    """Number of processes sharing the work; defaults to $WORLD_SIZE or 1."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the teacher."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the teacher's repository to run. Only for teachers you trust."""
    storage_options: str | None = None
    """JSON object of extra fsspec filesystem arguments for a URL --out (e.g. '{"profile": "team"}'); credentials
    otherwise come from the standard places (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL). Never recorded."""
    stage_dir: str | None = None
    """Local folder where the shards of a URL --out are written before upload, one sub-folder per rank (default
    $XDG_CACHE_HOME/distill/stage); each is removed once the dataset is complete in the bucket."""
    head_chunk: int = 512
    """Tokens per chunk of the capture head: the body runs to its final hidden states, then the output head, log-softmax,
    top-k, sampling and fidelity run this many tokens at a time, so no (batch, seq, vocab) float32 tensor exists. Same
    values as the whole batch; 0 = the whole-batch head. Heads of unknown structure use the whole batch (with a notice)."""
    attn_implementation: str | None = None
    """Teacher attention kernel passed to transformers: sdpa, eager, flash_attention_2 (when installed), ...; unset:
    transformers' default, which is sdpa wherever the architecture supports it (eager otherwise, e.g. Gemma 2)."""
    device_map: str | None = None
    """Place the teacher across this node's devices with accelerate (auto, balanced, balanced_low_0 or sequential), for a
    teacher larger than one device; one capture process per node. Layers that do not fit go to CPU when --max-memory allows."""
    max_memory: str | None = None
    """With --device-map: memory per device, e.g. '0=70GiB,1=70GiB,cpu=200GiB' (cpu = offload to host memory)."""
    tp: int = 1
    """Tensor parallel degree under torchrun: the teacher is split with transformers' tp_plan across groups of this
    many processes (ranks g*N..g*N+N-1, best within one node); each group is one data-parallel replica that takes the
    shards one rank took before, and its first rank reads the data and writes them (the others only compute)."""
    license: str | None = None
    """License id written into the dataset card (README.md front matter), e.g. apache-2.0 or cc-by-4.0."""
    progress: bool = True
    """Show progress bars."""
    command: list[str] | None = None
    """Command line recorded in the manifest (set by the CLI)."""

    def placement_problems(self) -> list[str]:
        """What is wrong with --head-chunk, --device-map, --max-memory, --tp and --attn-implementation."""
        problems = []
        if self.head_chunk < 0:
            problems.append(f"--head-chunk is {self.head_chunk}; expected 0 (whole batch) or a positive number of tokens")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            problems.append(f"--device-map is {self.device_map!r}; expected one of {', '.join(DEVICE_MAPS)}")
        if self.max_memory is not None:
            if self.device_map is None:
                problems.append("--max-memory needs --device-map (e.g. --device-map auto)")
            try:
                parse_max_memory(self.max_memory)
            except ValueError as e:
                problems.append(str(e))
        if self.tp < 1:
            problems.append(f"--tp is {self.tp}; expected 1 or more")
        elif self.tp > 1:
            if self.device_map is not None:
                problems.append("--tp and --device-map both place the teacher; pass one of them")
            if self.world_size % self.tp:
                problems.append(f"--tp {self.tp} does not divide the {self.world_size} processes; start a multiple of {self.tp} "
                                "with torchrun --nproc-per-node")
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            problems.append(f"--attn-implementation is {self.attn_implementation!r}; expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        return problems

    def load_options(self) -> dict:
        """Keyword arguments of `pipeline.teacher.load_teacher` for the placement settings."""
        return {"attn_implementation": self.attn_implementation, "device_map": self.device_map,
                "max_memory": parse_max_memory(self.max_memory) if self.max_memory else None,
                "tp_plan": "auto" if self.tp > 1 else None, "tp_size": self.tp if self.tp > 1 else None}

    @property
    def log_norm_temperatures(self) -> tuple[float, ...]:
        """The temperatures whose log-normalizer is stored: those of --temperatures other than 1, ascending."""
        return tuple(sorted({float(t) for t in self.temperatures if t != 1}))

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
        from .sources import FORMATS
        from .chat import TRAIN_ON
        from .packing import LONG

        if self.format not in FORMATS:
            problems.append(f"--format is {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.train_on is not None and self.train_on not in TRAIN_ON:
            problems.append(f"--train-on is {self.train_on!r}; expected one of {', '.join(TRAIN_ON)}")
        if self.long_examples not in LONG:
            problems.append(f"--long-examples is {self.long_examples!r}; expected one of {', '.join(LONG)}")
        if self.cross_document_attention and not self.packing:
            problems.append("--cross-document-attention and --no-packing contradict each other (one stream vs one "
                            "example per window); pass one of them")
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
        bad = [t for t in self.temperatures if not (isinstance(t, (int, float)) and 0 < t < float("inf"))]
        if bad:
            problems.append(f"--temperatures has {bad[0]!r}; expected positive numbers, e.g. --temperatures 1,2,4")
        elif self.log_norm_temperatures and "topk" not in self.target_kinds:
            problems.append(f"--temperatures {','.join(f'{t:g}' for t in self.temperatures)} stores log-normalizers for top-k "
                            "targets; pass --targets topk or both, or drop --temperatures")
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
        problems += self.placement_problems()
        if self.license is not None:
            from .card import check_license

            try:
                check_license(self.license)
            except UserError as e:
                problems.append(str(e))
        if problems:
            raise UserError("; ".join(problems))
        return self
