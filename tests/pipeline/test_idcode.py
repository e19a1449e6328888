"""Entropy-coded top-k ids of the compact encoding (pipeline/format/idcode.py, docs/FORMAT.md "Compact encoding"):
round trips, the teacher's own top-k read back from a real compact capture, compact datasets of the older "packed"
id layout still reading and verifying, and crafted id blobs refused by `verify` with one line."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline.common.cli import main
from pipeline.common.errors import FormatError
from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset, verify_dataset
from pipeline.format.bitpack import pack_bits, read_bits, unpack_bits, write_bits
from pipeline.format.idcode import HEADER, IdCodeError, best_order, decode_sorted_ids, encode_sorted_ids
from pipeline.precompute import precompute

from .test_crafted_datasets import resign
from .test_format_doc import DOC

T, K = 16, 8


def random_sets(rng, P: int, K: int, vocab: int, skew: float) -> np.ndarray:
    """(P, K) distinct ids per row, ascending, drawn with a preference for low ids (like a BPE teacher's)."""
    p = np.exp(-skew * np.arange(vocab) / vocab)
    p /= p.sum()
    return np.sort(np.stack([rng.choice(vocab, K, replace=False, p=p) for _ in range(P)]), 1) if P else np.zeros((0, K), int)


@pytest.mark.parametrize("vocab,k,skew", [(8192, 64, 8.0), (8192, 64, 0.0), (320, 8, 2.0), (50257, 16, 20.0), (2, 2, 0.0), (70000, 1, 1.0)])
def test_round_trip(vocab, k, skew):
    rng = np.random.default_rng(vocab + k)
    for P in (0, 1, 37):
        ids = random_sets(rng, P, k, vocab, skew)
        blob = encode_sorted_ids(ids)
        np.testing.assert_array_equal(decode_sorted_ids(blob, P, k, vocab), ids.reshape(P, k))
    # the extremes: the K lowest ids (every gap 0) and the K highest (one long first gap)
    for ids in (np.arange(k)[None], np.arange(vocab - k, vocab)[None]):
        np.testing.assert_array_equal(decode_sorted_ids(encode_sorted_ids(ids), 1, k, vocab), ids)


def test_blob_layout_and_size():
    """The header says the order and the prefix length; a skewed set codes far below id_bits per id, a uniform one
    near the information bound log2 C(V, K), and the writer's order is the cheapest."""
    rng = np.random.default_rng(0)
    V, K64, P = 8192, 64, 64
    skewed, uniform = random_sets(rng, P, K64, V, 12.0), random_sets(rng, P, K64, V, 0.0)
    for ids in (skewed, uniform):
        blob = encode_sorted_ids(ids)
        k, L = blob[0], int.from_bytes(blob[1:HEADER], "little")
        prefix = np.unpackbits(np.frombuffer(blob[HEADER : HEADER + L], np.uint8), bitorder="little")
        assert prefix.sum() == P * K64 and prefix[-8:].any()  # one 1 per id; no empty trailing byte
        gaps = (np.diff(ids, axis=1, prepend=-1) - 1).reshape(-1)
        assert k == best_order(gaps)
        bits = lambda order: int(sum(2 * (int(g + (1 << order)).bit_length() - 1) - order + 1 for g in gaps))
        assert all(bits(k) <= bits(o) for o in range(17))
        prefix_bits = int(np.flatnonzero(prefix)[-1]) + 1  # sum(m + 1)
        assert len(blob) == HEADER + math.ceil(prefix_bits / 8) + math.ceil((bits(k) - prefix_bits) / 8)
    bound = (math.lgamma(V + 1) - math.lgamma(K64 + 1) - math.lgamma(V - K64 + 1)) / math.log(2) / 8  # bytes a set
    assert len(encode_sorted_ids(uniform)) / P < 1.15 * bound < 13 * K64 / 8
    assert len(encode_sorted_ids(skewed)) / P < 0.6 * 13 * K64 / 8


def test_variable_width_bits_round_trip():
    rng = np.random.default_rng(1)
    widths = rng.integers(0, 58, 500)
    values = np.array([int(rng.integers(0, 1 << int(w))) if w else 0 for w in widths], np.uint64)
    data = write_bits(values, widths)
    assert len(data) == math.ceil(widths.sum() / 8)
    np.testing.assert_array_equal(read_bits(data, np.cumsum(widths) - widths, widths), values)
    q = rng.integers(0, 1 << 13, 1000)
    np.testing.assert_array_equal(unpack_bits(pack_bits(q, 13), 13, 1000), q)
    with pytest.raises(ValueError, match="fewer than"):
        unpack_bits(pack_bits(q, 13)[:-1], 13, 1000)


def with_prefix_byte(byte: int, at_end: bool = True):
    """Insert one byte into the prefix section (at its end or its start) and count it in L."""
    def edit(b: bytes) -> bytes:
        L = int.from_bytes(b[1:HEADER], "little")
        prefix = b[HEADER : HEADER + L] + bytes([byte]) if at_end else bytes([byte]) + b[HEADER : HEADER + L]
        return b[:1] + (L + 1).to_bytes(4, "little") + prefix + b[HEADER + L :]
    return edit


def long_prefix(b: bytes) -> bytes:
    """64 more zero bits before the first gap's terminating one: a suffix wider than any id."""
    L = int.from_bytes(b[1:HEADER], "little")
    return b[:1] + (L + 8).to_bytes(4, "little") + bytes(8) + b[HEADER:]


@pytest.mark.parametrize("blob_edit,message", [
    (lambda b: b[:3], "3 bytes, shorter than the 5-byte header"),
    (lambda b: bytes([33]) + b[1:], "order 33, expected at most 32"),
    (lambda b: b[:1] + (len(b)).to_bytes(4, "little") + b[HEADER:], "runs past the blob"),
    (lambda b: b[:-1], r"suffix section of \d+ bytes, expected \d+"),
    (lambda b: b + b"\0", r"suffix section of \d+ bytes, expected \d+"),
    (with_prefix_byte(1), "prefix section codes 33 ids, expected 32 [(]4 positions of 8[)]"),
    (with_prefix_byte(0), r"prefix section of \d+ bytes, its codes end in byte \d+"),
    (long_prefix, "a gap code of 6\\d suffix bits, expected at most 57"),
])
def test_malformed_blobs_are_refused(blob_edit, message):
    ids = np.stack([np.sort(np.random.default_rng(i).choice(300, 8, replace=False)) for i in range(4)])
    blob = encode_sorted_ids(ids)
    np.testing.assert_array_equal(decode_sorted_ids(blob, 4, 8, 320), ids)
    with pytest.raises(IdCodeError, match=message):
        decode_sorted_ids(blob_edit(blob), 4, 8, 320)


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(IdCodeError, match="id 295 at stored position 0 is outside the vocabulary of 290"):
        decode_sorted_ids(encode_sorted_ids(np.array([[0, 1, 2, 3, 4, 5, 6, 295]])), 1, 8, 290)
    with pytest.raises(IdCodeError, match="gap 300 at stored position 1 is outside the vocabulary of 290"):
        decode_sorted_ids(encode_sorted_ids(np.array([[0, 1], [300, 301]])), 2, 2, 290)


# --- real captures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compact(tmp_path_factory, teacher_dir, corpus_dir):
    out = tmp_path_factory.mktemp("idcode") / "compact"
    m = precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=T, top_k=K,
                                    batch_size=4, shard_size=5, max_tokens=395, progress=False, encoding="compact",
                                    dtype="float32", device="cpu"))
    return out, m


