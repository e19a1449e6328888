"""FSDP step time against DDP: `distill train` under torchrun with 2 processes, with and without --fsdp, same everything else.

    python scripts/bench_fsdp.py [--data DATASET] [--steps 12] [--repeats 2] [--nproc 2] [--device cpu]

Trains each student (the demo's 1.7M one and a 14M one of the demo teacher's shape) with real `torchrun -m trainer.cli
train`, DDP and FSDP alternating (so the load of a shared machine hits both alike), on a dataset written by
`precompute` (default: the one scripts/bench_train.py captures). The step time is read from metrics.jsonl (a line per
step: the step's input tokens over all ranks / tokens_per_s); the first two steps (start-up, lazy init) are left out
and the median of the rest is reported, then the median over repeats. Also the peak resident memory of the largest rank
(VmHWM of each rank process, polled while it runs; it includes torch itself, ~0.4 GiB). Prints a markdown table; FSDP /
DDP is the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENTS = {  # name -> overrides of scripts/configs/student-1.7m.json
    "1.7M (4 x 128)": {},
    "14M (6 x 384)": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
                      "num_key_value_heads": 6},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO / ".cache" / "bench-train" / "train-top64-s8-1228800"),
                   help="dataset folder written by `distill precompute` (vocabulary 8192 for the default students)")
    p.add_argument("--student-config", default=str(REPO / "scripts" / "configs" / "student-1.7m.json"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch on each process")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def step_seconds(run: Path, nproc: int, batch_size: int, seq_len: int) -> float:
    """Median seconds per optimizer step after the first two, from metrics.jsonl (log_every 1)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lines = [x for x in lines if "tokens_per_s" in x]
    inputs = nproc * batch_size * seq_len  # input tokens of one step over all ranks
    return statistics.median(inputs / x["tokens_per_s"] for x in lines[2:])


def ranks(pid: int) -> list[int]:
    """torchrun's rank processes: the children of its launcher (/proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a process in MiB; 0 once it is gone."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


def train(args, config: Path, out: Path, fsdp: bool) -> float:
    """Run one training; return the largest rank's peak RSS in MiB."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc), "-m",
           "trainer.cli", "train", "--data", args.data, "--out", str(out), "--student-config", str(config),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--warmup", "2", "--device", args.device,
           "--dtype", args.dtype, "--save-every", "100000", "--log-every", "1", "--quiet"] + (["--fsdp"] if fsdp else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = out.with_name(out.name + ".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak: dict[int, float] = {}
        while proc.poll() is None:
            for pid in ranks(proc.pid):
                peak[pid] = max(peak.get(pid, 0.0), peak_rss_mib(pid))
            time.sleep(0.5)
    if proc.returncode != 0:
        sys.exit(f"training failed ({'fsdp' if fsdp else 'ddp'}):\n{log.read_text()[-3000:]}")
    return max(peak.values(), default=0.0)


def main(argv=None) -> None:
    args = parse_args(argv)
    seq_len = json.loads((Path(args.data) / "manifest.json").read_text())["corpus"]["seq_len"]
    base = json.loads(Path(args.student_config).read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    rows = []
    try:
        for name, overrides in STUDENTS.items():
            config = work / f"student-{len(rows)}.json"
            config.write_text(json.dumps(base | overrides))
            times, rss = {"ddp": [], "fsdp": []}, {"ddp": [], "fsdp": []}
            for r in range(args.repeats):
                for mode in ("ddp", "fsdp"):
                    out = work / f"{mode}-{len(rows)}-{r}"
                    rss[mode].append(train(args, config, out, mode == "fsdp"))
                    times[mode].append(step_seconds(out, args.nproc, args.batch_size, seq_len))
                    shutil.rmtree(out)
                    print(f"{name} {mode} repeat {r}: {times[mode][-1]:.3f} s/step, peak rank RSS {rss[mode][-1]:.0f} MiB",
                          file=sys.stderr, flush=True)
            ddp, fsdp = statistics.median(times["ddp"]), statistics.median(times["fsdp"])
            rows.append((name, ddp, fsdp, times, max(rss["ddp"]), max(rss["fsdp"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| student | DDP s/step | FSDP s/step | FSDP / DDP | per repeat (DDP; FSDP) | peak rank RSS MiB (DDP / FSDP) |")
    print("|---|---|---|---|---|---|")
    for name, ddp, fsdp, times, rss_ddp, rss_fsdp in rows:
        each = "; ".join(", ".join(f"{t:.3f}" for t in times[m]) for m in ("ddp", "fsdp"))
        print(f"| {name} | {ddp:.3f} | {fsdp:.3f} | {fsdp / ddp:.2f}x | {each} | {rss_ddp:.0f} / {rss_fsdp:.0f} |")


if __name__ == "__main__":
    main()
