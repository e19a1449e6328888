"""All benchmarks, side by side in one run; each section's table goes to .cache/bench/<section>.md for BENCHMARKS.md.

    python scripts/benchmark.py --teacher TEACHER_DIR [--sections losses capture train] [--quick]

Sections (each also runnable alone, with more flags):
- losses  (scripts/bench_losses.py):  fused vs plain loss memory and time at vocab 32k/128k (issue 3)
- capture (scripts/bench_capture.py): P1 capture efficiency, P4 storage and fidelity (issues 2, 5, 6)
- train   (scripts/bench_train.py):   quality table on real text, P2 training cost, P5 reader speed (issues 5, 6)
Not part of the test suite: timings depend on the machine, so they are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def machine() -> str:
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:  # not Linux
        names = []
    cpu = names[0] if names else (platform.processor() or platform.machine())
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="teacher folder (scripts/make_teacher.py prints it); needed by capture and train")
    p.add_argument("--sections", nargs="+", default=["losses", "capture", "train"], choices=["losses", "capture", "train"])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    p.add_argument("--out", default=str(HERE.parent / ".cache" / "bench"))
    args = p.parse_args(argv)
    if {"capture", "train"} & set(args.sections) and not args.teacher:
        p.error("--teacher is needed for the capture and train sections")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for section in args.sections:
        module = __import__(f"bench_{section}")
        flags = (["--quick"] if args.quick else []) + (["--teacher", args.teacher] if section != "losses" else [])
        rows = module.run(module.parse_args(flags))
        text = (f"<!-- `python scripts/benchmark.py --sections {section}{' --quick' if args.quick else ''}`, "
                f"{datetime.date.today()}, {machine()} -->\n\n{module.markdown(rows)}\n")
        (out / f"{section}.md").write_text(text)
        print(f"\n## {section}\n\n{text}")


if __name__ == "__main__":
    main()
