"""Check a parsed manifest.json before anything else is read: types, ranges, and every field against what it can be
derived from (the capture section gives the schema and the dtypes, the shard records give the totals, the file sizes
bound the window counts). Cheap (no shard file is opened), so every `open_dataset` runs it. Imports no torch.

A manifest may come from someone else: a wrong type or an absurd number must become one clear line, never a traceback
or an allocation sized by the manifest.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ..common.errors import FormatError
from .bitpack import bits_for
from .files import safe_relpath
from .idcode import CODINGS as ID_CODINGS
from .schema import FORMAT_NAME, FORMAT_VERSION, POSITIONS, schema_description, shard_name, token_dtype
from .sections import Capture, Manifest, count_dtype, logprob_dtype

TARGET_KINDS = ("topk", "sampled")
ENCODINGS = ("exact", "compact")
COMPRESSIONS = ("none", "zstd")
HIDDEN_DTYPES = ("float16",)
MAX_SEQ_LEN = 1 << 20
MAX_VOCAB = 1 << 32
MAX_SAMPLES = (1 << 16) - 1
MAX_WINDOWS = 1 << 40
MAX_BYTES = 1 << 50
# A zstd Arrow shard may be smaller than its raw columns; no real shard compresses this much, a crafted count does.
MAX_ZSTD_RATIO = 1000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# settings key -> (section, key) it must equal: the settings a resume compares are copies of manifest fields.
SETTINGS_COPIES = {
    "teacher": ("teacher", "name_or_path"), "teacher_config_sha256": ("teacher", "config_sha256"),
    "teacher_dtype": ("teacher", "dtype"), "tokenizer_sha256": ("tokenizer", "sha256"),
    "corpus_fingerprint": ("corpus", "fingerprint"), "text_column": ("corpus", "text_column"),
    "seq_len": ("corpus", "seq_len"), "max_tokens": ("corpus", "max_tokens"),
}


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, msg: str):
        raise FormatError(f"{self.where}: {msg}; the dataset is damaged or was not written by distill: do not use it "
                          "(re-copy it or rerun `distill precompute`)")

    def section(self, m: dict, key: str) -> dict:
        value = m.get(key)
        if not isinstance(value, dict):
            self.fail(f"`{key}` is {_show(value)}, expected an object")
        return value

    def int_(self, d: dict, key: str, lo: int, hi: int, path: str, required: bool = True, null_ok: bool = False) -> int | None:
        """An integer in [lo, hi]; absent only when not `required`, null only when `null_ok`."""
        value = d.get(key)
        if (key not in d and not required) or (value is None and null_ok):
            return None
        if type(value) is not int or not lo <= value <= hi:
            self.fail(f"`{path}` is {_show(value)}, expected an integer in [{lo}, {hi}]")
        return value

    def relpath(self, rel, what: str) -> str:
        if not isinstance(rel, str):
            self.fail(f"names {what} {_show(rel)}, expected a string")
        try:
            return safe_relpath(rel, what)
        except FormatError as e:
            raise FormatError(f"{self.where}: {e}")

    def equal(self, found, expected, path: str, why: str) -> None:
        if found != expected:
            self.fail(f"`{path}` is {_show(found)} but {why} gives {_show(expected)}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_manifest(m, where: str = "manifest.json") -> Manifest:
    """The manifest's JSON checked whole (`check_manifest`), then typed (format.sections): what every reader uses."""
    check_manifest(m, where)
    return Manifest.from_json(m)


