"""Ways in and out for teams on axolotl: `distill export --to axolotl` and `distill import --from axolotl`.

The contract is that of axolotl's KD plugin (github.com/axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/, read at
commit 067b021c8b87), for pre-tokenized "v2" rows:

- Rows hold `input_ids`, `attention_mask`, `labels` (that trio makes axolotl treat a dataset as already tokenized:
  utils/data/wrappers.py, `_is_dataset_already_tokenized`, lines 134-141) plus `target_token_ids`, `target_logprobs`,
  `target_mask`, each a list of per-position lists of K entries (kd/collator.py lines 93-182 pads them per batch).
- Alignment: target position t is the distribution of the *next* token, input_ids[t+1]. The loss pairs the student's
  hidden state at t with target t without any shift, and shifts only `labels` for the CE term (kd/kernels/liger.py
  lines 309-319: `true_labels[:, 1:]`; kd/trainer.py lines 87-116). `labels` are the usual unshifted ones (equal to
  input_ids, -100 where not trained). That is distill's own convention (position t predicts labels[t] = inputs[t+1]).
- `target_logprobs` are used as given: teacher probs = exp(target_logprobs) (kd/kernels/liger.py lines 70-93). The
  v2 loader renormalizes them over the stored K ids and rescales them to `kd_temperature` (p^(T1/T2), renormalized)
  when it builds such rows (kd/chat_template.py lines 251-291), and the loss documents them as "already re-normalized"
  (kd/topk_logprob/forward_kl.py line 39). Pre-tokenized rows skip that loader, so the export does it.
- `target_mask` is 0/1 per slot; the loss keeps only slots where it is 1 (kd/kernels/liger.py line 70).

distill stores per window T inputs and T labels; the last label is the token after the window. An exported row
therefore has T + 1 tokens (the window plus that token) and T + 1 target positions, the last one masked (nothing is
stored for the token after it). Import reverses this; a row of another team becomes one window, right-padded to the
longest row. Imports no torch (the tokenizer is loaded with transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .common.errors import UserError, describe
from .common.files import write_json_atomic
from .format import open_dataset
from .format.encode import encode_rows
from .format.sections import Capture, Corpus, CreatedBy, Manifest, Teacher, Totals
from .format.schema import schema_description, token_dtype
from .format.writer import ShardWriter

COLUMNS = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
LOGPROB_MODES = ("renormalized", "full")
EXPORT_INFO = "distill_export.json"  # provenance of an export (the source manifest's teacher); import reads it if present
AXOLOTL_PAD_LOGPROB = -1e9  # what axolotl's own collator pads target_logprobs with (kd/collator.py line 133)
IGNORE_INDEX = -100


def _fresh_out(out: str) -> Path:
    """The output folder: local, new or empty (nothing a user has is overwritten)."""
    if "://" in out:
        raise UserError(f"--out {out}: writing to a URL is not supported by this command; pass a local folder and "
                        "upload it afterwards")
    path = Path(out)
    if path.exists() and (not path.is_dir() or path.is_symlink() or any(path.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new or empty folder")
    return path


def _staging(path: Path) -> Path:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished staging folder onto `path` (an empty folder there is replaced)."""
    if path.is_dir():
        path.rmdir()
    os.replace(tmp, path)


# --- export ------------------------------------------------------------------------------------------------------------

def axolotl_targets(logprobs: np.ndarray, mode: str, temperature: float) -> np.ndarray:
    """(..., K) stored log-probs (full vocabulary, temperature 1) -> what axolotl's loss takes, float32.

    'renormalized': over the K stored ids and at `temperature` (p^(1/T) renormalized, as axolotl's v2 loader does);
    'full': as stored (the tail mass 1 - sum stays recoverable; lossless)."""
    lp = logprobs.astype(np.float32)
    if mode == "full":
        return lp
    z = lp / np.float32(temperature)
    top = z.max(-1, keepdims=True)
    return (z - (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))).astype(np.float32)


