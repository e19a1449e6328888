"""`distill report PATH... --out DIR`: pictures of datasets and training runs, and a short markdown summary.

A PATH holding `manifest.json` is a dataset: one PNG with the distribution over valid positions of the stored top-k
probability mass and of the teacher's entropy (estimated from what is stored, see `entropy_estimate`), and the bytes
per token of each column. A PATH holding `metrics.jsonl` is a run (written by `distill train`): the runs are overlaid in
one PNG of loss, CE, KD, learning rate and gradient norm against the step, with the evaluation points. `report.md`
lists the figures and links the pictures. matplotlib (Agg backend) is imported only here. Imports no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from .common.errors import UserError
from .common.files import tmp_name

MARK = "<!-- written by distill report -->"
MAX_WINDOWS = 2000  # windows read per dataset for the distributions (evenly spread shards); sizes use every shard read
RUN_PANELS = (("loss", "loss"), ("ce", "CE (nats)"), ("kd", "KD"), ("lr", "learning rate"), ("grad_norm", "grad norm"))


# --- datasets -----------------------------------------------------------------------------------------------------------

def entropy_estimate(logprobs: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Teacher entropy per position (nats) from its stored top-k log-probs (..., K) over the full vocabulary.

    The head's part -sum p log p is exact; the tail's mass m = 1 - sum p is not resolved by id. Spread evenly over the
    V - K ids not stored it adds -m log(m / (V - K)), the largest entropy the tail can have: the estimate (the same
    reconstruction the manifest's recon_kl measures). Put on a single id it adds -m log m, the smallest: the lower
    bound. Returns (estimate, lower bound)."""
    lp = logprobs.astype(np.float64)
    p = np.exp(lp)
    head = -(np.where(p > 0, p * lp, 0.0)).sum(-1)
    m = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    rest = max(vocab_size - logprobs.shape[-1], 1)
    mlogm = np.where(m > 0, m * np.log(np.where(m > 0, m, 1.0)), 0.0)
    return head - mlogm + m * math.log(rest), head - mlogm


def sampled_entropy(logprobs: np.ndarray) -> np.ndarray:
    """Plug-in entropy of the sampled estimate count/N (padded slots -inf): biased low by about (unique - 1) / 2N."""
    lp = logprobs.astype(np.float64)
    p = np.exp(lp)
    return -(np.where(p > 0, p * np.where(np.isfinite(lp), lp, 0.0), 0.0)).sum(-1)