def check_manifest(m, where: str = "manifest.json") -> None:
    """Raise FormatError (one line, naming `where`) on the first field that is malformed or contradicts another."""
    c = _Checker(where)
    if not isinstance(m, dict):
        c.fail(f"the manifest is a JSON {type(m).__name__}, expected an object")
    if m.get("format") != FORMAT_NAME:
        c.fail(f"`format` is {_show(m.get('format'))}, expected {FORMAT_NAME!r}")
    version = m.get("format_version")
    if type(version) is not int or version < 1:
        c.fail(f"`format_version` is {_show(version)}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise FormatError(f"{where}: dataset format version {version} is newer than this distill understands "
                          f"({FORMAT_VERSION}); upgrade offline-distill")
    teacher, tokenizer, corpus, cap = (c.section(m, k) for k in ("teacher", "tokenizer", "corpus", "capture"))
    if "created_by" in m:
        made = c.section(m, "created_by")
        if not isinstance(made.get("command", []), (list, type(None))) or not isinstance(made.get("sessions", []), list):
            c.fail(f"`created_by` is {_show(made)}, expected tool, version, command (a list) and sessions (a list)")
    vocab = c.int_(teacher, "vocab_size", 1, MAX_VOCAB, "teacher.vocab_size")
    T = c.int_(corpus, "seq_len", 1, MAX_SEQ_LEN, "corpus.seq_len")
    _check_teacher(c, teacher, T)
    _check_tokenizer(c, tokenizer, vocab)
    capture = _check_capture(c, cap, teacher, vocab)
    if cap.get("positions", "all") not in POSITIONS or (cap.get("positions") == "trained" and version < 2):
        c.fail(f"`capture.positions` is {_show(cap.get('positions'))}, expected one of {list(POSITIONS)} ('trained' only "
               "from format version 2)")
    schema = m.get("schema")
    if not isinstance(schema, dict) or not all(isinstance(v, str) for v in schema.values()):
        c.fail(f"`schema` is {_show(schema)}, expected an object of column name -> Arrow type")
    derived = schema_description(capture.schema(T, version))
    if schema != derived:
        diff = sorted(set(schema.items()) ^ set(derived.items()))[:4]
        c.fail(f"`schema` does not match the columns that `capture` and `corpus.seq_len` define (differences: {diff})")
    _check_shards(c, m.get("shards"), cap, T)
    _check_totals(c, m, corpus, T)
    _check_settings(c, m)


def _check_teacher(c: _Checker, teacher: dict, T: int) -> None:
    c.int_(teacher, "num_hidden_layers", 0, 1 << 16, "teacher.num_hidden_layers", required=False)
    c.int_(teacher, "hidden_size", 0, 1 << 24, "teacher.hidden_size", required=False)
    c.int_(teacher, "parameters", 1, 1 << 50, "teacher.parameters", required=False)
    limit = c.int_(teacher, "max_position_embeddings", 1, 1 << 40, "teacher.max_position_embeddings", required=False, null_ok=True)
    if limit is not None and T > limit:
        c.fail(f"`corpus.seq_len` {T} is above `teacher.max_position_embeddings` {limit}")
    dtype = teacher.get("dtype")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        c.fail(f"`teacher.dtype` is {_show(dtype)}, expected float32, float16 or bfloat16")


def _check_tokenizer(c: _Checker, section: dict, vocab: int) -> None:
    sha = section.get("sha256")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        c.fail(f"`tokenizer.sha256` is {_show(sha)}, expected 64 lowercase hex digits")
    n = c.int_(section, "vocab_size", 1, MAX_VOCAB, "tokenizer.vocab_size", required=False)
    if n is not None and n > vocab:
        c.fail(f"`tokenizer.vocab_size` {n} is larger than `teacher.vocab_size` {vocab}: the teacher cannot score every token")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        c.int_(section, key, 0, (n or vocab) - 1, f"tokenizer.{key}", required=False, null_ok=True)
    files = section.get("files")
    if files is None:
        return
    if section.get("path", "tokenizer") != "tokenizer":
        c.fail(f"`tokenizer.path` is {_show(section.get('path'))}, expected 'tokenizer'")
    if not isinstance(files, dict) or not files:
        c.fail(f"`tokenizer.files` is {_show(files)}, expected an object of file name -> sha256 and bytes")
    for name, meta in files.items():
        c.relpath(name, "tokenizer file")
        _check_file_meta(c, meta, f"tokenizer.files[{name!r}]")


