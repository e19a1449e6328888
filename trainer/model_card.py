"""The finished student's folder, `RUN/model/`: weights, config, tokenizer and a model card (README.md).

Called by `trainer.train` (rank 0) at the end of a run. Why a sub-folder: an upload of a model folder
(`huggingface-cli upload`, `upload_folder`) skips only `.git` and `.cache/huggingface` by default, so a run folder
uploaded as-is would push every optimizer checkpoint; `RUN/model/` holds the model alone, and `checkpoints/`,
metrics.jsonl and run.json stay beside it. `model_folder(path)` lets `distill eval --student RUN` find it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MODEL = "model"  # RUN/model/: what to upload


def model_folder(path: str) -> str:
    """RUN/model when `path` is a distill run folder that holds one, else `path` (a model folder or hub id)."""
    p = Path(path)
    if (p / "run.json").is_file() and (p / MODEL / "config.json").is_file():
        return str(p / MODEL)
    return path


def save_final_model(out: Path, model, tokenizer, card: str) -> Path:
    """Write OUT/model/ under a temp name, then swap it in (a killed save leaves a `.tmp-` folder the next run deletes)."""
    final = out / MODEL
    tmp = out / f"{MODEL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def model_card(cfg: dict, dataset: dict, final_metrics: dict, steps: int, n_params: int) -> str:
    """README.md of the student: teacher, dataset, loss, training, metrics and how to load it."""
    yaml = ["---", "library_name: transformers", "tags:", "- distillation", "- distill"]
    if dataset.get("teacher") and not os.path.isabs(str(dataset["teacher"])) and "/" in str(dataset["teacher"]):
        yaml.append(f"base_model: {dataset['teacher']}")  # a hub id only; a local path means nothing on a hub
    yaml.append("---")
    loss = ("CE only (alpha 1)" if cfg.get("alpha") == 1.0 else
            f"{cfg.get('alpha')} * CE + {1 - cfg.get('alpha', 0):g} * {cfg.get('loss')} (tail: {cfg.get('tail')}, "
            f"temperature {cfg.get('temperature')})")
    if cfg.get("online_teacher"):
        loss += f", online teacher {cfg['online_teacher']}"
    if cfg.get("hidden_weight"):
        loss += f"; hidden-state {cfg.get('hidden_loss')} loss, weight {cfg['hidden_weight']}"
    shown = {k: v for k, v in final_metrics.items() if k in ("loss", "ce", "kd", "hidden", "tokens_per_s")}
    lines = [
        *yaml, "",
        "# Student distilled with distill", "",
        f"- **Teacher:** {dataset.get('teacher')}",
        f"- **Dataset:** {dataset.get('url')} (manifest sha256 {dataset.get('manifest_sha256')}, {dataset.get('windows')} "
        f"windows of {dataset.get('seq_len')} tokens, top-k {dataset.get('top_k')})",
        f"- **Loss:** {loss}",
        f"- **Training:** {steps} steps, batch {cfg.get('batch_size')} x {cfg.get('grad_accum')} accumulation, lr "
        f"{cfg.get('lr')} ({cfg.get('schedule')}, warmup {cfg.get('warmup')}), seed {cfg.get('seed')}",
        f"- **Parameters:** {n_params:,}", "",
        "## Metrics", "",
        "Last training interval (nats/token):", "", "```json", json.dumps(shown, indent=1), "```", "",
    ]
    if final_metrics.get("eval"):
        lines += ["Held-out evaluation (`distill eval`):", "", "```json", json.dumps(final_metrics["eval"], indent=1),
                  "```", ""]
    lines += [
        "## How to load", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```", "",
        "This folder holds the model only; the training run's checkpoints, metrics.jsonl and run.json are in the folder "
        "above it.", "",
    ]
    return "\n".join(lines)