def dataset_figures(path: str, max_windows: int = MAX_WINDOWS) -> dict:
    """Per-position distributions and column sizes of a dataset, from up to `max_windows` windows of evenly spread shards."""
    from .format import open_dataset

    ds = open_dataset(path)
    n = len(ds.shards)
    per_shard = max(s.windows for s in ds.shards)
    take = max(1, min(n, -(-max_windows // per_shard)))
    picked = sorted({round(i * (n - 1) / max(take - 1, 1)) for i in range(take)}) if take > 1 else [0]
    masses, entropies, lowers, column_bytes, valid, windows = [], [], [], {}, 0, 0
    kind = "topk" if "topk" in ds.target_kinds else ("sampled" if ds.target_kinds else None)
    for i in picked:
        shard = ds.open_shard(i)
        mask = shard.column("loss_mask").astype(bool)  # (W, T)
        valid += int(mask.sum())
        windows += shard.windows
        for name in shard.table.column_names:
            column_bytes[name] = column_bytes.get(name, 0) + shard.table.column(name).nbytes
        for rel, meta in shard.record.files.items():
            if ".zarr/" in rel:
                key = "hidden " + rel.split("/")[1] if rel.count("/") >= 2 else "hidden (metadata)"
                column_bytes[key] = column_bytes.get(key, 0) + meta.bytes
        if kind is None:
            continue
        _, lp = shard.sparse_targets(kind)  # (W, T, M)
        if kind == "topk":
            masses.append(np.exp(lp.astype(np.float64)).sum(-1)[mask])
            est, low = entropy_estimate(lp, ds.vocab_size)
            entropies.append(est[mask]), lowers.append(low[mask])
        else:
            entropies.append(sampled_entropy(lp)[mask])
    m = ds.manifest
    return {
        "name": _name(path), "path": str(path), "teacher": m.teacher.name_or_path, "kind": kind, "top_k": ds.top_k,
        "vocab_size": ds.vocab_size, "windows": ds.windows, "valid_tokens": m.totals.valid_tokens,
        "bytes_per_token": m.totals.bytes_per_token, "windows_read": windows, "shards_read": len(picked),
        "topk_mass": np.concatenate(masses) if masses else np.zeros(0),
        "entropy": np.concatenate(entropies) if entropies else np.zeros(0),
        "entropy_lower": np.concatenate(lowers) if lowers else np.zeros(0),
        "bytes_per_valid_token": {k: v / max(valid, 1) for k, v in sorted(column_bytes.items(), key=lambda kv: -kv[1])},
    }


def plot_dataset(fig_data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=90)
    ax = axes[0]
    if len(fig_data["topk_mass"]):
        ax.hist(fig_data["topk_mass"], bins=40, range=(0, 1), color="tab:blue")
        ax.set_title(f"stored top-{fig_data['top_k']} mass per position")
    else:
        ax.text(0.5, 0.5, "no top-k targets", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("probability mass"), ax.set_ylabel("positions")
    ax = axes[1]
    if len(fig_data["entropy"]):
        hi = float(np.percentile(fig_data["entropy"], 99.5)) or 1.0
        ax.hist(fig_data["entropy"], bins=40, range=(0, hi), color="tab:orange", label="estimate (uniform tail)")
        if len(fig_data["entropy_lower"]):
            ax.hist(fig_data["entropy_lower"], bins=40, range=(0, hi), histtype="step", color="k", label="lower bound")
        ax.legend(fontsize=7)
    ax.set_title("teacher entropy per position"), ax.set_xlabel("nats")
    ax = axes[2]
    cols = fig_data["bytes_per_valid_token"]
    names = list(cols)[:10][::-1]
    ax.barh(names, [cols[k] for k in names], color="tab:green")
    ax.set_title("bytes per valid token, by column"), ax.set_xlabel("bytes")
    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"dataset {fig_data['name']}", fontsize=10)
    fig.tight_layout()
    _save(fig, out)


# --- runs ---------------------------------------------------------------------------------------------------------------

def read_metrics(path: str) -> dict:
    """A run folder's metrics.jsonl: training lines (step, loss, ce, kd, lr, grad_norm) and eval points (step, metrics).
    A line cut short by a kill mid-append is skipped."""
    f = Path(path) / "metrics.jsonl"
    train, evals = [], []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict) or "step" not in obj:
            continue
        if isinstance(obj.get("eval"), dict):
            evals.append((obj["step"], obj["eval"]))
        elif "loss" in obj:
            train.append(obj)
    if not train and not evals:
        raise UserError(f"{f} holds no metrics lines; pass a run folder written by `distill train`")
    return {"name": _name(path), "path": str(path), "train": train, "eval": evals}


def _eval_key(evals: list) -> str | None:
    keys = [k for k, v in evals[0][1].items() if isinstance(v, (int, float))] if evals else []
    return next((k for k in ("ce", "loss") if k in keys), keys[0] if keys else None)


def plot_runs(runs: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), dpi=90)
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, run in enumerate(runs):
        color = colors[r % len(colors)]
        steps = [x["step"] for x in run["train"]]
        for ax, (key, label) in zip(axes, RUN_PANELS):
            ys = [x.get(key) for x in run["train"]]
            pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), color=color, lw=1.2, label=run["name"])
            ax.set_title(label, fontsize=9), ax.set_xlabel("step", fontsize=8)
        key = _eval_key(run["eval"])
        if key:
            pts = [(s, m[key]) for s, m in run["eval"] if isinstance(m.get(key), (int, float))]
            axes[5].plot(*zip(*pts), "o-", color=color, ms=4, label=f"{run['name']} eval {key}")
    axes[3].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[5].set_title("eval points", fontsize=9), axes[5].set_xlabel("step", fontsize=8)
    axes[0].legend(fontsize=7)  # one legend: the same colors on every panel
    if axes[5].get_legend_handles_labels()[0]:
        axes[5].legend(fontsize=7)
    else:
        axes[5].text(0.5, 0.5, "no eval points (train with --eval-data)", ha="center", va="center",
                     transform=axes[5].transAxes, fontsize=8)
    fig.suptitle("runs: " + ", ".join(r["name"] for r in runs), fontsize=10)
    fig.tight_layout()
    _save(fig, out)


# --- the command --------------------------------------------------------------------------------------------------------

def _name(path) -> str:
    text = str(path).rstrip("/")
    return text.rsplit("/", 1)[-1] or text


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "x"


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = tmp_name(out)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)