def _check_file_meta(c: _Checker, meta, path: str) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not _HEX64.match(meta["sha256"]):
        c.fail(f"`{path}` is {_show(meta)}, expected {{'sha256': 64 hex digits, 'bytes': size}}")
    c.int_(meta, "bytes", 0, MAX_BYTES, f"{path}.bytes")


def _check_capture(c: _Checker, cap: dict, teacher: dict, vocab: int) -> Capture:
    targets = cap.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) and t in TARGET_KINDS for t in targets) \
            or len(set(targets)) != len(targets):
        c.fail(f"`capture.targets` is {_show(targets)}, expected a list of distinct kinds among {list(TARGET_KINDS)}")
    if cap.get("encoding") not in ENCODINGS:
        c.fail(f"`capture.encoding` is {_show(cap.get('encoding'))}, expected one of {list(ENCODINGS)}")
    if cap.get("compression", "none") not in COMPRESSIONS:
        c.fail(f"`capture.compression` is {_show(cap.get('compression'))}, expected one of {list(COMPRESSIONS)}")
    if cap.get("temperature", 1.0) != 1.0 or isinstance(cap.get("temperature"), bool):
        c.fail(f"`capture.temperature` is {_show(cap.get('temperature'))}; format version 1 stores log-probs at temperature 1")
    c.equal(cap.get("token_dtype"), token_dtype(vocab), "capture.token_dtype", "`teacher.vocab_size`")
    compact = cap["encoding"] == "compact"
    topk = "topk" in targets
    c.int_(cap, "top_k", 1 if topk else 0, vocab if topk else 0, "capture.top_k")
    if topk:
        bits = c.int_(cap, "logprob_bits", 1, 16, "capture.logprob_bits") if compact else None
        if "logprob_dtype" in cap:  # descriptive only: the encoding defines it
            c.equal(cap["logprob_dtype"], logprob_dtype(cap["encoding"], bits), "capture.logprob_dtype", "`capture.encoding`")
    temps = cap.get("log_norm_temperatures", [])
    if temps and not topk or not isinstance(temps, list) or not all(
            type(t) in (int, float) and math.isfinite(t) and t > 0 and t != 1 for t in temps) or temps != sorted(set(temps)):
        c.fail(f"`capture.log_norm_temperatures` is {_show(temps)}, expected an ascending list of distinct positive "
               "temperatures other than 1 (top-k targets only)")
    if compact:
        c.equal(cap.get("id_bits"), bits_for(vocab - 1), "capture.id_bits", "`teacher.vocab_size`")
    if cap.get("topk_id_coding", "packed") not in (ID_CODINGS if compact and topk else ("packed",)):
        c.fail(f"`capture.topk_id_coding` is {_show(cap.get('topk_id_coding'))}, expected one of {list(ID_CODINGS)} "
               "(compact top-k only)")
    if "sampled" in targets:
        n = c.int_(cap, "samples", 1, MAX_SAMPLES, "capture.samples")
        tau = cap.get("sample_temperature")
        if type(tau) not in (int, float) or not math.isfinite(tau) or tau <= 0:
            c.fail(f"`capture.sample_temperature` is {_show(tau)}, expected a positive number")
        c.int_(cap, "seed", -(1 << 63), (1 << 64) - 1, "capture.seed", required=False)
        c.equal(cap.get("count_dtype"), count_dtype(n), "capture.count_dtype", "`capture.samples`")
        if compact:
            c.equal(cap.get("count_bits"), bits_for(n - 1), "capture.count_bits", "`capture.samples`")
    for key in ("batch_size", "shard_size", "world_size"):
        c.int_(cap, key, 1, MAX_WINDOWS, f"capture.{key}", required=False)
    layers = cap.get("hidden_layers", [])
    if not isinstance(layers, list):
        c.fail(f"`capture.hidden_layers` is {_show(layers)}, expected a list")
    n_states = teacher.get("num_hidden_layers")
    width = teacher.get("hidden_size")
    seen = set()
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            c.fail(f"`capture.hidden_layers[{i}]` is {_show(layer)}, expected {{index, width, dtype}}")
        index = c.int_(layer, "index", 0, n_states if isinstance(n_states, int) else 1 << 16, f"capture.hidden_layers[{i}].index")
        w = c.int_(layer, "width", 1, 1 << 24, f"capture.hidden_layers[{i}].width")
        if isinstance(width, int) and width > 0:
            c.equal(w, width, f"capture.hidden_layers[{i}].width", "`teacher.hidden_size`")
        if layer.get("dtype", "float16") not in HIDDEN_DTYPES:
            c.fail(f"`capture.hidden_layers[{i}].dtype` is {_show(layer.get('dtype'))}, expected float16")
        if index in seen:
            c.fail(f"`capture.hidden_layers` names layer {index} twice")
        seen.add(index)
    return Capture.from_json(cap)


