"""axolotl interop: export to the KD plugin's v2 rows, import them back; the round trip gives the same training batches."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.common.cli import main
from pipeline.common.errors import UserError
from pipeline.format import open_dataset, verify_dataset
from pipeline.interop_axolotl import export_axolotl, import_axolotl
from trainer.data import WindowReader

T, K = 16, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher_dir, corpus_dir):
    """21 windows in shards of 8, the last one padded (the corpus is cut at 20*16 + 5 predicted tokens)."""
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    out = tmp_path_factory.mktemp("axo") / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=T, top_k=K,
                                batch_size=8, shard_size=8, max_tokens=20 * T + 5, progress=False,
                                cross_document_attention=True))  # axolotl rows: one stream, labels the next inputs
    return out


@pytest.fixture(scope="module")
def exported_full(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("axo-out") / "full"
    export_axolotl(str(dataset), str(out), logprobs="full")
    return out


def rows_of(folder) -> dict:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((folder / "data").glob("*.parquet")))
    return {name: table.column(name).to_pylist() for name in table.column_names}


def batches(path, **kw):
    reader = WindowReader(str(path), batch_size=5, epochs=1, **kw)
    return list(reader)


def test_round_trip_gives_the_same_training_batches(dataset, exported_full, tmp_path, tokenizer_dir):
    back = tmp_path / "back"
    import_axolotl(str(exported_full), str(back), str(exported_full / "tokenizer"))
    verify_dataset(str(back))  # checksums, schema, values and the packing rules all hold
    a, b = open_dataset(str(dataset)), open_dataset(str(back))
    assert (b.seq_len, b.top_k, b.windows, b.vocab_size) == (a.seq_len, a.top_k, a.windows, a.vocab_size)
    assert b.manifest.tokenizer.sha256 == a.manifest.tokenizer.sha256
    assert b.manifest.teacher.name_or_path == a.manifest.teacher.name_or_path
    for shuffle in (False, True):
        original, imported = batches(dataset, shuffle=shuffle, seed=3), batches(back, shuffle=shuffle, seed=3)
        assert len(original) == len(imported) == 5
        for x, y in zip(original, imported):
            assert x.keys() == y.keys()
            for key in x:
                if key.startswith("teacher_"):  # the import stores targets only where trained (format 2): equal there
                    mask = x["loss_mask"]
                    assert torch.equal(x[key][mask], y[key][mask]), key
                    assert not mask.all() or torch.equal(x[key], y[key]), key
                elif isinstance(x[key], torch.Tensor):
                    assert torch.equal(x[key], y[key]), key
                else:
                    assert x[key] == y[key], key
        if not shuffle:  # the padded last window came back too
            assert not imported[-1]["loss_mask"][-1].all()


def test_export_follows_axolotls_contract(dataset, exported_full, teacher_dir):
    rows = rows_of(exported_full)
    ds = open_dataset(str(dataset))
    assert set(rows) == {"input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"}
    assert len(rows["input_ids"]) == ds.windows == 21
    shard = ds.shards[0]
    ids, lp = shard.sparse_targets("topk")
    inputs, labels = shard.column("input_ids"), shard.column("labels")
    row = 3
    assert rows["input_ids"][row] == inputs[row].tolist() + [int(labels[row, -1])]  # T + 1 tokens
    assert rows["labels"][row] == [-100] + labels[row].tolist()  # unshifted: labels[t+1] is what position t predicts
    assert [m[0] for m in rows["target_mask"][row]] == [1] * T + [0]
    np.testing.assert_array_equal(np.asarray(rows["target_token_ids"][row][:T]), ids[row])
    np.testing.assert_array_equal(np.asarray(rows["target_logprobs"][row][:T], np.float32), lp[row])
    # independent check of the alignment: the teacher run on the row's tokens ranks target_token_ids[t] at position t
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([rows["input_ids"][row][:T]])).logits[0]  # (T, V)
    top = logits.topk(K, dim=-1).indices
    assert torch.equal(top[:, 0], torch.tensor([t[0] for t in rows["target_token_ids"][row][:T]]))
    # the last row ends in padding: padded tokens are neither attended, labelled nor targeted
    last = -1
    mask = ds.shards[-1].column("loss_mask")[-1].astype(bool)
    n = int(mask.sum())
    assert 0 < n < T
    assert rows["attention_mask"][last] == [1] * (n + 1) + [0] * (T - n)
    assert rows["labels"][last][n + 1:] == [-100] * (T - n)
    assert [m[0] for m in rows["target_mask"][last]] == [1] * n + [0] * (T + 1 - n)


def test_export_renormalized_and_temperature(dataset, tmp_path):
    ds = open_dataset(str(dataset))
    _, lp = ds.shards[0].sparse_targets("topk")  # (W, T, K)
    for temperature in (1.0, 2.0):
        out = tmp_path / f"t{temperature}"
        export_axolotl(str(dataset), str(out), temperature=temperature)
        got = np.asarray(rows_of(out)["target_logprobs"][:8], np.float32)[:, :T]  # (8, T, K)
        p = np.exp(lp.astype(np.float64) / temperature)
        expected = np.log(p / p.sum(-1, keepdims=True))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
        assert f"kd_temperature: {temperature:g}" in (out / "README.md").read_text()


def test_export_folder_loads_with_datasets(exported_full, tmp_path):
    import datasets

    rows = datasets.load_dataset(str(exported_full), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(rows) == 21
    assert rows.column_names == ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"]
    info = json.loads((exported_full / "distill_export.json").read_text())
    assert info["logprobs"] == "full" and info["seq_len"] == T and info["top_k"] == K


def test_import_of_chat_rows_from_another_team(tmp_path, tokenizer_dir):
    """Rows as another team has them: variable lengths, masked prompt positions, fewer ids at some positions, unsorted."""
    rng = np.random.default_rng(0)
    rows = []
    for length in (7, 12, 5):
        n_prompt = 2
        tids, tlps, tmask = [], [], []
        for t in range(length):
            ids = rng.choice(300, size=4, replace=False).tolist()
            lp = np.log(rng.dirichlet(np.ones(5))[:4]).tolist()
            m = [0] * 4 if t < n_prompt or t == length - 1 else [1, 1, 1, 0 if t == 3 else 1]
            tids.append(ids), tlps.append(lp), tmask.append(m)
        tokens = rng.integers(0, 300, size=length).tolist()
        rows.append({"input_ids": tokens, "attention_mask": [1] * length, "labels": [-100] * n_prompt + tokens[n_prompt:],
                     "target_token_ids": tids, "target_logprobs": tlps, "target_mask": tmask})
    src = tmp_path / "theirs"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), src / "part-0.parquet")
    out = tmp_path / "ours"
    manifest = import_axolotl(str(src), str(out), str(tokenizer_dir), shard_size=2)
    assert manifest["corpus"]["seq_len"] == 11 and manifest["capture"]["top_k"] == 4 and manifest["totals"]["windows"] == 3
    batch = next(iter(WindowReader(str(out), batch_size=3, epochs=1, shuffle=False)))
    mask = batch["loss_mask"]
    assert mask[0].tolist() == [False, False, True, True, True, True] + [False] * 5  # prompt, targets, end of row, padding
    assert mask[2].tolist()[:4] == [False, False, True, True] and not mask[2, 4:].any()
    t = 3  # one id masked out: three stored, sorted most probable first, the slot left empty (-inf)
    r0 = rows[0]
    keep = np.asarray(r0["target_mask"][t], bool)
    want_ids = np.asarray(r0["target_token_ids"][t])[keep]
    want_lp = np.asarray(r0["target_logprobs"][t], np.float32)[keep]
    order = np.argsort(-want_lp)
    assert batch["teacher_ids"][0, t, :3].tolist() == want_ids[order].tolist()
    np.testing.assert_allclose(batch["teacher_logprobs"][0, t, :3].numpy(), want_lp[order].astype(np.float16).astype(np.float32))
    assert batch["teacher_logprobs"][0, t, 3].item() == float("-inf")
    assert batch["labels"][0, 2].item() == r0["input_ids"][3]  # position t is trained on token t+1
    assert batch["input_ids"][2, 5:].eq(open_dataset(str(out)).manifest.tokenizer.pad_token_id).all()
    # format 2: targets stored only at the trained positions, one entry per loss_mask 1 of each window
    shard = open_dataset(str(out)).shards[0]
    assert shard.dataset.capture.positions == "trained"
    np.testing.assert_array_equal(shard.stored_counts("topk_ids"), shard.column("loss_mask").sum(1))
    assert shard.stored_counts("topk_ids").tolist() == [4, 9]  # rows of 7 and 12 tokens: first 2 and last untrained


def test_round_trip_of_a_packed_dataset_with_untrained_positions(teacher_dir, corpus_dir, tmp_path):
    """A packed capture (padding untrained, targets stored only where trained) exports and imports back to the same
    inputs, labels, masks and teacher targets at every trained position (axolotl rows carry no position ids)."""
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    src, out, back = tmp_path / "ds", tmp_path / "axo", tmp_path / "back"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(src), seq_len=T, top_k=K,
                                max_tokens=200, progress=False))
    assert open_dataset(str(src)).capture.positions == "trained"
    export_axolotl(str(src), str(out), logprobs="full")
    import_axolotl(str(out), str(back), str(out / "tokenizer"))
    verify_dataset(str(back))
    original, imported = batches(src, shuffle=False), batches(back, shuffle=False)
    assert len(original) == len(imported) > 0
    assert not all(x["loss_mask"].all() for x in original)  # padding: untrained positions exist
    for x, y in zip(original, imported):
        mask = x["loss_mask"]
        for key in ("labels", "loss_mask"):
            assert torch.equal(x[key], y[key]), key
        for key in ("input_ids", "teacher_ids", "teacher_logprobs"):  # inputs: the export puts an example's last label
            # back as the next token (rows carry no position ids), so padding inputs may differ
            assert torch.equal(x[key][mask], y[key][mask]), key


def test_refusals(dataset, exported_full, tmp_path, tokenizer_dir):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        export_axolotl(str(dataset), str(busy))
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="needs --logprobs renormalized"):
        export_axolotl(str(dataset), str(tmp_path / "x"), logprobs="full", temperature=2.0)
    with pytest.raises(UserError, match="writing to a URL is not supported"):
        export_axolotl(str(dataset), "s3://bucket/x")
    with pytest.raises(UserError, match="holds no .parquet files"):
        import_axolotl(str(tokenizer_dir), str(tmp_path / "y"), str(tokenizer_dir))
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"input_ids": [[1, 2, 3]]}), bad / "x.parquet")
    with pytest.raises(UserError, match="no column target_token_ids"):
        import_axolotl(str(bad), str(tmp_path / "z"), str(tokenizer_dir))
    with pytest.raises(UserError, match="more than --seq-len 4"):
        import_axolotl(str(exported_full), str(tmp_path / "w"), str(tokenizer_dir), seq_len=4)
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob(".w.tmp-*"))


def test_cli_export_and_import(dataset, tmp_path):
    runner = CliRunner()
    out = tmp_path / "axo"
    res = runner.invoke(main, ["export", str(dataset), "--to", "axolotl", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "21 rows" in res.output and (out / "README.md").exists()
    back = tmp_path / "back"
    res = runner.invoke(main, ["import", str(out), "--from", "axolotl", "--tokenizer", str(out / "tokenizer"), "--out", str(back)])
    assert res.exit_code == 0, res.output
    assert open_dataset(str(back)).windows == 21
    res = runner.invoke(main, ["export", str(dataset), "--to", "axolotl", "--out", str(out)])
    assert res.exit_code == 2 and "exists and is not an empty folder" in res.output