def _out_folder(out: str) -> Path:
    """New, empty, or holding an earlier report (whose files are replaced); anything else is refused."""
    if "://" in out:
        raise UserError(f"--out {out}: the report is written to a local folder; pass a local path")
    path = Path(out)
    if path.exists():
        if not path.is_dir() or path.is_symlink():
            raise UserError(f"--out {out} is not a folder; choose a new or empty folder")
        md = path / "report.md"
        earlier = md.is_file() and md.read_text(encoding="utf-8", errors="replace").startswith(MARK)
        if any(path.iterdir()) and not earlier:
            raise UserError(f"--out {out} is not empty and holds no earlier report; choose a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def classify(path: str) -> str:
    """'dataset' (manifest.json) or 'run' (metrics.jsonl)."""
    if "://" in path:
        return "dataset"
    p = Path(path)
    if (p / "manifest.json").is_file():
        return "dataset"
    if (p / "metrics.jsonl").is_file():
        return "run"
    if not p.exists():
        raise UserError(f"{path}: no such folder; pass dataset folders (with manifest.json) or run folders (with metrics.jsonl)")
    raise UserError(f"{path} holds neither manifest.json (a dataset) nor metrics.jsonl (a run of `distill train`); "
                    "pass those folders")


def report(paths: list[str], out: str, max_windows: int = MAX_WINDOWS) -> dict:
    """Write the pictures and report.md into `out`; returns {'datasets': [...], 'runs': [...], 'files': [...]}."""
    if not paths:
        raise UserError("no PATH given; pass dataset folders and/or run folders")
    kinds = [(p, classify(p)) for p in paths]  # every path is checked before anything is written
    folder = _out_folder(out)
    import matplotlib

    matplotlib.use("Agg")
    datasets = [dataset_figures(p, max_windows) for p, k in kinds if k == "dataset"]
    runs = [read_metrics(p) for p, k in kinds if k == "run"]
    _dedupe([*datasets]), _dedupe(runs)
    files = []
    for d in datasets:
        d["png"] = f"dataset-{_slug(d['name'])}.png"
        plot_dataset(d, folder / d["png"])
        files.append(d["png"])
    if runs:
        plot_runs(runs, folder / "runs.png")
        files.append("runs.png")
    text = summary_markdown(datasets, runs)
    tmp = tmp_name(folder / "report.md")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / "report.md")
    return {"datasets": [d["name"] for d in datasets], "runs": [r["name"] for r in runs], "files": files + ["report.md"]}


def _dedupe(items: list[dict]) -> None:
    """Two folders of the same name (runs/a/s1, runs/b/s1) get the parent's name too."""
    seen = {}
    for it in items:
        seen.setdefault(it["name"], []).append(it)
    for name, group in seen.items():
        if len(group) > 1:
            for it in group:
                parts = str(it["path"]).rstrip("/").split("/")
                it["name"] = "/".join(parts[-2:]) if len(parts) > 1 else name
            if len({it["name"] for it in group}) < len(group):
                for j, it in enumerate(group):
                    it["name"] = f"{it['name']}#{j + 1}"


def _f(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def summary_markdown(datasets: list[dict], runs: list[dict]) -> str:
    lines = [MARK, "# distill report", ""]
    if datasets:
        lines += ["## Datasets", "",
                  "| dataset | teacher | windows | valid tokens | bytes/token | top-k mass (mean) "
                  "| entropy estimate (mean, nats) | entropy lower bound |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for d in datasets:
            mass = float(d["topk_mass"].mean()) if len(d["topk_mass"]) else None
            ent = float(d["entropy"].mean()) if len(d["entropy"]) else None
            low = float(d["entropy_lower"].mean()) if len(d["entropy_lower"]) else None
            lines.append(f"| {d['name']} | {d['teacher']} | {d['windows']} | {d['valid_tokens']} | {_f(d['bytes_per_token'])} "
                         f"| {_f(mass)} | {_f(ent)} | {_f(low)} |")
        lines += ["", "Distributions over the valid positions of "
                  + "; ".join(f"{d['name']}: {d['windows_read']} windows from {d['shards_read']} shard(s)" for d in datasets)
                  + ". The teacher's entropy is estimated from what is stored: with top-k targets, the exact entropy of "
                  "the stored head plus the tail mass m = 1 − Σp spread evenly over the V − k ids not stored (the "
                  "largest entropy the tail allows, the reconstruction the manifest's recon_kl measures); putting the "
                  "tail on a single id gives the lower bound. With sampled targets only, the plug-in entropy of the "
                  "counts (biased low).", ""]
        for d in datasets:
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(d["bytes_per_valid_token"].items())[:4])
            lines += [f"![dataset {d['name']}]({d['png']})", "", f"Largest columns (bytes per valid token): {top}.", ""]
    if runs:
        lines += ["## Runs", "", "| run | steps | final loss | final CE | final KD | eval |", "| --- | --- | --- | --- | --- | --- |"]
        for r in runs:
            last = r["train"][-1] if r["train"] else {}
            key = _eval_key(r["eval"])
            ev = f"{key} {_f(r['eval'][-1][1].get(key))} at step {r['eval'][-1][0]}" if key else "none"
            lines.append(f"| {r['name']} | {last.get('step', '–')} | {_f(last.get('loss'))} | {_f(last.get('ce'))} "
                         f"| {_f(last.get('kd'))} | {ev} |")
        lines += ["", "![runs](runs.png)", ""]
    return "\n".join(lines)