def test_decoded_targets_are_the_teachers_top_k(compact, teacher_dir):
    """The ids and log-probs read back from the entropy-coded blobs are the teacher's top-k, computed here by running
    the teacher on the stored windows; ranks agree but among equal quantized values."""
    import torch
    from transformers import AutoModelForCausalLM

    path, m = compact
    assert m["capture"]["topk_id_coding"] == "sorted_expgolomb" and m["capture"]["positions"] == "trained"
    bits = m["capture"]["logprob_bits"]
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    checked = 0
    for shard in open_dataset(path).shards:
        ids, lp = shard.sparse_targets("topk")  # (W, T, K)
        stored = shard.stored_mask()
        with torch.no_grad():
            logits = model(torch.from_numpy(shard.column("input_ids").astype(np.int64)),
                           position_ids=torch.from_numpy(shard.column("position_ids").astype(np.int64))).logits
        ref = torch.log_softmax(logits.float(), -1).topk(K + 1, dim=-1)
        ref_lp, ref_ids = ref.values.numpy(), ref.indices.numpy()  # (W, T, K + 1)
        clear = (ref_lp[..., K - 1] - ref_lp[..., K] > 1e-4) & stored  # no near-tie at the top-k boundary
        assert clear.sum() > 0.9 * stored.sum()
        np.testing.assert_array_equal(np.sort(ids, -1)[clear], np.sort(ref_ids[..., :K], -1)[clear])
        hi, lo = shard.column("topk_logprob_hi").astype(np.float32), shard.column("topk_logprob_lo").astype(np.float32)
        step = (hi - lo) / ((1 << bits) - 1)  # (W, T): the stored grid
        slot = np.argmax(ref_ids[..., None, :K] == ids[..., :, None], -1)  # (W, T, K): each decoded id's exact rank
        exact = np.take_along_axis(ref_lp[..., :K], slot, -1)
        err = np.abs(lp - exact)[clear]  # (n, K)
        assert (err <= step[clear][:, None] / 2 + 1e-4).all()
        assert (lp[..., 1:] <= lp[..., :-1]).all()
        # where no two decoded values are equal, the order is the teacher's rank order exactly
        tie_free = clear & (lp[..., 1:] < lp[..., :-1]).all(-1)
        assert tie_free.sum() > 0.5 * clear.sum()
        np.testing.assert_array_equal(ids[tie_free], ref_ids[..., :K][tie_free])
        checked += int(clear.sum())
    assert checked > 300
    verify_dataset(path)