def window_rows(input_ids: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray, ids: np.ndarray, logprobs: np.ndarray,
                position_ids: np.ndarray | None = None) -> dict:
    """One shard's windows as axolotl rows (equal-length lists of T + 1 positions).

    input_ids, labels, loss_mask, position_ids: (W, T); ids (W, T, K) int64; logprobs (W, T, K) float32 (already
    converted). In a format-2 window an example's last token is only a label (the next input is padding): it is put
    back as the next token. Axolotl rows carry no position ids, so examples packed into one window see each other there."""
    W, T = input_ids.shape
    K = ids.shape[-1]
    mask = loss_mask.astype(bool)
    tokens = np.concatenate([input_ids, labels[:, -1:]], axis=1).astype(np.int64)  # (W, T+1): window + next token
    if position_ids is not None:  # a trained label followed by padding (not by the next example): it is the next token
        follows = np.concatenate([position_ids[:, 1:] != 0, np.ones((W, 1), bool)], axis=1)  # (W, T)
        put = mask & follows
        tokens[:, 1:][put] = labels[put]
    real = np.concatenate([np.ones((W, 1), bool), mask], axis=1)  # token t is real when t = 0 or t-1 predicts it
    row_labels = np.where(real, tokens, IGNORE_INDEX)
    row_labels[:, 0] = IGNORE_INDEX  # nothing predicts the first token
    target_ids = np.concatenate([ids, np.zeros((W, 1, K), np.int64)], axis=1)  # (W, T+1, K); last position: padding
    target_lp = np.concatenate([logprobs, np.full((W, 1, K), AXOLOTL_PAD_LOGPROB, np.float32)], axis=1)
    target_mask = np.repeat(np.concatenate([mask, np.zeros((W, 1), bool)], axis=1)[..., None], K, axis=2)  # (W, T+1, K)

    def lists(a: np.ndarray, dtype) -> pa.Array:  # (W, L[, K]) -> list<list<..>> without Python loops
        arr = pa.array(np.ascontiguousarray(a, dtype=dtype).reshape(-1))
        for size in reversed(a.shape[1:]):
            offsets = pa.array(np.arange(0, arr.__len__() + 1, size, dtype=np.int32))
            arr = pa.ListArray.from_arrays(offsets, arr)
        return arr

    return {"input_ids": lists(tokens, np.int32), "attention_mask": lists(real, np.int8), "labels": lists(row_labels, np.int32),
            "target_token_ids": lists(target_ids, np.int32), "target_logprobs": lists(target_lp, np.float32),
            "target_mask": lists(target_mask, np.int8)}


def export_axolotl(dataset: str, out: str, *, logprobs: str = "renormalized", temperature: float = 1.0) -> dict:
    """Write `dataset`'s top-k targets as axolotl KD rows: `data/train-NNNNN-of-NNNNN.parquet` (one per shard), the
    tokenizer, a README of how to train on them, and `distill_export.json`. Returns a summary."""
    if logprobs not in LOGPROB_MODES:
        raise UserError(f"--logprobs {logprobs!r}: expected one of {', '.join(LOGPROB_MODES)}")
    if not temperature > 0:
        raise UserError(f"--temperature {temperature}: expected a positive number")
    if logprobs == "full" and temperature != 1.0:
        raise UserError(f"--temperature {temperature} needs --logprobs renormalized (a temperature changes the whole "
                        "distribution, which only the renormalized top-k can show); pass --logprobs renormalized")
    ds = open_dataset(dataset)
    if "topk" not in ds.target_kinds:
        raise UserError(f"{dataset} stores {' and '.join(ds.target_kinds) or 'no'} targets; axolotl's KD plugin reads "
                        "top-k log-probs: export a dataset captured with --targets topk or both")
    path = _fresh_out(out)
    tmp = _staging(path)
    try:
        data = tmp / "data"
        data.mkdir()
        n = len(ds.shards)
        rows = 0
        for i in range(n):
            shard = ds.open_shard(i)
            shard.verify_checksums(hidden=False)  # what leaves is what was captured
            ids, lp = shard.sparse_targets("topk")  # (W, T, K) each
            lp = axolotl_targets(lp, logprobs, temperature)
            if ds.capture.trained_only:  # no targets stored where loss_mask is 0: axolotl's padding there (target_mask 0)
                keep = shard.stored_mask()[..., None]  # (W, T, 1)
                ids, lp = np.where(keep, ids, 0), np.where(keep, lp, np.float32(AXOLOTL_PAD_LOGPROB)).astype(np.float32)
            table = pa.table(window_rows(shard.column("input_ids"), shard.column("labels"), shard.column("loss_mask"), ids,
                                         lp, shard.column("position_ids")))
            pq.write_table(table, data / f"train-{i:05d}-of-{n:05d}.parquet")
            rows += table.num_rows
        shutil.copytree(Path(ds.root) / "tokenizer", tmp / "tokenizer") if ds.is_local else _copy_remote_tokenizer(ds, tmp)
        info = {"source": ds.url, "source_manifest_sha256": ds.manifest_sha256, "rows": rows, "seq_len": ds.seq_len,
                "top_k": ds.top_k, "shard_size": ds.capture.shard_size or ds.shards[0].windows,
                "logprobs": logprobs, "temperature": temperature,
                "teacher": ds.manifest.teacher.to_json()}
        write_json_atomic(tmp / EXPORT_INFO, info)
        (tmp / "README.md").write_text(export_readme(ds, info, path), encoding="utf-8")
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(path), "rows": rows, "files": n, "tokens_per_row": ds.seq_len + 1, "top_k": ds.top_k}


