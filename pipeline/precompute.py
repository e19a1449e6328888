"""Stage one, top-down: `precompute(cfg)` runs the teacher once over a corpus and writes a dataset folder.

corpus files → documents → token file → windows → teacher forward → targets → background shard writer → manifest.
Work is planned in shards of `shard_size` windows; shard i belongs to rank i % world_size. Each finished shard leaves a
marker in `_progress/`; a rerun skips marked shards, and whichever rank sees every marker writes the manifest, last.
Batches never straddle shards, so a resumed or split run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .card import CARD, write_card
from .config import PrecomputeConfig
from .common.errors import UserError
from .background_writer import BackgroundWriter
from .common.identity import path_identity
from .common.outdir import lock_folder, lock_rank, make_out_folder, only_leftovers, refuse_links, remove_leftovers, try_exclusive, unlock_folder
from .common.files import list_files, remove_temp_files, write_json_atomic
from .format.remote import RemoteOutput, is_url, local_path, parse_storage_options, redact
from .format import FORMAT_VERSION, MANIFEST, PROGRESS_DIR, SHARDS_DIR, shard_name
from .format.files import sha256_file
from .format.schema import SHARD_NAME_DIGITS, schema_description
from .format.sections import Capture, Corpus, CreatedBy, FileMeta, HiddenLayer, Manifest, Session, ShardRecord, Teacher, Totals

TOOL_VERSION = "0.1.0"
# Capture settings that change shard bytes: a resumed run must match them.
SETTINGS_FROM_CAPTURE = ("targets", "top_k", "samples", "sample_temperature", "seed", "encoding", "logprob_bits", "compression",
                         "hidden_layers", "batch_size", "shard_size", "log_norm_temperatures", "topk_id_coding")
# Settings recorded for people, not compared on resume: the same teacher typed as another path is the same teacher
# (`teacher_identity`, a hash of its files, is compared instead).
NOT_COMPARED = ("teacher",)
# Settings recorded only when set, whose absence means "none": compared on resume even when one side lacks them (a run
# started without log-normalizers must not be resumed with them: its shards would lack the column).
COMPARED_WHEN_ABSENT = ("log_norm_temperatures", "topk_id_coding")


def precompute(cfg: PrecomputeConfig) -> dict:
    """Run the capture described by `cfg`; return the manifest (or this rank's summary when other ranks are still busy).

    The output folder is locked for the whole run (shared by the ranks of one capture, exclusive otherwise)."""
    cfg.resolve()
    group = None
    if cfg.tp > 1:  # N processes hold one teacher (pipeline/tensor_parallel.py)
        from .tensor_parallel import TPGroup

        group = TPGroup(cfg.rank, cfg.world_size, cfg.tp)
        cfg = replace(cfg, rank=group.index, world_size=group.count)  # the group captures as one rank did
        if not group.writer:  # computes in step with its writer, never touches --out
            try:
                return _precompute(cfg, None, [], None, group)
            except RuntimeError as e:
                group.reraise(e)
            finally:
                group.leave()
    remote = None
    if is_url(cfg.out):  # a bucket: this rank captures into a local staging folder and uploads (format/remote.py)
        remote = RemoteOutput(cfg.out, parse_storage_options(cfg.storage_options), cfg.stage_dir, cfg.rank, cfg.world_size)
    out = remote.stage if remote else Path(local_path(cfg.out))  # file://PATH is PATH
    created = not out.exists() and not out.is_symlink()
    make_out_folder(out)
    hint = "" if cfg.world_size > 1 else "; processes of one capture each pass --rank and --world-size"
    held = [lock_folder(out, shared=cfg.world_size > 1, hint=hint)]
    try:
        result = _precompute(cfg, out, held, remote, group)
        if group is not None:
            group.finish()  # its followers stop computing
        return result
    except RuntimeError as e:
        if group is None:
            raise
        group.reraise(e)
    except UserError as e:
        if remote is None:
            raise
        raise UserError(str(e).replace(str(out), redact(cfg.out))) from None  # name the bucket, not the staging folder
    finally:
        # refused before writing anything: leave no empty folder behind (unless another rank is using it)
        if created and out.is_dir() and not any(out.iterdir()) and (cfg.world_size == 1 or try_exclusive(held[0])):
            out.rmdir()
        for fd in held:
            unlock_folder(fd)
        if remote:
            remote.close()


def _precompute(cfg: PrecomputeConfig, out: Path | None, held: list[int], remote=None, group=None) -> dict:
    import torch
    from tqdm import tqdm

    from .chat import load_chat_template, tokenize_examples
    from .corpus import count_windows, list_data_files
    from .packing import PackingStats, make_windows, packing_masks_supported, plan_windows, read_examples, stream_windows, write_examples
    from .sources import SourceStats, iter_examples, source_kind, sources_fingerprint
    from .common.device import resolve_device, resolve_dtype
    from .teacher import load_teacher, load_tokenizer, teacher_record
    from .format.tokenizer_id import tokenizer_record

    if not cfg.progress:
        from transformers.utils import logging

        logging.disable_progress_bar()  # the "Loading weights" bar too
    # --- inputs: corpus files, tokenizer, teacher -------------------------------------------------------------------
    local = [d for d in cfg.data if source_kind(d) in ("file", "folder")]  # also refuses a --data that is none of the kinds
    files = list_data_files(local) if local else []
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", cfg.rank)))
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    load_chat_template(tokenizer, cfg.chat_template)  # before the tokenizer's record: the dataset keeps the template
    if group is not None:
        group.join(device)  # the process group its teacher is split over
    model = load_teacher(cfg.teacher, cfg.revision, dtype, device, cfg.trust_remote_code, **cfg.load_options())
    device = input_device(model, device)  # placed by --device-map: inputs go where the embeddings are
    if group is not None and group.writer:
        print(group.describe(model), file=sys.stderr)
    head = split_head(model, cfg.head_chunk)  # None: the whole-batch head
    teacher_section = teacher_record(cfg.teacher, cfg.revision, model, dtype)  # the manifest's record; `model` runs
    layers = check_model_settings(cfg, model.config, teacher_section)
    stream = cfg.cross_document_attention
    # a probe of three forwards, here so that every rank of a --tp group runs it in step, before any writing
    if not stream and cfg.packing and not packing_masks_supported(model):
        raise UserError(f"--teacher {cfg.teacher}: this model attends across packed examples even with restarting "
                        "position ids (its attention ignores them), so --packing would let examples see each other; "
                        "pass --no-packing (one example per window) or --cross-document-attention (pretraining-style text)")
    tokenizer_section = tokenizer_record(tokenizer)

    # --- output folder: settings, resume, refusal ------------------------------------------------------------------
    settings = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher_section.name_or_path,
        "teacher_identity": path_identity(cfg.teacher, teacher_section.revision),
        "teacher_config_sha256": teacher_section.config_sha256,
        "teacher_dtype": teacher_section.dtype,
        "tokenizer_sha256": tokenizer_section.sha256,
        "corpus_fingerprint": sources_fingerprint(cfg.data, cfg.data_split, cfg.data_config),
        "text_column": cfg.text_column,
        "seq_len": cfg.seq_len,
        "max_tokens": cfg.max_tokens,
        "format": cfg.format, "data_split": cfg.data_split, "data_config": cfg.data_config, "train_on": cfg.train_on,
        "layout": layout_of(cfg), "long_examples": cfg.long_examples,
    }
    capture = Capture.build(targets=cfg.target_kinds, top_k=cfg.top_k, encoding=cfg.encoding, logprob_bits=cfg.logprob_bits,
                            compression=cfg.compression, vocab_size=teacher_section.vocab_size,
                            hidden_layers=[HiddenLayer(index=layer, width=teacher_section.hidden_size) for layer in layers],
                            samples=cfg.samples, sample_temperature=cfg.sample_temperature, seed=cfg.seed,
                            batch_size=cfg.batch_size, shard_size=cfg.shard_size, world_size=cfg.world_size,
                            log_norm_temperatures=cfg.log_norm_temperatures)
    recorded = capture.to_json()
    settings |= {k: recorded[k] for k in SETTINGS_FROM_CAPTURE if k in recorded}
    tok_dtype = capture.token_dtype
    step = lambda b, w, head: teacher_step(model, head, w, b, capture, device, stream, layers)
    if group is not None and not group.writer:  # a --tp follower: the writer's batches, the same forwards, no output
        with torch.inference_mode():
            while (message := group.receive()) is not None:
                if isinstance(message, dict):  # the writer's capture, final once its data is read
                    capture = Capture.from_json(message)
                else:
                    head = step(*message, head)[0]
        return {"rank": group.rank, "writer": False}
    exclusive, lock = cfg.world_size == 1, held[0]
    if remote:
        remote.pull(out)  # the bucket's manifest, settings and shard markers, as if they were local
    existing = prepare_output(out, settings, cfg.rank, cfg.world_size, exclusive)
    if existing is not None:
        if not exclusive and try_exclusive(lock):  # no other rank left: this one may remove leftovers
            clean_finished(out)
        if not remote and not (out / CARD).exists():  # a kill between the manifest and the card heals here
            write_card(out, existing, license=cfg.license)
        print(f"{redact(cfg.out) if remote else out}: dataset already complete ({existing['totals']['tokens']} tokens); "
              "nothing to do", file=sys.stderr)
        return existing
    progress_dir = out / PROGRESS_DIR
    if not exclusive:  # ranks share the folder; each also locks its own rank, so no rank runs twice at once
        held.append(lock_rank(progress_dir, cfg.rank, cfg.world_size))
    save_tokenizer(tokenizer, out)

    # --- examples: one pass over the data into flat files (shared by resume and every rank); windows planned from them --
    if not (progress_dir / "examples.json").exists():
        bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not cfg.progress, total=cfg.max_tokens)
        src = SourceStats()
        rows = iter_examples(cfg.data, cfg.format, cfg.text_column, cfg.data_split, cfg.data_config, src,
                             parse_storage_options(cfg.storage_options))
        tokenized = tokenize_examples(rows, tokenizer, cfg.train_on, tokenizer.eos_token_id)
        if cfg.max_tokens is not None:  # max_tokens + 1 tokens in all (as format 1): the example crossing it is cut
            tokenized = cap_stream(tokenized, cfg.max_tokens + 1)
        found = write_examples(tokenized, progress_dir, tok_dtype, None, progress=bar.update)
        bar.close()
        if src.skipped:
            print(f"skipped {src.skipped} undecodable file(s) (not UTF-8), e.g. {', '.join(src.skipped_examples)}", file=sys.stderr)
        if found["tokens"] < 2:
            raise UserError(f"--data {' '.join(cfg.data)}: the corpus is empty (no text found); check the paths, --format and --text-column")
        if found["trained"] == 0:
            raise UserError(f"--data {' '.join(cfg.data)}: no position to learn (--train-on {cfg.train_on or 'default'} "
                            "selects no token of the examples); check --train-on and the roles in the data")
        write_json_atomic(progress_dir / "examples.json", found | {"formats": src.examples, "skipped": src.skipped})
    meta = json.loads((progress_dir / "examples.json").read_text())
    tokens, trained, offsets = read_examples(progress_dir, tok_dtype)  # (N,), (N,), (E + 1,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pstats = PackingStats()
    if stream:
        n_windows = count_windows(len(tokens), cfg.seq_len)
        build = lambda b, nb: stream_windows(tokens, trained, b, nb, cfg.seq_len, pad_id)
    else:
        plan = plan_windows(np.diff(offsets), cfg.seq_len, cfg.packing, cfg.long_examples, pstats)
        n_windows = plan.windows
        build = lambda b, nb: make_windows(tokens, trained, offsets, plan, b, nb, pad_id)
    if not every_position_trained(trained, offsets, stream, pstats.padding):  # format 2: targets only where trained
        capture = replace(capture, positions="trained")  # (capture.positions; docs/FORMAT.md)
    n_shards = -(-n_windows // cfg.shard_size)
    mine = [s for s in range(n_shards) if s % cfg.world_size == cfg.rank and not (progress_dir / f"shard-{shard_name(s)}.json").exists()]

    # --- capture: teacher forward on the device, targets, background writer -----------------------------------------
    if group is not None:
        group.send_settings(capture.to_json())  # its followers compute the targets as this rank does
    writer = BackgroundWriter(out, capture, cfg.seq_len, on_shard=remote.push_shard if remote else None)
    shard_windows = lambda s: min(cfg.shard_size, n_windows - s * cfg.shard_size)
    bar = tqdm(desc=f"capture rank {cfg.rank}" if cfg.world_size > 1 else "capture", unit="tok", unit_scale=True,
               total=sum(shard_windows(s) for s in mine) * cfg.seq_len, disable=not cfg.progress)
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for s in mine:
                first, count = s * cfg.shard_size, shard_windows(s)
                writer.open(s, count)
                for b in range(first, first + count, cfg.batch_size):
                    nb = min(cfg.batch_size, first + count - b)
                    w = build(b, nb)  # input_ids, labels, loss_mask, position_ids: (B, T) each
                    if group is not None:
                        group.send(b, w)  # its followers run the same forward with it
                    input_ids, labels, loss_mask = w["input_ids"], w["labels"], w["loss_mask"]
                    head, result, rows, fidelity = step(b, w, head)
                    rows |= {"window_index": np.arange(b, b + nb), "input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                             "position_ids": w["position_ids"]}
                    hidden = {layer: result.hidden_states[layer].half().reshape(nb * cfg.seq_len, -1).cpu().numpy() for layer in layers}
                    writer.put(rows, hidden, fidelity)
                    bar.update(nb * cfg.seq_len)
                writer.close_shard()
        writer.join()
        seconds = time.perf_counter() - started
    finally:
        writer.stop()
        bar.close()

    # --- finish: this rank's marker; the manifest once every shard is present ---------------------------------------
    captured = sum(shard_windows(s) for s in mine) * cfg.seq_len
    session = Session(rank=cfg.rank, world_size=cfg.world_size, shards=len(mine), tokens=captured, seconds=round(seconds, 3),
                      tokens_per_second=round(captured / seconds, 1) if seconds > 0 and captured else None, device=str(device))
    try:
        write_json_atomic(progress_dir / f"rank-{cfg.rank:05d}-of-{cfg.world_size:05d}-{os.getpid()}.json", session.to_json())
        if remote:
            remote.exchange(progress_dir)  # every rank's markers, from the bucket
        done = [progress_dir / f"shard-{shard_name(s)}.json" for s in range(n_shards)]
        missing = sum(not p.exists() for p in done)
        if missing:
            print(f"rank {cfg.rank} done; {missing} shard(s) of other ranks still missing, manifest not written yet", file=sys.stderr)
            return {"rank": cfg.rank, "shards": n_shards, "missing": missing}
        records = [ShardRecord.from_json(json.loads(p.read_text())) for p in done]
        trained_total = sum(r.valid_tokens or 0 for r in records)
        if not stream:
            pstats.trained = trained_total
            print(f"packing: {pstats.summary()}", file=sys.stderr)
        sessions = [json.loads(p.read_text()) for p in sorted(progress_dir.glob("rank-*.json"))]
    except FileNotFoundError:
        # another rank finished at the same moment, wrote the manifest and removed _progress
        if (out / MANIFEST).exists():
            return json.loads((out / MANIFEST).read_text())
        raise
    manifest = Manifest(  # docs/FORMAT.md, "Manifest"; the sections are typed in format/sections.py
        format_version=FORMAT_VERSION,
        created_by=CreatedBy(tool="offline-distill", version=TOOL_VERSION, command=cfg.command, sessions=sessions),
        teacher=teacher_section,
        tokenizer=replace(tokenizer_section, files=tokenizer_files(out)),
        corpus=Corpus(files=[str(f) for f in files][:1000], file_count=len(files), fingerprint=settings["corpus_fingerprint"],
                      text_column=cfg.text_column, seq_len=cfg.seq_len, packing=LAYOUTS[settings["layout"]],
                      documents=meta["examples"], skipped_files=meta["skipped"], corpus_tokens=meta["tokens"],
                      max_tokens=cfg.max_tokens, layout=settings["layout"], formats=meta["formats"], train_on=cfg.train_on,
                      examples=meta["examples"], trained_tokens=trained_total, long_examples=cfg.long_examples,
                      packing_stats=None if stream else pstats.to_json()),
        capture=capture,
        settings=settings,
        schema=schema_description(capture.schema(cfg.seq_len)),
        shards=records,
        totals=Totals.of(records),
    ).to_json()
    write_card(out, manifest, license=cfg.license)  # README.md: a Hugging Face dataset card; the manifest stays last
    write_json_atomic(out / MANIFEST, manifest)
    if remote:
        remote.push_manifest(out)  # tokenizer, then the manifest, last
    shutil.rmtree(progress_dir, ignore_errors=True)
    if exclusive or try_exclusive(lock):
        clean_finished(out)
    return manifest


# corpus.layout -> corpus.packing, the description of docs/FORMAT.md
LAYOUTS = {
    "stream": "examples concatenated (EOS after each text); windows of seq_len inputs cut from the stream, labels shifted "
              "by one, examples attend to those before them; position ids 0..seq_len-1; last window padded",
    "packed": "examples placed whole into windows (first fit over the 8 most recent); position ids restart at 0 at each "
              "example, so none sees another; the rest of a window padded; longer examples split or truncated",
    "unpacked": "each example starts its own window, the rest padded; longer examples split or truncated",
}


def every_position_trained(trained: np.ndarray, offsets: np.ndarray, stream: bool, padding: int) -> bool:
    """Whether every position of every window is trained, so targets are stored at every position (`capture.positions`
    "all", the bytes of format 1): every label token trained (an example's first token is never a label; in one stream
    only the stream's first), and no padding except, in the stream layout, at the end of the last window."""
    flags = trained.astype(bool).copy()  # (N,)
    flags[:1] = True
    if not stream:
        starts = np.asarray(offsets[:-1], dtype=np.int64)
        flags[starts[starts < len(flags)]] = True
    return bool(flags.all()) and (stream or padding == 0)


def layout_of(cfg: PrecomputeConfig) -> str:
    return "stream" if cfg.cross_document_attention else "packed" if cfg.packing else "unpacked"


def cap_stream(tokenized, limit: int):
    """Tokenized examples up to `limit` tokens in all, the last one cut (format 1's --max-tokens on one stream)."""
    total = 0
    for ex in tokenized:
        n = min(len(ex.input_ids), limit - total)
        yield ex if n == len(ex.input_ids) else type(ex)(ex.input_ids[:n], ex.trained[:n])
        total += n
        if total >= limit:
            return


def batch_targets(logits, labels: np.ndarray, loss_mask: np.ndarray, first_window: int, capture: Capture, device,
                  head=None, final_hidden=None) -> tuple[dict, dict]:
    """Teacher logits (B, T, V) -> the logical arrays of every stored target kind (on host) and per-batch fidelity sums.
    With a `head` (pipeline.head.ChunkedHead), the final hidden states (B, T, H) instead of logits: same values."""
    import torch

    from .targets import FIDELITY_STRIDE, batch_generator, sampled_targets, topk_targets

    labels_t = torch.from_numpy(labels.astype(np.int64)).to(device)
    mask = torch.from_numpy(loss_mask).to(device).bool()  # (B, T)
    n_valid = int(mask.sum())
    token_type = np.dtype(capture.token_dtype)
    k = capture.top_k
    bits = capture.logprob_bits if capture.encoding == "compact" else None
    sampled = "sampled" in capture.targets
    if head is not None:
        from .head import chunked_targets

        g = batch_generator(capture.seed, first_window, device) if sampled else None
        t, s = chunked_targets(head, final_hidden, labels_t, k, bits, (capture.samples, capture.sample_temperature, g) if sampled else None,
                               capture.log_norm_temperatures)
    else:
        t = topk_targets(logits, labels_t, k, logprob_bits=bits, log_norm_temperatures=capture.log_norm_temperatures)
    rows = {"target_logprob": t["target_logprob"].cpu().numpy()}
    fidelity = {}
    if k:
        rows["topk_ids"] = t["topk_ids"].to(torch.int32).cpu().numpy().astype(token_type)
        if bits is None:
            rows["topk_logprobs"] = t["topk_logprobs"].half().cpu().numpy()
        else:
            rows |= {name: t[name].cpu().numpy() for name in ("topk_q", "topk_hi", "topk_lo")}
        if capture.log_norm_temperatures:
            rows["log_norm"] = t["log_norm"].float().cpu().numpy()  # (B, T, n) float32
        fmask = mask[:, ::FIDELITY_STRIDE]  # recon_kl is measured on a deterministic sample of positions
        fidelity |= {"topk_mass": (float(t["topk_mass"][mask].sum()), n_valid),
                  "recon_kl": (float(t["recon_kl"][fmask].sum()), int(fmask.sum()))}
    if sampled:
        if head is None:
            s = sampled_targets(logits, capture.samples, capture.sample_temperature, batch_generator(capture.seed, first_window, device))
        rows |= {"sample_ids": s["sample_ids"].to(torch.int32).cpu().numpy().astype(token_type), "sample_counts": s["sample_counts"].cpu().numpy(),
                 "sample_n": s["sample_n"].cpu().numpy(), "sample_logweights": s["sample_logweights"].cpu().numpy()}
        fidelity |= {"sample_unique": (float(s["sample_n"][mask].sum()), n_valid), "sample_mass": (float(s["sample_mass"][mask].sum()), n_valid),
                  "sample_rkl": (float(s["sample_rkl"][mask].sum()), n_valid)}
    return rows, fidelity


def teacher_step(model, head, w: dict, first_window: int, capture: Capture, device, stream: bool, layers: list[int]):
    """One batch `w` (input_ids, labels, loss_mask, position_ids: (B, T) each) through the teacher and the targets.
    Returns (head, model output, rows, fidelity); head is None from the batch where the split head failed its check.
    Every rank of a --tp group runs it on the same batch: each forward is a collective of the group."""
    import torch

    labels, loss_mask = w["labels"], w["loss_mask"]
    ids = torch.from_numpy(np.asarray(w["input_ids"]).astype(np.int64)).to(device)
    # no attention mask: from restarting position ids transformers builds a block-diagonal causal mask
    pos = None if stream else torch.from_numpy(np.asarray(w["position_ids"]).astype(np.int64)).to(device)
    if head is not None and not head.verified:  # first batch: the split head must give the model's logits
        head = head if head.check(ids) else None
    if head is not None:  # body to final hidden states; head and targets a chunk of tokens at a time
        result = head.body_forward(ids, bool(layers), position_ids=pos)
        rows, fidelity = batch_targets(None, labels, loss_mask, first_window, capture, device, head=head,
                                       final_hidden=result.last_hidden_state)
    else:
        result = model(input_ids=ids, position_ids=pos, output_hidden_states=bool(layers), use_cache=False)
        rows, fidelity = batch_targets(result.logits, labels, loss_mask, first_window, capture, device)
    return head, result, rows, fidelity


def input_device(model, device):
    """Where input ids go: `device`, or for a model placed by --device-map the device of its first placed module."""
    import torch

    placed = getattr(model, "hf_device_map", None)  # only set when loaded with a device_map
    if not placed:
        return device
    first = next(iter(placed.values()))
    if isinstance(first, int):
        return torch.device("cuda", first)
    return torch.device("cpu" if first == "disk" else first)


def split_head(model, chunk: int):
    """The chunked head for --head-chunk N (pipeline/head.py), or None for 0 or a head that cannot be split (notice)."""
    if not chunk:
        return None
    from .head import ChunkedHead

    head, why = ChunkedHead.split(model, chunk)
    if head is None:
        print(f"--head-chunk: {why}; using the whole-batch head", file=sys.stderr)
    return head


def check_model_settings(cfg: PrecomputeConfig, config, teacher: Teacher) -> list[int]:
    """Check k, layers and seq-len against the teacher; return the hidden layers as non-negative indices."""
    problems = []
    if cfg.top_k > teacher.vocab_size:
        problems.append(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({teacher.vocab_size}); pass at most {teacher.vocab_size}")
    limit = teacher.max_position_embeddings
    if limit is not None and cfg.seq_len > limit:
        problems.append(f"--seq-len {cfg.seq_len} is above the teacher's maximum positions ({limit}); pass --seq-len {limit} or less")
    n_states = teacher.num_hidden_layers + 1  # hidden_states = embeddings + one per layer
    layers = []
    for layer in cfg.hidden_layers:
        if not -n_states <= layer < n_states:
            problems.append(f"--hidden-layers {layer} is out of range; the teacher has {n_states} hidden states, valid: {-n_states}..{n_states - 1}")
        else:
            layers.append(layer % n_states)
    if len(set(layers)) != len(layers):
        problems.append(f"--hidden-layers {cfg.hidden_layers} names a layer twice")
    if problems:
        raise UserError("; ".join(problems))
    return sorted(layers)


def prepare_output(out: Path, settings: dict, rank: int = 0, world_size: int = 1, exclusive: bool = True) -> dict | None:
    """Create or resume the output folder. Returns the manifest when the dataset is already complete.

    Refuses a folder holding something else, a symlink or special file, or a capture made with other settings (naming
    each that differs). A folder holding only what a run killed before recording its settings leaves is reused.
    `exclusive`: this process is the only writer (holds the exclusive lock), so leftovers of killed runs are removed.
    """
    manifest_path, progress = out / MANIFEST, out / PROGRESS_DIR
    refuse_links(out)  # never write through a link (e.g. `shards` pointing elsewhere)
    # judged before looking for settings.json: another rank may record its settings in between, and once there they stay
    foreign = any(out.iterdir()) and not only_leftovers(out, (PROGRESS_DIR, SHARDS_DIR))
    previous = None
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except ValueError:
            raise UserError(f"--out {out}: its {MANIFEST} is not valid JSON; choose another --out folder")
        old = previous.get("settings", {}) if isinstance(previous, dict) else None
        if not isinstance(old, dict):
            raise UserError(f"--out {out}: its {MANIFEST} is not a distill manifest; choose another --out folder")
    elif (progress / "settings.json").exists():
        try:
            old = json.loads((progress / "settings.json").read_text())
        except ValueError:
            raise UserError(f"--out {out}: {PROGRESS_DIR}/settings.json is not valid JSON; delete the folder's contents or "
                            "choose another --out")
    elif foreign:
        raise UserError(f"--out {out} is not empty and holds no distill dataset; choose an empty or new folder")
    else:
        old = None
    if old is not None:
        # keys an older capture did not record are not compared; typed names are recorded, identities compared
        differ = [k for k in sorted(set(old) | set(settings)) if (k in old or k in COMPARED_WHEN_ABSENT)
                  and k not in NOT_COMPARED and old.get(k) != settings.get(k)]
        if differ:
            detail = ", ".join(f"{k}: {old.get(k)!r} → {settings.get(k)!r}" for k in differ)
            raise UserError(f"--out {out} holds a capture made with other settings ({detail}); rerun with the same settings or choose another --out")
        if previous is not None:
            if exclusive:
                clean_finished(out)
            return previous
    if exclusive:
        remove_leftovers(out, (PROGRESS_DIR, SHARDS_DIR))
    progress.mkdir(parents=True, exist_ok=True)
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    mine = lambda name: name[:SHARD_NAME_DIGITS].isdigit() and int(name[:SHARD_NAME_DIGITS]) % world_size == rank
    remove_temp_files(out / SHARDS_DIR, mine)
    if not (progress / "settings.json").exists():
        write_json_atomic(progress / "settings.json", settings)
    return None


def clean_finished(out: Path) -> None:
    """A finished dataset keeps only what its manifest names: `_progress/` and temp leftovers of killed runs go
    (docs/FORMAT.md). Only for the sole writer of the folder."""
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    remove_leftovers(out, (SHARDS_DIR,))


def save_tokenizer(tokenizer, out: Path) -> None:
    """Store the teacher's tokenizer in the dataset: students need it, and it defines what the token ids mean."""
    final = out / "tokenizer"
    if final.exists():
        return
    tmp = out / f"tokenizer.tmp-{os.getpid()}"
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another rank got there first
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_files(out: Path) -> dict[str, FileMeta]:
    """The saved tokenizer folder's files with checksum and size (the manifest's `tokenizer.files`)."""
    folder = out / "tokenizer"
    return {rel: FileMeta(sha256=sha256_file(folder / rel), bytes=(folder / rel).stat().st_size) for rel in list_files(folder)}
