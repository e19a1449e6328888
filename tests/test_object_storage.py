"""Datasets in object storage, against a real S3-compatible server (moto's standalone server, tests/s3_server.py):
precompute to a bucket (staged, uploaded, manifest last), resume from the bucket's state after SIGKILL, ranks without a
shared disk, train/eval/inspect/verify reading through the bounded local cache, and no credential in any output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from click.testing import CliRunner

from pipeline.common.cli import main
from pipeline.common.errors import FormatError, UserError
from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset, verify_dataset
from pipeline.format.remote import is_url, redact_command, refuse_url
from pipeline.precompute import precompute
from tests.s3_server import SECRET_KEY, s3_server
from tests.trainer.conftest import dataset_dir  # noqa: F401  (a fixture: 3 shards with hidden states)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(seq_len=16, top_k=4, max_tokens=600, shard_size=8, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        yield env


def bucket():
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.invalidate_cache()
    return fs


def shard_checksums(url) -> dict:
    return {s.name: {k: v.sha256 for k, v in s.files.items()} for s in open_dataset(url).shards}


def grep_tree(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_url_detection_and_refusal(tmp_path, monkeypatch):
    assert is_url("s3://b/p") and is_url("gs://b") and is_url("hf://datasets/x") and is_url("simplecache::s3://b")
    assert not is_url("/tmp/x") and not is_url("file:///tmp/x") and not is_url("runs/s1")
    with pytest.raises(UserError, match=r"--out s3://teams/run is a URL, but `distill train` writes only to a local folder"):
        refuse_url("s3://teams/run", "--out", "train")
    assert redact_command(["distill", "--storage-options", '{"secret": "x"}', "--out", "s3://k:pw@b/p"]) == \
        ["distill", "--storage-options", "***", "--out", "s3://***@b/p"]
    assert redact_command(["--storage-options={\"secret\": 1}"]) == ["--storage-options=***"]
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["train", "--data", "x", "--out", "s3://teams/run", "--student-config", "c.json"])
    assert r.exit_code == 2 and "is a URL, but `distill train` writes only to a local folder" in r.output
    for args in (["export", "ds", "--to", "axolotl", "--out", "s3://teams/rows"], ["report", "ds", "--out", "s3://teams/pics"],
                 ["import", "rows", "--from", "axolotl", "--tokenizer", "tok", "--out", "gs://teams/ds"],
                 ["train", "--data", "x", "--out", "runs/a", "--cache-dir", "s3://teams/cache", "--student-config", "c.json"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "is a URL" in r.output, (args, r.output)
    with pytest.raises(UserError, match=r"--stage-dir s3://teams/stage is a URL"):
        PrecomputeConfig(teacher="t", data=["d"], out="s3://teams/ds", stage_dir="s3://teams/stage").resolve()
    with pytest.raises(UserError, match=r"--storage-options is not valid JSON"):
        PrecomputeConfig(teacher="t", data=["d"], out="s3://teams/ds", storage_options="{secret").resolve()
    assert not any(tmp_path.iterdir())  # no folder named `s3:` or `gs:`


def test_precompute_to_a_bucket_equals_a_local_capture(s3, tmp_path, teacher_dir, corpus_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "local"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=f"file://{local}", **SMALL))
    assert (local / "manifest.json").exists() and not (tmp_path / "file:").exists()  # file://PATH is PATH
    stage = tmp_path / "stage"
    m = precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out="s3://teams/eq", stage_dir=str(stage), **SMALL))
    n = open_dataset(local).manifest.totals.shards
    assert m["totals"]["shards"] == n > 2
    fs = bucket()
    names = sorted(p.split("/", 2)[2] for p in fs.find("teams/eq"))
    assert "manifest.json" in names and not any(n.startswith("_progress") for n in names)
    assert sorted(n for n in names if n.startswith("shards/")) == [f"shards/{i:05d}.arrow" for i in range(n)]
    assert shard_checksums("s3://teams/eq") == shard_checksums(local)
    assert verify_dataset("s3://teams/eq").windows == open_dataset(local).windows
    assert not stage.exists() or not any(stage.rglob("*.arrow"))  # staging is removed once the bucket is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "stage"] or sorted(p.name for p in tmp_path.iterdir()) == ["local"]
    # a rerun finds the bucket complete and writes nothing
    again = precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out="s3://teams/eq", stage_dir=str(stage), **SMALL))
    assert again == json.loads(fs.cat("teams/eq/manifest.json"))
    # other settings on the same prefix are refused, naming the bucket, not the staging folder
    with pytest.raises(UserError, match=r"--out s3://teams/eq holds a capture made with other settings \(top_k: 4 → 5\)"):
        precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out="s3://teams/eq", stage_dir=str(stage),
                                    **(SMALL | {"top_k": 5})))
    # a prefix holding something else is refused
    fs.pipe("teams/other/notes.txt", b"hello")
    with pytest.raises(UserError, match=r"s3://teams/other is not empty and holds no distill dataset"):
        precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out="s3://teams/other", stage_dir=str(stage), **SMALL))


def test_ranks_on_machines_without_a_shared_disk(s3, tmp_path, teacher_dir, corpus_dir):
    """Two ranks, each with its own staging folder (two machines): the bucket is their only shared state."""
    cfg = lambda rank: PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out="s3://teams/ranks",
                                        stage_dir=str(tmp_path / f"machine{rank}"), rank=rank, world_size=2, **SMALL)
    local = tmp_path / "local"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(local), **SMALL))
    n = open_dataset(local).manifest.totals.shards
    first = precompute(cfg(1))
    assert first == {"rank": 1, "shards": n, "missing": (n + 1) // 2}  # rank 0's shards: 0, 2, 4, ...
    fs = bucket()
    assert not fs.exists("teams/ranks/manifest.json")  # half written: not a dataset
    with pytest.raises(FormatError, match="has no manifest.json"):
        open_dataset("s3://teams/ranks")
    m = precompute(cfg(0))
    assert m["totals"]["shards"] == n and [s["rank"] for s in m["created_by"]["sessions"]] == [0, 1]
    assert shard_checksums("s3://teams/ranks") == shard_checksums(local)
    # a rank ending after another one wrote the manifest gets that manifest (precompute returns it), and adds nothing
    from pipeline.format.remote import RemoteOutput

    late = RemoteOutput("s3://teams/ranks", {}, str(tmp_path / "late"), 1, 2)
    (late.stage / "_progress").mkdir(parents=True)
    (late.stage / "_progress" / "rank-00001-of-00002-1.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        late.exchange(late.stage / "_progress")
    assert json.loads((late.stage / "manifest.json").read_text()) == m
    assert not bucket().exists("teams/ranks/_progress")


def precompute_cmd(teacher, data, out, *extra):
    return [sys.executable, "-m", "pipeline.cli", "precompute", "--teacher", str(teacher), "--data", str(data), "--out", out,
            "--seq-len", "16", "--top-k", "4", "--batch-size", "2", "--shard-size", "2", "--max-tokens", "1200",
            "--no-progress", "--device", "cpu", *extra]


@pytest.mark.slow
def test_precompute_kill_resume_train_eval_all_on_s3(s3, tmp_path, teacher_dir, corpus_dir, monkeypatch):
    """precompute → SIGKILL → resume → verify, inspect, train, eval: every dataset on s3://, no credential anywhere."""
    from tests.trainer.conftest import student_config_dict

    monkeypatch.chdir(tmp_path)
    url, fs = "s3://teams/e2e", bucket()
    # the precompute processes get their key and secret only through --storage-options (the endpoint from AWS_ENDPOINT_URL)
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    options = json.dumps({"key": s3["AWS_ACCESS_KEY_ID"], "secret": s3["AWS_SECRET_ACCESS_KEY"]})
    cmd = precompute_cmd(teacher_dir, corpus_dir, url, "--storage-options", options, "--stage-dir", str(tmp_path / "stage"))
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(fs.glob("teams/e2e/_progress/shard-*.json")) < 3:
        time.sleep(0.1)
        fs.invalidate_cache()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    fs.invalidate_cache()
    assert not fs.exists("teams/e2e/manifest.json"), "the run finished before it could be killed; make it longer"
    done = fs.glob("teams/e2e/_progress/shard-*.json")
    assert len(done) >= 3
    stamp = fs.info("teams/e2e/shards/00000.arrow")["LastModified"]
    with pytest.raises(FormatError, match="has no manifest.json"):  # half written: never read as complete
        open_dataset(url)

    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = open_dataset(url).manifest
    assert r.stdout.startswith(f"wrote {url}: {m.totals.shards} shards, {m.totals.tokens} tokens")
    assert m.totals.shards > len(done) and m.totals.shards == -(-m.totals.windows // 2)
    fs.invalidate_cache()
    assert fs.info("teams/e2e/shards/00000.arrow")["LastModified"] == stamp, "a shard in the bucket was recomputed"
    assert not fs.exists("teams/e2e/_progress")
    assert not (tmp_path / "s3:").exists()
    outputs = [r.stdout, r.stderr]

    # read it back with credentials from the environment (the standard place) through the local cache
    cache = tmp_path / "cache"
    runner = CliRunner()
    for args in (["verify", url, "--cache-dir", str(cache)], ["inspect", url]):
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
        outputs.append(res.output)
    assert f"ok: {m.totals.shards} shards, {m.totals.windows} windows verified" in outputs[2]
    assert "--storage-options ***" in outputs[3]  # the recorded command line, without the secret
    config = tmp_path / "student.json"
    config.write_text(json.dumps(student_config_dict()))
    res = runner.invoke(main, ["train", "--data", url, "--eval-data", url, "--out", str(tmp_path / "run"), "--student-config",
                               str(config), "--steps", "6", "--batch-size", "4", "--device", "cpu", "--no-progress",
                               "--cache-dir", str(cache), "--cache-gb", "0.001", "--storage-options", options])
    assert res.exit_code == 0, res.output
    outputs.append(res.output)
    res = runner.invoke(main, ["eval", "--student", str(tmp_path / "run"), "--data", url, "--cache-dir", str(cache), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output.strip().splitlines()[-1])
    assert metrics["tokens"] == open_dataset(url).manifest.totals.valid_tokens and 0 < metrics["ce"] < 10
    outputs.append(res.output)

    # the cache holds checked copies, bounded by --cache-gb 0.001 (1 MB)
    cached = [p for p in cache.rglob("*.arrow")]
    assert cached and sum(p.stat().st_size for p in cached) <= 1_000_000 + max(p.stat().st_size for p in cached)
    # never a credential in the dataset, the run folder, the cache, the staging folder or any output
    objects = [fs.cat(p) for p in fs.find("teams/e2e")]
    assert not [o for o in objects if SECRET_KEY.encode() in o]
    assert grep_tree(tmp_path, SECRET_KEY) == []
    assert not [o for o in outputs if SECRET_KEY in o]


def test_cache_checks_arrivals_and_stays_bounded(s3, tmp_path, dataset_dir):
    """Shards arrive checked against the manifest; least recently used ones go to stay under the limit."""
    fs = bucket()
    fs.put(str(dataset_dir), "teams/cached", recursive=True)
    ds = open_dataset("s3://teams/cached", cache_dir=tmp_path / "c", cache_gb=1.0)
    sizes = [sum(m.bytes for m in r.files.values()) for r in ds.manifest.shards]
    n = len(sizes)
    assert n >= 3
    local = open_dataset(dataset_dir)
    # shard 0 through the cache equals the local one, column by column, hidden states too
    a, b = ds.open_shard(0), local.open_shard(0)
    assert a.dataset.is_local and a.where("x").startswith("s3://teams/cached/")
    for col in ("input_ids", "labels", "topk_ids", "topk_logprobs"):
        assert (a.column(col) == b.column(col)).all()
    assert (a.hidden(2)[:] == b.hidden(2)[:]).all()
    del a
    # fetched ahead: with the plan known, shards 1 and 2 arrive (checked) while shard 0 is being read
    ds.cache.plan([0, 1, 2])
    first = ds.open_shard(0)
    deadline = time.time() + 30
    while time.time() < deadline and len(list((tmp_path / "c").rglob("*.ready"))) < 3:
        time.sleep(0.05)
    assert sorted(p.name for p in (tmp_path / "c").rglob("*.ready")) == ["00000.ready", "00001.ready", "00002.ready"]
    del first

    # a limit of about two shards: reading all of them in turn evicts the least recently used ones
    limit = 2 * max(sizes) + 10
    ds = open_dataset("s3://teams/cached", cache_dir=tmp_path / "small", cache_gb=limit / 1e9)
    ds.cache.ahead = 0
    for i in range(n):
        shard = ds.open_shard(i)
        shard.verify_checksums()
        del shard
    present = {int(p.stem) for p in (tmp_path / "small").rglob("*.ready")}
    assert {n - 2, n - 1} <= present and 0 not in present and sum(sizes[i] for i in present) <= limit
    assert sum(p.stat().st_size for p in (tmp_path / "small").rglob("*") if p.is_file() and p.suffix != ".ready") <= limit

    # a remote file altered after the manifest was written is refused on arrival, naming the file
    name = "teams/cached/shards/00001.arrow"
    data = bytearray(fs.cat(name))
    data[-1] ^= 0xFF
    fs.pipe(name, bytes(data))
    ds = open_dataset("s3://teams/cached", cache_dir=tmp_path / "fresh", cache_gb=1.0)
    ds.cache.ahead = 0
    with pytest.raises(FormatError, match=r"s3://teams/cached/shards/00001.arrow: arrived with .* the remote copy was altered"):
        ds.open_shard(1)
    assert not list((tmp_path / "fresh").rglob("00001.arrow*"))


def test_dataloader_workers_read_through_one_cache(s3, tmp_path, dataset_dir):
    """Forked DataLoader workers each get their own S3 client (s3fs is not fork-safe) and share the cache folder; the
    batches equal those of the local folder."""
    from trainer.data import WindowReader, make_loader

    bucket().put(str(dataset_dir), "teams/workers", recursive=True)
    remote = WindowReader(open_dataset("s3://teams/workers", cache_dir=tmp_path / "c"), 4, seed=3, targets="topk", epochs=1)
    local = WindowReader(str(dataset_dir), 4, seed=3, targets="topk", epochs=1)
    got = [b for b in make_loader(remote, workers=2)]
    want = list(local)
    assert len(got) == len(want) == local.batches_per_epoch
    for a, b in zip(got, want):
        assert "error" not in a
        for key in ("window_index", "input_ids", "labels", "teacher_ids", "teacher_logprobs"):
            assert (a[key] == b[key]).all(), key
    assert sorted(p.name for p in (tmp_path / "c").rglob("*.ready")) == [f"{s.name}.ready" for s in local.ds.shards]