def min_arrow_bytes(windows: int, T: int, token_type: str, trained_only: bool = False) -> int:
    """A lower bound of an uncompressed shard's Arrow file size: window_index, input_ids, labels, loss_mask and (at every
    position unless targets are stored only where trained) target_logprob are stored raw (every other column only adds)."""
    return windows * (8 + T * (2 * np.dtype(token_type).itemsize + 1 + (0 if trained_only else 4)))


def _check_shards(c: _Checker, shards, cap: dict, T: int) -> None:
    if not isinstance(shards, list) or not shards:
        c.fail(f"`shards` is {_show(shards)}, expected a non-empty list of shard records")
    size = cap.get("shard_size")
    hidden = bool(cap.get("hidden_layers"))
    for i, r in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(r, dict):
            c.fail(f"`{where}` is {_show(r)}, expected a shard record")
        name = r.get("name")
        if not isinstance(name, str):
            c.fail(f"`{where}.name` is {_show(name)} (a {type(name).__name__}), expected the string {shard_name(i)!r}")
        c.relpath(name, "shard")
        c.equal(name, shard_name(i), f"{where}.name", f"its position {i} in `shards`")
        limit = size if isinstance(size, int) else MAX_WINDOWS
        if i < len(shards) - 1 and isinstance(size, int) and r.get("windows") != size:
            c.fail(f"`{where}.windows` is {_show(r.get('windows'))}, expected `capture.shard_size` {size} (only the last shard may be shorter)")
        n = c.int_(r, "windows", 1, limit, f"{where}.windows")
        files = r.get("files")
        if not isinstance(files, dict):
            c.fail(f"`{where}.files` is {_show(files)}, expected an object of file -> sha256 and bytes")
        arrow = f"{name}.arrow"
        if arrow not in files:
            c.fail(f"`{where}.files` does not list {arrow}")
        for rel, meta in files.items():
            c.relpath(rel, "shard file")
            if rel != arrow and not (hidden and rel.startswith(f"{name}.zarr/")):
                c.fail(f"`{where}.files` lists {rel!r}, which is not a file of shard {name}"
                       + ("" if hidden else " (the dataset stores no hidden states)"))
            _check_file_meta(c, meta, f"{where}.files[{rel!r}]")
        if hidden and f"{name}.zarr/zarr.json" not in files:
            c.fail(f"`{where}.files` does not list {name}.zarr/zarr.json although `capture.hidden_layers` is set")
        total = sum(meta["bytes"] for meta in files.values())
        c.int_(r, "bytes", total, total, f"{where}.bytes", required=False)
        need = min_arrow_bytes(n, T, cap["token_dtype"], cap.get("positions") == "trained")
        ratio = MAX_ZSTD_RATIO if cap.get("compression") == "zstd" else 1
        if files[arrow]["bytes"] * ratio < need:
            c.fail(f"`{where}.windows` is {n}, but {arrow} has {files[arrow]['bytes']} bytes, too few for {n} windows "
                   f"of {T} tokens (at least {-(-need // ratio)})")
        stats = r.get("stats", {})
        if not isinstance(stats, dict) or not all(v is None or type(v) in (int, float) for v in stats.values()):
            c.fail(f"`{where}.stats` is {_show(stats)}, expected an object of figure -> number")
        c.int_(r, "tokens", n * T, n * T, f"{where}.tokens", required=False)
        c.int_(r, "valid_tokens", 0, n * T, f"{where}.valid_tokens", required=False)


