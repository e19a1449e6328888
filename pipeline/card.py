"""The dataset card: `README.md` in a dataset folder, written by `distill precompute` after the manifest.

`dataset_card(manifest)` is a pure function of the manifest: Hugging Face dataset-card YAML front matter (its
`configs`/`data_files` point at `shards/*.arrow`, so `datasets.load_dataset(folder_or_repo)` and the hub's viewer read
the rows with no edit after `huggingface-cli upload`), then what a person needs: teacher, tokenizer, corpus, capture
settings, fidelity figures, sizes and how to train from it. `write_card` writes it atomically. Imports no torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .common.errors import UserError
from .common.files import tmp_name
from .format.sections import Manifest

CARD = "README.md"
# Hugging Face license identifiers are lowercase SPDX-like ids ("apache-2.0", "cc-by-4.0", "mit", "other").
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
TAGS = ["knowledge-distillation", "distillation", "logits", "teacher-logprobs", "distill-logits"]
STAT_TEXT = {
    "topk_mass": "stored top-k probability mass (mean over valid positions)",
    "recon_kl": "KL(teacher ‖ top-k + uniform tail), nats (every 8th position)",
    "sample_unique": "unique sampled ids per position",
    "sample_mass": "true teacher mass of the sampled ids",
    "sample_rkl": "KL(sampled estimate ‖ teacher), nats",
}


def check_license(license: str | None) -> str | None:
    if license is not None and not _LICENSE.match(license):
        raise UserError(f"--license {license!r} is not a license identifier; pass a lowercase id such as apache-2.0, "
                        "mit, cc-by-4.0 or other")
    return license


def _size_category(n: int) -> str:
    """The hub's size bucket for `n` rows (windows)."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return name
    return "n>1B" if n >= 1_000_000_000 else "100M<n<1B"


def _fmt(value) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def front_matter(m: Manifest, license: str | None) -> dict:
    meta = {}
    if license:
        meta["license"] = license
    meta["tags"] = list(TAGS)
    meta["size_categories"] = [_size_category(m.totals.windows)]
    meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.arrow"}]}]
    return meta


def dataset_card(manifest: dict | Manifest, license: str | None = None) -> str:
    """The card's text for a finished dataset's manifest (its JSON, or the typed Manifest)."""
    m = manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)
    check_license(license)
    t, tok, c, cap, tot = m.teacher, m.tokenizer, m.corpus, m.capture, m.totals
    name = t.name_or_path or "an unnamed teacher"
    kinds = " and ".join({"topk": f"top-{cap.top_k} log-probs", "sampled": f"sampled targets (N = {cap.samples})"}[k]
                         for k in cap.targets) or "target log-probs only"
    lines = ["---", yaml.safe_dump(front_matter(m, license), sort_keys=False).rstrip(), "---", "",
             f"# Teacher logits of {name}", "",
             f"A distill logit dataset (format `{m.format}` v{m.format_version}): {kinds} of the "
             f"teacher for {_fmt(tot.valid_tokens)} token positions of {_fmt(c.documents)} documents, in windows of "
             f"{c.seq_len} tokens. Train a smaller student with the same tokenizer from it without running the teacher.",
             "", f"License: {license or 'not given (pass --license to precompute)'}.", ""]
    lines += ["## Teacher", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in (
        ("model", t.name_or_path), ("revision", t.revision), ("type", t.model_type),
        ("architectures", ", ".join(t.architectures or []) or None), ("parameters", t.parameters), ("dtype", t.dtype),
        ("vocabulary (output layer)", t.vocab_size), ("layers", t.num_hidden_layers), ("hidden size", t.hidden_size),
        ("config sha256", t.config_sha256))]
    lines += ["", "## Tokenizer", "",
              f"Stored in `tokenizer/` ({tok.class_name or 'tokenizer'}, {_fmt(tok.vocab_size)} ids, sha256 "
              f"`{tok.sha256[:16]}…`). A student must use this tokenizer: the stored ids are its ids.", ""]
    lines += ["## Corpus", "",
              f"{_fmt(c.file_count)} file(s) (fingerprint `{(c.fingerprint or 'unknown')[:16]}`), text column "
              f"`{c.text_column}`, {_fmt(c.documents)} documents, {_fmt(c.corpus_tokens)} tokens"
              + (f" (capped at {_fmt(c.max_tokens)})" if c.max_tokens else "") + f". Packing: {c.packing}.", ""]
    if c.files:
        shown = c.files[:10]
        lines += ["First files: " + ", ".join(f"`{Path(f).name}`" for f in shown) + (" …" if len(c.files) > 10 else ""), ""]
    lines += ["## Capture", "", "| setting | value |", "| --- | --- |"]
    rows = [("targets", ", ".join(cap.targets) or "none"), ("top-k", cap.top_k or None),
            ("log-prob temperature", cap.temperature), ("encoding", cap.encoding), ("compression", cap.compression),
            ("token dtype", cap.token_dtype), ("sequence length", c.seq_len),
            ("hidden layers", ", ".join(str(i) for i in cap.hidden_indices) or "none")]
    if "topk" in cap.targets:
        rows.append(("log-prob dtype", cap.logprob_dtype))
    if "sampled" in cap.targets:
        rows += [("samples per position", cap.samples), ("sample temperature", cap.sample_temperature), ("seed", cap.seed)]
    rows += [("batch size", cap.batch_size), ("shard size (windows)", cap.shard_size), ("processes", cap.world_size)]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    if m.created_by.command:
        lines += ["", "Command:", "", "```", " ".join(m.created_by.command), "```"]
    lines += ["", "## Fidelity", ""]
    if tot.means:
        lines += ["Measured at capture time against the teacher's full distribution:", "", "| figure | mean |", "| --- | --- |"]
        lines += [f"| {STAT_TEXT.get(k, k)} | {_fmt(v)} |" for k, v in tot.means.items()]
    else:
        lines += ["No fidelity figures were recorded."]
    lines += ["", "## Size", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in (
        ("shards", _fmt(tot.shards)), ("windows (rows)", _fmt(tot.windows)), ("positions", _fmt(tot.tokens)),
        ("valid positions", _fmt(tot.valid_tokens)), ("bytes", f"{_fmt(tot.bytes)} ({_bytes(tot.bytes)})"),
        ("bytes per valid position", _fmt(tot.bytes_per_token)))]
    lines += ["", "## Use", "",
              "Train a student (any causal LM config with this vocabulary) and evaluate it:", "", "```bash",
              "distill verify DATASET                     # checksums, schema, values",
              "distill train --data DATASET --student-config student.json --out runs/s1 --steps 2000",
              "distill eval --student runs/s1 --data HELDOUT_DATASET", "```", "",
              "Read the rows without distill (one row per window; columns in the format specification):", "",
              "```python", "from datasets import load_dataset", "", "rows = load_dataset(\"PATH_OR_REPO\", split=\"train\")",
              "```", "",
              "`manifest.json` holds every figure above and the checksums of every file; only the shards it lists belong "
              "to the dataset. The layout is specified in distill's `docs/FORMAT.md`.", ""]
    return "\n".join(lines)


def write_card(out_dir: str | Path, manifest: dict | Manifest, license: str | None = None) -> Path:
    """Write `out_dir/README.md` atomically (temp name, then rename); returns its path."""
    path = Path(out_dir) / CARD
    tmp = tmp_name(path)
    text = dataset_card(manifest, license)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