def to_packed_layout(src, dst) -> None:
    """Rewrite a compact dataset as the code before topk_id_coding wrote it: ids packed at id_bits in rank order, q
    in that order, no manifest key; re-signed."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    cap = m["capture"]
    for rec in open_dataset(src).shards:
        path = dst / "shards" / f"{rec.name}.arrow"
        table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()
        ids, _ = rec.sparse_targets("topk")
        stored = rec.stored_mask()
        L = (1 << cap["logprob_bits"]) - 1
        hi, lo = rec.column("topk_logprob_hi").astype(np.float32), rec.column("topk_logprob_lo").astype(np.float32)
        _, lp = rec.sparse_targets("topk")
        lp = np.where(stored[..., None], lp, hi[..., None])  # (W, T, K); positions without targets are not written
        q = np.rint((lp - hi[..., None]) / np.where(lo < hi, lo - hi, 1)[..., None] * L).astype(np.int64)
        id_blobs = [pack_bits(ids[w][stored[w]], cap["id_bits"]) for w in range(len(ids))]
        q_blobs = [pack_bits(q[w][stored[w]], cap["logprob_bits"]) for w in range(len(ids))]
        for name, blobs in (("topk_ids_packed", id_blobs), ("topk_logprobs_packed", q_blobs)):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), pa.array(blobs, pa.binary()))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    del cap["topk_id_coding"]
    (dst / "manifest.json").write_text(json.dumps(m))
    resign(dst)


def test_a_compact_dataset_of_the_packed_layout_still_reads_and_verifies(compact, tmp_path):
    path, m = compact
    old = tmp_path / "old"
    to_packed_layout(path, old)
    assert "topk_id_coding" not in json.loads((old / "manifest.json").read_text())["capture"]
    verify_dataset(old)
    a, b = open_dataset(path), open_dataset(old)
    assert b.capture.topk_id_coding == "packed"
    for sa, sb in zip(a.shards, b.shards):
        for x, y in zip(sa.sparse_targets("topk"), sb.sparse_targets("topk")):
            np.testing.assert_array_equal(x, y)
    assert b.shards[0].table.column("topk_ids_packed")[0].as_py() != a.shards[0].table.column("topk_ids_packed")[0].as_py()
    # the independent reader of docs/FORMAT.md reads both layouts to the same targets
    block = next(x for x in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "unpack(" in x)
    for root in (path, old):
        scope: dict = {}
        exec(block.replace('root = "DATASET"', f'root = "{root}"'), scope)
        ids, lp = a.shards[0].sparse_targets("topk")
        stored = a.shards[0].stored_mask()
        np.testing.assert_array_equal(scope["topk_ids"][stored], ids[stored])
        np.testing.assert_allclose(scope["topk_logprobs"][stored], lp[stored], atol=1e-6)


def crafted(path, tmp_path, edit):
    """A copy of the compact dataset whose window-1 id blob of shard 0 is `edit(blob)`, re-signed."""
    ds = tmp_path / "ds"
    shutil.copytree(path, ds)
    arrow = ds / "shards" / "00000.arrow"
    table = pa.ipc.open_stream(pa.BufferReader(arrow.read_bytes())).read_all()
    i = table.schema.get_field_index("topk_ids_packed")
    blobs = table.column(i).to_pylist()
    blobs[1] = edit(blobs[1])
    table = table.set_column(i, table.schema.field(i), pa.array(blobs, pa.binary()))
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    resign(ds)
    return ds


def out_of_vocab(blob: bytes) -> bytes:
    """The same window with every id of its first stored position raised by 320 (the vocabulary), re-encoded."""
    ids = decode_sorted_ids(blob, PER_WINDOW, K, 1 << 20)
    return encode_sorted_ids(ids + 320 * (np.arange(len(ids)) == 0)[:, None])


PER_WINDOW = T  # window 1 of the capture below is full (its loss_mask all 1)


@pytest.mark.parametrize("edit,message", [
    (lambda b: b[:-1], r"window 1: suffix section of \d+ bytes, expected \d+"),
    (lambda b: b[:2], "window 1: 2 bytes, shorter than the 5-byte header"),
    (lambda b: bytes([200]) + b[1:], "window 1: Exp-Golomb order 200, expected at most 32"),
    (with_prefix_byte(1), rf"window 1: prefix section codes {T * K + 1} ids, expected {T * K}"),
    (out_of_vocab, r"window 1: gap 3\d\d at stored position 0 is outside the vocabulary of 320"),
])
def test_verify_refuses_crafted_id_blobs_with_one_line(compact, tmp_path, edit, message):
    ds = crafted(compact[0], tmp_path, edit)
    with pytest.raises(FormatError, match="00000.arrow: column topk_ids_packed: " + message):
        verify_dataset(ds)
    r = CliRunner().invoke(main, ["verify", str(ds)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and "topk_ids_packed" in r.output


def test_manifest_refuses_an_unknown_id_coding(compact, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(compact[0], ds)
    m = json.loads((ds / "manifest.json").read_text())
    m["capture"]["topk_id_coding"] = "huffman"
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"`capture.topk_id_coding` is 'huffman', expected one of \['packed', 'sorted_expgolomb'\]"):
        open_dataset(ds)


def test_a_capture_begun_with_packed_ids_is_not_resumed_with_sorted_ones(tmp_path, teacher_dir, corpus_dir):
    """Resuming into a folder whose settings lack topk_id_coding (written before it existed) would mix two id codings
    in one dataset: refused, naming the setting."""
    from pipeline.common.errors import UserError

    cfg = dict(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(tmp_path / "o"), seq_len=T, top_k=K,
               batch_size=4, shard_size=5, max_tokens=100, progress=False, encoding="compact", device="cpu")
    m = precompute(PrecomputeConfig(**cfg))
    assert m["settings"]["topk_id_coding"] == "sorted_expgolomb"
    path = tmp_path / "o" / "manifest.json"
    del m["settings"]["topk_id_coding"], m["capture"]["topk_id_coding"]
    path.write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"other settings \(topk_id_coding: None → 'sorted_expgolomb'\)"):
        precompute(PrecomputeConfig(**cfg))