def _check_totals(c: _Checker, m: dict, corpus: dict, T: int) -> None:
    shards = m["shards"]
    totals = c.section(m, "totals")
    sums = {"shards": len(shards), "windows": sum(r["windows"] for r in shards)}
    if all("tokens" in r for r in shards):
        sums["tokens"] = sum(r["tokens"] for r in shards)
    if all("valid_tokens" in r for r in shards):
        sums["valid_tokens"] = sum(r["valid_tokens"] for r in shards)
    if all("bytes" in r for r in shards):
        sums["bytes"] = sum(r["bytes"] for r in shards)
    for key, value in sums.items():
        if key in ("shards", "windows") or key in totals:
            c.equal(totals.get(key), value, f"totals.{key}", "the shard records")
    if "bytes_per_token" in totals and "bytes" in sums and "valid_tokens" in sums:
        expected = sums["bytes"] / max(1, sums["valid_tokens"])
        found = totals["bytes_per_token"]
        if type(found) not in (int, float) or not math.isclose(found, expected, rel_tol=1e-6, abs_tol=1e-9):
            c.fail(f"`totals.bytes_per_token` is {_show(found)} but the shard records give {expected:.6g}")
    for key, found in totals.items():
        if key.endswith("_mean") and found is not None:
            stat = key[: -len("_mean")]
            vals = [(r.get("stats", {}).get(stat), r.get("valid_tokens", 0)) for r in shards]
            vals = [(v, w) for v, w in vals if v is not None]
            weight = sum(w for _, w in vals)
            if not vals or not weight or type(found) not in (int, float) or not all(type(v) in (int, float) for v, _ in vals):
                c.fail(f"`totals.{key}` is {_show(found)} but the shard records hold no `stats.{stat}` to average")
            expected = sum(v * w for v, w in vals) / weight
            if not math.isclose(found, expected, rel_tol=1e-6, abs_tol=1e-9):
                c.fail(f"`totals.{key}` is {_show(found)} but the shard records' `stats.{stat}` average {expected:.6g}")
    n = c.int_(corpus, "corpus_tokens", 2, MAX_WINDOWS * MAX_SEQ_LEN, "corpus.corpus_tokens", required=False)
    trained = corpus.get("trained_tokens")
    if trained is not None and "valid_tokens" in sums:
        c.equal(sums["valid_tokens"], trained, "totals.valid_tokens", "`corpus.trained_tokens`")
    if n is not None and corpus.get("layout") in (None, "stream"):  # one stream cut every T positions
        c.equal(sums["windows"], -(-(n - 1) // T), "totals.windows", "`corpus.corpus_tokens` and `corpus.seq_len`")
        if "valid_tokens" in sums and trained is None:
            c.equal(sums["valid_tokens"], n - 1, "totals.valid_tokens", "`corpus.corpus_tokens` - 1")
        limit = corpus.get("max_tokens")
        if limit is not None and (type(limit) is not int or n - 1 > limit):  # max_tokens counts predicted tokens
            c.fail(f"`corpus.corpus_tokens` {n} is above `corpus.max_tokens` {_show(limit)} + 1")
    c.int_(corpus, "documents", 0, MAX_WINDOWS * MAX_SEQ_LEN, "corpus.documents", required=False)


def _check_settings(c: _Checker, m: dict) -> None:
    settings = m.get("settings")
    if settings is None:
        return
    if not isinstance(settings, dict):
        c.fail(f"`settings` is {_show(settings)}, expected an object")
    for key, value in settings.items():
        if key in SETTINGS_COPIES:
            section, field = SETTINGS_COPIES[key]
            c.equal(m[section].get(field), value, f"{section}.{field}", f"`settings.{key}`")
        elif key == "format_version":
            c.equal(m["format_version"], value, "format_version", "`settings.format_version`")
        elif key in m["capture"]:
            c.equal(m["capture"][key], value, f"capture.{key}", f"`settings.{key}`")
