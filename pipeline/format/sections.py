"""The manifest's sections as typed values: the shape of `manifest.json` in one screen (docs/FORMAT.md, "Manifest").

The writer builds them (`pipeline.precompute`, `format.writer`) and writes `Manifest.to_json()`; the reader checks the
raw JSON once (`format.manifest.check_manifest`) and parses it with `Manifest.from_json`. Defaults for keys an older
capture did not write and the derived rules (dtypes, which columns exist) live here and nowhere else. Field order is the
key order on disk. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import pyarrow as pa

from .bitpack import bits_for
from .schema import FORMAT_NAME, FORMAT_VERSION, token_dtype, window_schema

PACKING = "documents concatenated with EOS after each; windows of seq_len inputs, labels shifted by one; last window padded"
# Per-position fidelity figures averaged over valid positions, per shard and overall (docs/FORMAT.md), in totals order.
STATS = ("topk_mass", "recon_kl", "sample_unique", "sample_mass", "sample_rkl")


def _plain(value):
    """A section, a list or a dict of them as JSON values."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _to_json(section) -> dict:
    return {f.name: _plain(getattr(section, f.name)) for f in fields(section)}


def _known(cls, d: dict) -> dict:
    """The keys of `d` that are fields of `cls` (absent ones take the field's default)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def count_dtype(samples: int) -> str:
    """Sample counts (and `sample_n`) fit one byte up to 255 draws per position."""
    return "uint8" if samples <= 255 else "uint16"


def logprob_dtype(encoding: str, logprob_bits: int | None) -> str:
    return "float16" if encoding == "exact" else f"uint{logprob_bits}"


@dataclass(frozen=True, kw_only=True)
class FileMeta:
    sha256: str
    bytes: int

    to_json = _to_json

    @classmethod
    def from_json(cls, d: dict) -> "FileMeta":
        return cls(**_known(cls, d))


def _files(d: dict | None) -> dict[str, FileMeta] | None:
    return None if d is None else {rel: FileMeta.from_json(meta) for rel, meta in d.items()}


@dataclass(frozen=True, kw_only=True)
class HiddenLayer:
    index: int
    """Index into the teacher's hidden_states (0 = embeddings, i = after layer i)."""
    width: int
    dtype: str = "float16"

    to_json = _to_json

    @classmethod
    def from_json(cls, d: dict) -> "HiddenLayer":
        return cls(**_known(cls, d))


