"""P5 against object storage: the streaming reader on an s3:// dataset (moto's standalone S3 server on 127.0.0.1)
through the local shard cache, cold and warm, against the student's training tokens/s on the same data.

    python scripts/bench_remote.py [--data .cache/bench-train/train-top64-s8-614400] [--batches 150] [--steps 30]

The dataset is a real capture (scripts/bench_train.py writes it); it is uploaded to a bucket of the test server, then
read as `trainer.data.WindowReader` drives it in training (shuffled rows, decoded targets, tensors, checksums verified
once per shard): cold (the cache empty: every shard fetched, hashed on arrival, then read) and warm (a new reader, the
cache holding the shards), next to the same reader on the local folder. The student (scripts/configs/student-1.7m.json)
trains --steps steps from the local folder; its median tokens/s after the first 5 steps is the denominator. Timings
depend on the machine: the figures are ratios measured in one run. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def reader_speed(url: str, batch_size: int, kind: str, batches: int, **open_options) -> float:
    """Tokens/s of the reader alone over `batches` batches (the first one, which opens the dataset, not timed)."""
    from pipeline.format import open_dataset
    from trainer.data import WindowReader

    reader = WindowReader(open_dataset(url, **open_options), batch_size, seed=0, targets=kind)
    it = iter(reader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def student_speed(data: str, student_config: str, steps: int, batch_size: int, work: Path, dtype: str) -> float:
    from trainer.config import TrainConfig
    from trainer.train import train

    out = work / "run"
    train(TrainConfig(data=data, out=str(out), student_config=student_config, steps=steps, batch_size=batch_size,
                      warmup=1, save_every=steps, device="cpu", dtype=dtype, progress=False, quiet=True))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(x["tokens_per_s"] for x in lines if "tokens_per_s" in x and x["step"] > 5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO / ".cache" / "bench-train" / "train-top64-s8-614400"))
    p.add_argument("--student-config", default=str(REPO / "scripts" / "configs" / "student-1.7m.json"))
    p.add_argument("--batches", type=int, default=150, help="reader batches timed per measurement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="student steps (the median after the first 5 is used)")
    p.add_argument("--kind", default="topk", choices=["topk", "sampled"])
    p.add_argument("--train-dtype", default="bfloat16")
    args = p.parse_args(argv)

    import torch

    from tests.s3_server import s3_server

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    rows = {}
    try:
        with s3_server("bench"):
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            size = sum(f.stat().st_size for f in Path(args.data).rglob("*") if f.is_file())
            t0 = time.perf_counter()
            fs.put(args.data, "bench/ds", recursive=True)
            rows["upload MB/s"] = size / 1e6 / (time.perf_counter() - t0)
            url, cache = "s3://bench/ds", work / "cache"
            rows["reader, local folder"] = reader_speed(args.data, args.batch_size, args.kind, args.batches)
            rows["reader, s3 cold cache"] = reader_speed(url, args.batch_size, args.kind, args.batches, cache_dir=cache)
            rows["reader, s3 warm cache"] = reader_speed(url, args.batch_size, args.kind, args.batches, cache_dir=cache)
        rows["student training"] = student_speed(args.data, args.student_config, args.steps, args.batch_size, work,
                                                 args.train_dtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    train = rows["student training"]
    print(f"dataset {args.data}: {size / 1e6:.1f} MB; upload to the test server {rows['upload MB/s']:.1f} MB/s")
    print("| measurement | tokens/s | ÷ student training tokens/s |")
    print("| --- | --- | --- |")
    for name in ("reader, local folder", "reader, s3 cold cache", "reader, s3 warm cache", "student training"):
        print(f"| {name} | {rows[name]:.0f} | {rows[name] / train:.1f} |")


if __name__ == "__main__":
    main()