def _copy_remote_tokenizer(ds, tmp: Path) -> None:
    (tmp / "tokenizer").mkdir()
    for name in ds.manifest.tokenizer.files or {}:
        with ds.fs.open(f"{ds.root}/tokenizer/{name}", "rb") as src, open(tmp / "tokenizer" / name, "wb") as dst:
            shutil.copyfileobj(src, dst)


def export_readme(ds, info: dict, path: Path) -> str:
    T, K = ds.seq_len, ds.top_k
    temp = info["temperature"]
    lp_text = (f"renormalized over the {K} stored ids at temperature {temp:g} (what axolotl's v2 loader produces; set "
               f"`kd_temperature: {temp:g}`)" if info["logprobs"] == "renormalized" else
               "the teacher's full-vocabulary log-probs at temperature 1, as captured (they sum to less than 1: the rest "
               "is the tail mass); use `kd_temperature: 1.0`")
    return "\n".join([
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/*.parquet",
        "---",
        "",
        f"# Teacher top-{K} log-probs for axolotl's KD plugin",
        "",
        f"Exported by `distill export --to axolotl` from `{info['source']}` (teacher "
        f"`{ds.manifest.teacher.name_or_path}`). {info['rows']} pre-tokenized rows of {T + 1} tokens: one window of "
        f"{T} positions of the distill dataset plus the token after it.",
        "",
        "Columns: `input_ids`, `attention_mask`, `labels` (unshifted, -100 where nothing is predicted), and per position "
        f"`target_token_ids`, `target_logprobs`, `target_mask` ({K} entries each). Target position t is the teacher's "
        "distribution of the next token, input_ids[t+1], which is how axolotl's KD loss pairs it with the student. "
        f"The last position of each row has no target (`target_mask` 0). Log-probs: {lp_text}.",
        "",
        "## Train with axolotl",
        "",
        "```yaml",
        "base_model: YOUR_STUDENT          # must use the tokenizer in tokenizer/ (same ids)",
        "plugins:",
        "  - axolotl.integrations.kd.KDPlugin",
        "kd_trainer: true",
        "kd_ce_alpha: 0.5",
        "kd_alpha: 0.5",
        f"kd_temperature: {temp:g}",
        f"sequence_len: {T + 1}              # at least the row length: longer rows would be cut without their targets",
        "sample_packing: false",
        "datasets:",
        f"  - path: {path.resolve()}",
        "    type:                          # empty: the rows are already tokenized",
        "```",
        "",
        "`datasets.load_dataset(\"THIS_FOLDER\", split=\"train\")` reads the rows (the YAML above points at `data/`). "
        "`distill import THIS_FOLDER --from axolotl --tokenizer THIS_FOLDER/tokenizer --out DATASET` turns them back "
        "into a distill dataset.",
        "",
    ])


# --- import ------------------------------------------------------------------------------------------------------------

def _parquet_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise UserError(f"{src}: no such file or folder; pass a folder of axolotl KD rows in parquet files")
    files = sorted((src / "data").glob("*.parquet")) if (src / "data").is_dir() else []
    files = files or sorted(p for p in src.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(src).parts))
    if not files:
        raise UserError(f"{src} holds no .parquet files; axolotl KD rows are read from parquet (save them with "
                        "`Dataset.to_parquet`)")
    return files


def _row_lists(col: pa.Array, depth: int) -> list:
    """A list<...> column (depth 1) or list<list<...>> (depth 2) -> per row a numpy array (1-D) or a list of 1-D arrays."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    out = []
    outer = col.offsets.to_numpy()
    if depth == 1:
        values = col.values.to_numpy(zero_copy_only=False)
        return [values[outer[i]:outer[i + 1]] for i in range(len(col))]
    inner_arr = col.values
    inner = inner_arr.offsets.to_numpy()
    values = inner_arr.values.to_numpy(zero_copy_only=False)
    for i in range(len(col)):
        a, b = outer[i], outer[i + 1]
        out.append([values[inner[j]:inner[j + 1]] for j in range(a, b)])
    return out


def read_axolotl_rows(files: list[Path]):
    """Yield (file, row index, dict of per-row arrays) from axolotl KD parquet files."""
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{f}: cannot read it as parquet ({' '.join(str(e).split())[:160]})")
        names = pf.schema_arrow.names
        missing = [c for c in ("input_ids", "target_token_ids", "target_logprobs", "target_mask") if c not in names]
        if missing:
            raise UserError(f"{f}: no column {', '.join(missing)} (found {', '.join(names)}); expected axolotl KD rows with "
                            "input_ids, target_token_ids, target_logprobs and target_mask")
        start = 0
        for batch in pf.iter_batches(batch_size=64, columns=["input_ids", "target_token_ids", "target_logprobs", "target_mask"]):
            cols = {"input_ids": _row_lists(batch.column("input_ids"), 1)}
            for name in ("target_token_ids", "target_logprobs", "target_mask"):
                cols[name] = _row_lists(batch.column(name), 2)
            for r in range(batch.num_rows):
                yield f, start + r, {k: v[r] for k, v in cols.items()}
            start += batch.num_rows


def row_to_window(row: dict, T: int, K: int, pad_id: int, where: str) -> dict:
    """One axolotl row -> one window of T positions: inputs, labels, loss_mask (T,), top-k ids and log-probs (T, K),
    sorted most probable first. Position t is valid when its target_mask has a 1 and the row has token t+1."""
    tokens = np.asarray(row["input_ids"], np.int64)
    L = len(tokens)
    if L - 1 > T:
        raise UserError(f"{where}: {L} tokens, more than --seq-len {T} + 1; pass a larger --seq-len")
    inputs = np.full(T, pad_id, np.int64)
    labels = np.full(T, pad_id, np.int64)
    inputs[:min(L, T)] = tokens[:T]
    labels[:L - 1] = tokens[1:]
    ids = np.tile(np.arange(K, dtype=np.int64), (T, 1))  # masked positions: a harmless uniform filler
    lp = np.full((T, K), -np.log(K), np.float32)
    mask = np.zeros(T, np.uint8)
    if _fill_regular(row, min(L - 1, T), K, ids, lp, mask, where):
        return {"input_ids": inputs, "labels": labels, "loss_mask": mask, "topk_ids": ids, "topk_logprobs": lp}
    for t, (tid, tlp, tm) in enumerate(zip(row["target_token_ids"], row["target_logprobs"], row["target_mask"])):
        if t >= L - 1 or t >= T:
            break
        valid = np.asarray(tm, bool)
        n = len(tid)
        if not (len(tlp) == len(tm) == n):
            raise UserError(f"{where}, position {t}: {n} target_token_ids, {len(tlp)} target_logprobs and {len(tm)} "
                            "target_mask entries; expected equal counts")
        if not valid.any():
            if n == K and _is_topk(np.asarray(tid, np.int64), np.asarray(tlp, np.float32)):
                ids[t], lp[t] = tid, tlp  # a masked position that holds real values keeps them (exact round trip)
            continue
        tid, tlp = np.asarray(tid, np.int64)[valid], np.asarray(tlp, np.float32)[valid]
        if len(np.unique(tid)) != len(tid):
            raise UserError(f"{where}, position {t}: a token id appears twice among the targets; each id once, please")
        order = np.argsort(-tlp, kind="stable")
        filler = np.setdiff1d(np.arange(len(tid) + K, dtype=np.int64), tid)[:K - len(tid)]
        ids[t] = np.concatenate([tid[order], filler])
        lp[t] = np.concatenate([tlp[order], np.full(K - len(tid), -np.inf, np.float32)])  # fewer than K: mass 0
        mask[t] = 1
    return {"input_ids": inputs, "labels": labels, "loss_mask": mask, "topk_ids": ids, "topk_logprobs": lp}


def _fill_regular(row: dict, P: int, K: int, ids: np.ndarray, lp: np.ndarray, mask: np.ndarray, where: str) -> bool:
    """The common case, without a loop over positions: every one of the first P positions has K entries, masked
    wholly or not at all. Fills ids/lp/mask (T, K) in place like the general path; False when the row is not regular."""
    lists = [row[k][:P] for k in ("target_token_ids", "target_logprobs", "target_mask")]
    if P < 1 or any(len(x) < P or any(len(e) != K for e in x) for x in lists):
        return False
    tid, tlp, tm = (np.stack(x) for x in lists)  # (P, K) each
    tid, tlp, tm = tid.astype(np.int64), tlp.astype(np.float32), tm.astype(bool)
    on = tm.all(1)
    if not (on | ~tm.any(1)).all():
        return False
    s = np.sort(tid[on], axis=1)
    if (s[:, 1:] == s[:, :-1]).any():
        raise UserError(f"{where}: a token id appears twice among the targets of a position; each id once, please")
    order = np.argsort(-tlp[on], axis=1, kind="stable")
    ids[:P][on] = np.take_along_axis(tid[on], order, 1)
    lp[:P][on] = np.take_along_axis(tlp[on], order, 1)
    mask[:P] = on
    off = np.nonzero(~on)[0]
    for t in off[[_is_topk(tid[t], tlp[t]) for t in off]] if len(off) else []:
        ids[t], lp[t] = tid[t], tlp[t]  # a masked position that holds real values keeps them (exact round trip)
    return True


def _is_topk(ids: np.ndarray, lp: np.ndarray) -> bool:
    return bool(len(np.unique(ids)) == len(ids) and (ids >= 0).all() and np.isfinite(lp).all() and (lp <= 0).all()
                and (lp[1:] <= lp[:-1]).all() and np.exp(lp.astype(np.float64)).sum() <= 1.01)


def import_axolotl(src: str, out: str, tokenizer: str, *, seq_len: int | None = None, shard_size: int | None = None,
                   teacher: str | None = None, command: list[str] | None = None) -> dict:
    """Turn a folder of axolotl KD rows into a distill dataset (manifest, checksums, `tokenizer`); returns the manifest.

    shard_size: windows per shard; by default the exported dataset's (from `distill_export.json`, so the shuffled
    order of a round trip is the original's), else 256."""
    from transformers import AutoTokenizer

    from .format.tokenizer_id import tokenizer_record
    from .precompute import TOOL_VERSION, save_tokenizer, tokenizer_files

    source = Path(src)
    files = _parquet_files(source)
    path = _fresh_out(out)
    if not Path(tokenizer).expanduser().exists():
        raise UserError(f"--tokenizer {tokenizer}: no such folder; pass the tokenizer the teacher used (a folder with "
                        "tokenizer.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(tokenizer).expanduser()))
    except Exception as e:
        raise UserError(f"--tokenizer {tokenizer}: cannot load it ({describe(e)})")
    info = {}
    info_path = (source if source.is_dir() else source.parent) / EXPORT_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("temperature", 1.0) != 1.0:
            raise UserError(f"{src} was exported at temperature {info['temperature']}; distill stores temperature-1 "
                            "log-probs: export again with --temperature 1")
    shard_size = shard_size or info.get("shard_size") or 256
    if type(shard_size) is not int or shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: expected a positive number of windows")
    # --- a first pass for the shape: the longest row sets the window length, the widest position sets K
    longest, K, rows, max_id = 0, 0, 0, -1
    for f, r, row in read_axolotl_rows(files):
        longest = max(longest, len(row["input_ids"]))
        K = max([K] + [len(x) for x in row["target_token_ids"]])
        max_id = max([max_id, int(np.max(row["input_ids"], initial=-1))] + [int(np.max(x, initial=-1)) for x in row["target_token_ids"]])
        rows += 1
    if rows == 0 or K == 0 or longest < 2:
        raise UserError(f"{src}: no row with at least 2 tokens and top-k targets; nothing to import")
    T = seq_len or longest - 1
    recorded = Teacher.from_json(info["teacher"]) if "teacher" in info else None
    vocab = max(recorded.vocab_size if recorded else 0, len(tok), max_id + 1)
    if max_id >= len(tok) and recorded is None:
        print(f"note: ids up to {max_id} are above the tokenizer's {len(tok)} ids; the teacher's vocabulary is taken as "
              f"{vocab}", file=sys.stderr)
    teacher_rec = replace(recorded, vocab_size=vocab, name_or_path=teacher or recorded.name_or_path) if recorded else \
        Teacher(name_or_path=teacher or f"unknown (imported from axolotl rows {source.name})", vocab_size=vocab)
    if teacher_rec.max_position_embeddings is not None and T > teacher_rec.max_position_embeddings:
        teacher_rec = replace(teacher_rec, max_position_embeddings=None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise UserError(f"--tokenizer {tokenizer}: it has neither a pad nor an EOS token, needed to pad short rows; set "
                        "pad_token in its tokenizer_config.json")
    capture = Capture.build(targets=("topk",), top_k=K, encoding="exact", logprob_bits=7, compression="none",
                            vocab_size=vocab, hidden_layers=[], samples=0, sample_temperature=1.0, seed=0,
                            batch_size=shard_size, shard_size=shard_size, world_size=1,
                            positions="trained")  # format 2: targets only where target_mask (loss_mask) is 1
    schema = capture.schema(T)
    tmp = _staging(path)
    try:
        save_tokenizer(tok, tmp)
        records, writer, window = [], None, 0
        n_shards = -(-rows // shard_size)
        dt = np.dtype(token_dtype(vocab))

        def flush(buf):
            stack = {k: np.stack([w[k] for w in buf]) for k in buf[0]}
            stack["window_index"] = np.arange(window - len(buf), window)
            stack["topk_ids"] = stack["topk_ids"].astype(dt)
            stack["topk_logprobs"] = stack["topk_logprobs"].astype(np.float16)
            stack["input_ids"], stack["labels"] = stack["input_ids"].astype(dt), stack["labels"].astype(dt)
            stack["position_ids"] = np.broadcast_to(np.arange(T, dtype=np.int32), stack["input_ids"].shape)  # one sample a row
            stack["target_logprob"] = _target_logprob(stack)
            valid = stack["loss_mask"].astype(bool)
            mass = np.exp(stack["topk_logprobs"].astype(np.float64)).sum(-1)
            writer.write(encode_rows(stack, capture))
            writer.add_stat("topk_mass", float(mass[valid].sum()), int(valid.sum()))

        buf = []
        for f, r, row in read_axolotl_rows(files):
            if writer is None:
                s = len(records)
                writer = ShardWriter(tmp, s, schema, min(shard_size, rows - s * shard_size), T)
            buf.append(row_to_window(row, T, K, pad_id, f"{f.name} row {r}"))
            window += 1
            if len(buf) == writer.n_windows:
                with writer:
                    flush(buf)
                    records.append(writer.finish())
                writer, buf = None, []
        assert len(records) == n_shards
        manifest = Manifest(
            created_by=CreatedBy(tool="offline-distill", version=TOOL_VERSION, command=command, sessions=[]),
            teacher=teacher_rec,
            tokenizer=replace(tokenizer_record(tok), files=tokenizer_files(tmp)),
            corpus=Corpus(files=[str(p) for p in files][:1000], file_count=len(files), seq_len=T,
                          packing="imported from axolotl KD rows: one row per window, right-padded to the longest row"),
            capture=capture,
            schema=schema_description(schema),
            shards=records,
            totals=Totals.of(records),
        ).to_json()
        for section in ("teacher", "corpus"):  # what an import cannot know is left out, not written as null
            manifest[section] = {k: v for k, v in manifest[section].items() if v is not None}
        write_json_atomic(tmp / "manifest.json", manifest)  # last: the dataset is complete
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    open_dataset(str(path))  # what we wrote passes the reader's checks
    return manifest


def _target_logprob(stack: dict) -> np.ndarray:
    """`target_logprob` of imported rows, which axolotl rows do not carry (training never reads it): the stored
    log-prob of the label where the label is among the stored ids; elsewhere only a bound is known, and the smallest
    stored log-prob is used (an upper bound: an id outside the top-k is at most as likely as the k-th)."""
    ids, lp, labels = stack["topk_ids"].astype(np.int64), stack["topk_logprobs"].astype(np.float32), stack["labels"].astype(np.int64)
    hit = ids == labels[..., None]  # (W, T, K)
    finite = np.where(np.isfinite(lp), lp, np.inf).min(-1)  # (W, T)
    out = np.where(hit.any(-1), np.where(hit, lp, 0).sum(-1), finite)
    return np.where(np.isfinite(out), out, 0.0).astype(np.float32)