@dataclass(frozen=True, kw_only=True)
class Capture:
    """`capture`: everything a reader needs to decode the shards."""

    targets: tuple[str, ...]
    """Stored target kinds, among 'topk' and 'sampled' (may be empty: target log-probs only)."""
    top_k: int = 0
    encoding: str = "exact"
    compression: str = "none"
    token_dtype: str
    hidden_layers: tuple[HiddenLayer, ...] = ()
    batch_size: int | None = None
    shard_size: int | None = None
    world_size: int | None = None
    id_bits: int | None = None
    """Bits per packed token id (compact encoding)."""
    logprob_bits: int | None = None
    """Bits per quantized top-k log-prob (compact encoding with top-k)."""
    samples: int = 0
    """Draws per position (sampled targets)."""
    sample_temperature: float = 1.0
    seed: int | None = None
    count_bits: int | None = None
    """Bits per packed sample count minus one (compact encoding with sampled targets)."""
    topk_id_coding: str = "packed"
    """How the compact encoding stores top-k ids (format.idcode): "sorted_expgolomb" (what compact captures write:
    ascending per position, Exp-Golomb-coded gaps, log-probs in that order) or "packed" (`id_bits` each, rank order;
    compact datasets written before the key existed, and its meaning when absent)."""
    log_norm_temperatures: tuple[float, ...] = ()
    """Temperatures other than 1, ascending, whose teacher log-normalizer log sum_v p_v^(1/T) (full vocabulary) is
    stored per position in the column `log_norm`, in this order (top-k only; `precompute --temperatures`). Empty, and
    not written, when none was asked for (and in datasets written before it existed)."""
    positions: str = "all"
    """Where targets (and hidden states) are stored: "all" = at every position of every window (format version 1, and
    version 2 when every position is trained, but the end of the last window of a stream), "trained" = only at positions whose
    loss_mask is 1 (version 2; docs/FORMAT.md, "Targets only where trained"). Absent in older manifests: "all"."""

    @classmethod
    def build(cls, *, targets, top_k: int, encoding: str, logprob_bits: int, compression: str, vocab_size: int,
              hidden_layers: list[HiddenLayer], samples: int, sample_temperature: float, seed: int, batch_size: int,
              shard_size: int, world_size: int, log_norm_temperatures=(), positions: str = "all") -> "Capture":
        """The writer's capture: settings that do not apply to the stored kinds and encoding are left out."""
        topk, sampled, compact = "topk" in targets, "sampled" in targets, encoding == "compact"
        return cls(targets=tuple(targets), top_k=top_k if topk else 0, encoding=encoding, compression=compression,
                   token_dtype=token_dtype(vocab_size), hidden_layers=tuple(hidden_layers), batch_size=batch_size,
                   shard_size=shard_size, world_size=world_size, id_bits=bits_for(vocab_size - 1) if compact else None,
                   logprob_bits=logprob_bits if compact and topk else None, samples=samples if sampled else 0,
                   sample_temperature=sample_temperature if sampled else 1.0, seed=seed if sampled else None,
                   count_bits=bits_for(samples - 1) if compact and sampled else None,
                   log_norm_temperatures=tuple(float(t) for t in log_norm_temperatures) if topk else (),
                   positions=positions, topk_id_coding="sorted_expgolomb" if compact and topk else "packed")

    # --- derived: written for people, never stored independently
    @property
    def temperature(self) -> float:
        """Log-probs are stored at temperature 1 (format version 1); a trainer applies its own temperature."""
        return 1.0

    @property
    def logprob_dtype(self) -> str:
        return logprob_dtype(self.encoding, self.logprob_bits)

    @property
    def count_dtype(self) -> str:
        return count_dtype(self.samples)

    @property
    def stores_weights(self) -> bool:
        """Sample log-weights log p/q are stored when sampling at a temperature other than 1."""
        return sample_weights_stored(self.targets, self.sample_temperature)

    @property
    def trained_only(self) -> bool:
        """Targets and hidden states are stored only at trained positions (loss_mask 1)."""
        return self.positions == "trained"

    @property
    def hidden_indices(self) -> list[int]:
        return [x.index for x in self.hidden_layers]

    def hidden_width(self, index: int) -> int:
        return next(x.width for x in self.hidden_layers if x.index == index)

    def schema(self, seq_len: int, version: int | None = None) -> pa.Schema:
        """The Arrow schema of every shard of this capture (in format `version`)."""
        return window_schema(seq_len, self.token_dtype, self.targets, self.top_k, self.encoding, self.count_dtype,
                             self.stores_weights, version, log_norms=len(self.log_norm_temperatures),
                             positions=self.positions)

    def to_json(self) -> dict:
        d = {"targets": list(self.targets), "top_k": self.top_k, "temperature": self.temperature, "encoding": self.encoding,
             "compression": self.compression, "token_dtype": self.token_dtype,
             "hidden_layers": [x.to_json() for x in self.hidden_layers], "batch_size": self.batch_size,
             "shard_size": self.shard_size, "world_size": self.world_size}
        if self.trained_only:  # absent: "all" (what every older manifest means)
            d["positions"] = self.positions
        topk, sampled, compact = "topk" in self.targets, "sampled" in self.targets, self.encoding == "compact"
        if topk:
            d["logprob_dtype"] = self.logprob_dtype
            if self.log_norm_temperatures:
                d["log_norm_temperatures"] = list(self.log_norm_temperatures)
        if compact:
            d["id_bits"] = self.id_bits
            if topk:
                d["logprob_bits"] = self.logprob_bits
                if self.topk_id_coding != "packed":  # absent: "packed" (what every older compact manifest means)
                    d["topk_id_coding"] = self.topk_id_coding
        if sampled:
            d |= {"samples": self.samples, "sample_temperature": self.sample_temperature, "seed": self.seed,
                  "count_dtype": self.count_dtype}
            if compact:
                d["count_bits"] = self.count_bits
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Capture":
        known = _known(cls, d)
        known["targets"] = tuple(d.get("targets", ()))
        known["hidden_layers"] = tuple(HiddenLayer.from_json(x) for x in d.get("hidden_layers", []))
        known["log_norm_temperatures"] = tuple(float(t) for t in d.get("log_norm_temperatures", ()))
        return cls(**known)


def sample_weights_stored(targets, sample_temperature) -> bool:
    """The rule, in one place: sampled targets drawn at a temperature other than 1 store log p/q per sample."""
    return "sampled" in targets and sample_temperature != 1.0


@dataclass(frozen=True, kw_only=True)
class Teacher:
    """`teacher`: what produced the targets (a record, not a model)."""

    name_or_path: str | None = None
    revision: str | None = None
    model_type: str | None = None
    architectures: list[str] | None = None
    config_sha256: str | None = None
    dtype: str | None = None
    vocab_size: int
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    parameters: int | None = None

    to_json = _to_json

    @classmethod
    def from_json(cls, d: dict) -> "Teacher":
        return cls(**_known(cls, d))


@dataclass(frozen=True, kw_only=True)
class Tokenizer:
    """`tokenizer`: the teacher's tokenizer, stored in the dataset's `tokenizer/` folder (`files`: name -> checksum)."""

    class_name: str | None = None
    """Stored under the key `class`."""
    vocab_size: int | None = None
    sha256: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    path: str = "tokenizer"
    files: dict[str, FileMeta] | None = None
    """None in a hand-made dataset: the tokenizer files are then not checked (`verify` refuses it)."""

    def to_json(self) -> dict:
        d = _to_json(self)
        d = {"class": d.pop("class_name")} | d
        if self.files is None:  # what the writer knows before the tokenizer is saved
            del d["path"], d["files"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Tokenizer":
        known = _known(cls, d) | {"files": _files(d.get("files"))}
        return cls(class_name=d.get("class"), **known)


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """`corpus`: where the tokens came from and how they were cut into windows."""

    files: list[str] = field(default_factory=list)
    """The first 1000 data files."""
    file_count: int | None = None
    fingerprint: str | None = None
    text_column: str | None = None
    seq_len: int
    packing: str = PACKING
    documents: int | None = None
    skipped_files: int | None = None
    corpus_tokens: int | None = None
    """Tokens in the packed corpus (the predicted ones are one fewer)."""
    max_tokens: int | None = None
    layout: str | None = None
    """How examples became windows (format 2): stream (one continuous stream, examples attend to those before them,
    as in format 1), packed (position ids restart at each example) or unpacked (one example per window, padded)."""
    formats: dict | None = None
    """Examples read per input format (text, chat, prompt-completion)."""
    train_on: str | None = None
    """--train-on as given (None: each format's default)."""
    examples: int | None = None
    trained_tokens: int | None = None
    """Positions with loss_mask 1 over the whole dataset (equals totals.valid_tokens)."""
    long_examples: str | None = None
    packing_stats: dict | None = None
    """Counts of the packing: examples, windows, positions, trained, padding, split, truncated, dropped_positions, empty."""

    to_json = _to_json

    @classmethod
    def from_json(cls, d: dict) -> "Corpus":
        return cls(**_known(cls, d))


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """One entry of `shards`: a shard's name, its window count, and every file of it with checksum and size."""

    name: str
    windows: int
    tokens: int | None = None
    valid_tokens: int | None = None
    bytes: int | None = None
    files: dict[str, FileMeta]
    stats: dict[str, float | None] = field(default_factory=dict)
    """Per-shard means over valid positions of the fidelity figures (STATS)."""

    to_json = _to_json

    @classmethod
    def from_json(cls, d: dict) -> "ShardRecord":
        return cls(**(_known(cls, d) | {"files": _files(d["files"]), "stats": dict(d.get("stats", {}))}))


@dataclass(frozen=True, kw_only=True)
class Totals:
    """`totals`: sums over the shard records, and the valid-token-weighted means of their stats (`<stat>_mean`)."""

    shards: int
    windows: int
    tokens: int | None = None
    valid_tokens: int | None = None
    bytes: int | None = None
    bytes_per_token: float | None = None
    means: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[ShardRecord]) -> "Totals":
        valid = sum(r.valid_tokens for r in records)
        size = sum(r.bytes for r in records)

        def mean(stat):
            vals = [(r.stats.get(stat), r.valid_tokens) for r in records if r.stats.get(stat) is not None]
            n = sum(w for _, w in vals)
            return sum(v * w for v, w in vals) / n if n else None

        return cls(shards=len(records), windows=sum(r.windows for r in records), tokens=sum(r.tokens for r in records),
                   valid_tokens=valid, bytes=size, bytes_per_token=size / valid if valid else None,
                   means={stat: mean(stat) for stat in STATS if any(stat in r.stats for r in records)})

    def to_json(self) -> dict:
        d = _to_json(self)
        return d | {f"{stat}_mean": value for stat, value in d.pop("means").items()}

    @classmethod
    def from_json(cls, d: dict) -> "Totals":
        means = {k[: -len("_mean")]: v for k, v in d.items() if k.endswith("_mean")}
        return cls(**_known(cls, d), means=means)


@dataclass(frozen=True, kw_only=True)
class Session:
    """One process run that captured shards (a resumed capture has several). Timing figures are for people."""

    rank: int
    world_size: int
    shards: int
    tokens: int
    seconds: float
    tokens_per_second: float | None
    device: str

    to_json = _to_json


@dataclass(frozen=True, kw_only=True)
class CreatedBy:
    tool: str | None = None
    version: str | None = None
    command: list[str] | None = None
    sessions: list[dict] = field(default_factory=list)

    to_json = _to_json

    @classmethod
    def from_json(cls, d: dict) -> "CreatedBy":
        return cls(**_known(cls, d))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """`manifest.json`, written last: a reader trusts only what it lists."""

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: CreatedBy = field(default_factory=CreatedBy)
    teacher: Teacher
    tokenizer: Tokenizer
    corpus: Corpus
    capture: Capture
    settings: dict | None = None
    """The settings a resumed capture must match (copies of fields above, plus the teacher's identity)."""
    schema: dict[str, str]
    """Column name -> Arrow type string of every shard (derived from `capture` and `corpus.seq_len`)."""
    shards: list[ShardRecord]
    totals: Totals

    def to_json(self) -> dict:
        d = _to_json(self)
        if self.settings is None:
            del d["settings"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        """Parse a manifest that `check_manifest` accepted."""
        return cls(format=d["format"], format_version=d["format_version"],
                   created_by=CreatedBy.from_json(d.get("created_by", {})), teacher=Teacher.from_json(d["teacher"]),
                   tokenizer=Tokenizer.from_json(d["tokenizer"]), corpus=Corpus.from_json(d["corpus"]),
                   capture=Capture.from_json(d["capture"]), settings=d.get("settings"), schema=d["schema"],
                   shards=[ShardRecord.from_json(r) for r in d["shards"]], totals=Totals.from_json(d["totals"]))

    @property
    def seq_len(self) -> int:
        return self.corpus.seq_len


