"""Train the project's real teacher: a byte-level BPE tokenizer and a small Llama on the stdlib corpus, on CPU.

The capture (`distill precompute`) and the student trainer need a teacher whose predictions are better than chance but
that any machine can rebuild in minutes without a download. This script

1. builds the corpus (`scripts/make_corpus.py`, reused when unchanged),
2. trains a byte-level BPE tokenizer on the training split and tokenizes both splits once
   (cached as uint16 .npy under `.cache/tokens-<hash>/`),
3. trains a Llama-style causal LM on random packed windows for a fixed number of steps (seeded: the same teacher on
   every machine up to float nondeterminism; `--minutes` can cut it short, as an explicit choice only),
4. measures held-out cross-entropy (nats/token) next to a unigram baseline,
5. saves a `from_pretrained`-loadable folder (model + tokenizer + teacher.json) as `.cache/teacher-<recipe hash>/`,
   atomically, and reuses it when every setting that determines the weights is unchanged (the recipe hash is made of
   exactly those: corpus, tokenizer, model shape, optimizer, steps, seed, dtype; never the wall time a machine took).

The last line on stdout is the teacher folder, so shell scripts can do `TEACHER=$(python scripts/make_teacher.py)`;
progress and logs go to stderr.

    python scripts/make_teacher.py [--steps 2000] [--out runs/teacher]
    python scripts/make_teacher.py --chat [--chat-steps 600]    # then the chat teacher (scripts/chat_teacher.py)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_corpus  # noqa: E402  (sibling script; scripts/ is not a package)
from pipeline.common.cli import field_help
from pipeline.common.errors import UserError, run_or_exit

EOT = "<|endoftext|>"
# Bump when a change to this script changes the trained result for the same flags, so stale caches are not reused.
RECIPE_VERSION = 2  # 2: the budget is steps; the cosine follows step / steps


@dataclass
class TeacherConfig:
    cache_dir: str = str(make_corpus.REPO_ROOT / ".cache")
    """Folder for the corpus, token and teacher caches."""
    corpus_dir: str | None = None
    """Corpus folder (default: CACHE_DIR/corpus); built there by make_corpus.py when missing or stale."""
    stdlib: str | None = None
    """Source folder for the corpus (default: this interpreter's stdlib); tests point it at a tiny fake one."""
    out: str | None = None
    """Also copy the finished teacher here (replacing an older teacher folder); it is then the printed path."""
    vocab_size: int = 8192
    """BPE vocabulary size, special token included; at most 65536 because token ids are cached as uint16."""
    hidden: int = 384
    """Model width (hidden_size)."""
    layers: int = 6
    """Number of transformer blocks."""
    heads: int = 6
    """Attention heads (no grouped-query attention: as many key/value heads)."""
    intermediate: int = 1024
    """MLP width (intermediate_size)."""
    max_positions: int = 1024
    """max_position_embeddings: the longest context the saved teacher accepts; RoPE, so larger costs nothing."""
    tie_embeddings: bool = True
    """Share input embedding and LM head: 3M fewer parameters to train in a CPU budget of minutes."""
    seq_len: int = 256
    """Training and evaluation window length in tokens."""
    batch_size: int = 4
    """Windows per optimizer step; small, because in a CPU budget of minutes more steps beat bigger ones
    (same 123k tokens: 120 steps of 4 at lr 3e-3 reached held-out CE 6.27, 60 steps of 8 at 2e-3 only 6.57)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * MIN_LR_RATIO at the last step."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms)."""
    steps: int = 2000
    """Optimizer steps: the recipe. Held-out CE 4.40 against the unigram 6.63; 28 min on 2 busy CPU cores (1,240
    tokens/s), about 9 min at the 3,700 tokens/s of an idle pair."""
    minutes: float | None = None
    """Explicit choice only: also stop after this many minutes of training (the cosine then follows whichever budget
    runs out first). The teacher then depends on the machine's speed; its recipe hash records MINUTES."""
    seed: int = 0
    """Seed for initialization and window sampling."""
    dtype: str = "bfloat16"
    """Autocast dtype on CPU: bfloat16 (about 2.4x faster than float32 on an AVX512-BF16 CPU) or float32."""
    eval_tokens: int = 200_000
    """Held-out tokens scored at the end (whole windows, up to the size of the held-out split)."""
    min_gain: float | None = None
    """Check the teacher before anyone uses it: exit 2 with one line unless its held-out CE is at least MIN_GAIN nats
    below the unigram baseline. scripts/demo.sh passes 1.0."""
    chat: bool = False
    """Then teach the text teacher the ChatML chat format on the stdlib conversations (scripts/chat_teacher.py): special
    tokens, a chat template, a fine-tune on a mix of conversations and text; saved as CACHE_DIR/chat-teacher-<hash>."""
    chat_steps: int = 600
    """Fine-tune steps of --chat (batches of --batch-size windows of --seq-len tokens). The defaults (600 steps, lr 1e-3,
    3 of 4 windows conversations, assistant tokens learned) took held-out assistant CE from 6.327 to 5.745 (unigram
    6.642; text 4.400 -> 4.555); 400 steps at lr 5e-4, half the windows, every token learned reached only 6.033,
    worse than the chat bench's CE-only students (BENCHMARKS.md, issue 11)."""
    chat_lr: float = 1e-3
    """Peak learning rate of the --chat fine-tune (the same warmup and cosine as the text teacher)."""
    chat_fraction: float = 0.75
    """Share of each --chat batch's windows taken from the conversations; the rest are text."""
    chat_loss: str = "assistant"
    """What the --chat fine-tune learns in conversation windows: all (every token: a language model of the whole
    format) or assistant (the answers and their <|im_end|>, as supervised chat fine-tuning does)."""


def validate(cfg: TeacherConfig) -> None:
    """Collect every problem, then raise once naming them all."""
    problems = []
    if not 258 <= cfg.vocab_size <= 65536:
        problems.append(f"--vocab-size {cfg.vocab_size} must be in [258, 65536] (256 bytes + {EOT} + a merge; uint16 ids)")
    if cfg.hidden % cfg.heads:
        problems.append(f"--hidden {cfg.hidden} must be divisible by --heads {cfg.heads}")
    if cfg.seq_len > cfg.max_positions:
        problems.append(f"--seq-len {cfg.seq_len} exceeds --max-positions {cfg.max_positions}")
    if cfg.minutes is not None and cfg.minutes <= 0:
        problems.append(f"--minutes {cfg.minutes} must be positive")
    if cfg.dtype not in ("bfloat16", "float32"):
        problems.append(f"--dtype {cfg.dtype!r} must be bfloat16 or float32")
    if not 0.0 <= cfg.chat_fraction <= 1.0:
        problems.append(f"--chat-fraction {cfg.chat_fraction} must be in [0, 1]")
    if cfg.chat_loss not in ("all", "assistant"):
        problems.append(f"--chat-loss {cfg.chat_loss!r} must be all or assistant")
    if cfg.chat_lr <= 0:
        problems.append(f"--chat-lr {cfg.chat_lr} must be positive")
    for name in ("steps", "chat_steps", "layers", "intermediate", "seq_len", "batch_size", "eval_tokens"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if problems:
        raise ValueError("invalid teacher config:\n  " + "\n  ".join(problems))


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- tokenizer and token cache

def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with `<|endoftext|>` as id 0; deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2, show_progress=False,
                                  # every byte gets a token, so no text is ever out of vocabulary
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def encode_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """One uint16 stream `EOT doc EOT doc ...`: the separator tells the model a new file starts."""
    eot = tok.token_to_id(EOT)
    ids = [np.array([eot] + e.ids, dtype=np.uint16) for e in tok.encode_batch(texts)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)


def load_tokens(cfg: TeacherConfig, corpus_dir: Path, corpus: dict) -> tuple[Tokenizer, dict, dict]:
    """Train the tokenizer and tokenize both splits once; cached under CACHE_DIR/tokens-<hash>/ (atomic rename)."""
    recipe = {"corpus": corpus["recipe"], "corpus_sha256": {s: c["sha256"] for s, c in corpus["splits"].items()},
              "tokenizer": {"type": "byte-level BPE", "vocab_size": cfg.vocab_size, "special": [EOT],
                            "min_frequency": 2, "separator": "EOT before each file",
                            "tokenizers_version": tokenizers.__version__}}
    final = Path(cfg.cache_dir) / f"tokens-{short_hash(recipe)}"
    if not (final / "tokens.json").exists():
        tmp = Path(cfg.cache_dir) / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.time()
        tok = train_tokenizer(make_corpus.read_split(corpus_dir, "train"), cfg.vocab_size)
        t1 = time.time()
        counts = {}
        for split in ("train", "heldout"):
            stream = encode_stream(tok, make_corpus.read_split(corpus_dir, split))
            np.save(tmp / f"{split}.npy", stream)
            counts[split] = int(stream.size)
        tok.save(str(tmp / "tokenizer.json"))
        info = {"recipe": recipe, "tokens": counts, "tokenizer_train_s": round(t1 - t0, 2),
                "tokenize_s": round(time.time() - t1, 2)}
        (tmp / "tokens.json").write_text(json.dumps(info, indent=2) + "\n")
        _publish(tmp, final)
    info = json.loads((final / "tokens.json").read_text())
    # mmap: the arrays are only ever sliced, so the page cache is shared with other runs on the same machine
    arrays = {s: np.load(final / f"{s}.npy", mmap_mode="r") for s in ("train", "heldout")}
    return Tokenizer.from_file(str(final / "tokenizer.json")), arrays, info


def save_teacher(final: Path, model, hf_tok, tok: Tokenizer, sample: str, report: dict, check=None) -> None:
    """Save model + tokenizer to a temp folder beside `final`, check that it loads back identically on `sample`
    (`verify_roundtrip`, then `check(folder)` if given), write `report` as teacher.json, and rename it into place."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    hf_tok.save_pretrained(tmp)
    verify_roundtrip(tmp, model, tok, sample)
    if check is not None:
        check(tmp)
    (tmp / "teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    _publish(tmp, final)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place; if a concurrent run got there first, keep theirs (same recipe)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- model, schedule, eval

def build_model(cfg: TeacherConfig, eot_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie_embeddings,
                         bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def lr_factor(step: int, progress: float, cfg: TeacherConfig) -> float:
    """Linear warmup by steps times a cosine over budget progress in [0, 1].

    Progress is step/steps, or the larger of that and elapsed/minutes when a time limit was chosen, so a time-cut run
    still ends at the low learning rate even though the number of steps it allows is unknown in advance.
    """
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return warmup * cosine


def autocast(cfg: TeacherConfig):
    if cfg.dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Consecutive windows of seq_len+1 overlapping by one, so each scored token is predicted exactly once. (N, T+1)"""
    n = min(max_tokens // seq_len, (tokens.size - 1) // seq_len)
    if n < 1:
        raise ValueError(f"held-out split has {tokens.size} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
                         "use a smaller --seq-len or a bigger corpus")
    starts = np.arange(n) * seq_len
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def heldout_ce(model, windows: torch.Tensor, cfg: TeacherConfig, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy in nats over all targets of `windows` (N, T+1)."""
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        with autocast(cfg):
            logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / windows[:, 1:].numel()


def unigram_ce(train: np.ndarray, windows: torch.Tensor, vocab_size: int) -> float:
    """Baseline: CE of the same held-out targets under add-one-smoothed training token frequencies."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[windows[:, 1:].numpy()].mean())


def verify_roundtrip(folder: Path, model, tok: Tokenizer, text: str) -> None:
    """The saved folder must load with the Auto classes and give the same ids and logits as what was trained."""
    hf_tok = AutoTokenizer.from_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    if ids != tok.encode(text).ids or hf_tok.decode(ids) != text:
        raise RuntimeError(f"tokenizer saved in {folder} does not round-trip; it would silently change the ids")
    x = torch.tensor([ids[:64]])
    model.eval()
    with torch.no_grad():
        diff = (loaded(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    model.train()
    if diff > 1e-4:
        raise RuntimeError(f"model saved in {folder} gives different logits (max |diff| {diff:.2e}) after loading")


def train_loop(model, next_batch, cfg: TeacherConfig, steps: int, lr: float,
               budget_s: float | None = None) -> tuple[int, int, float, float]:
    """Train `model` in place on `next_batch()` windows (B, T+1): AdamW (decay on matrices only), warmup + cosine over
    the budget (`lr_factor`), gradients clipped at 1.0, bf16 autocast per `cfg.dtype`. Shared by the text teacher and
    its chat fine-tune (scripts/chat_teacher.py). Returns (steps, tokens seen, final loss EMA, seconds)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    step, tokens_seen, loss_ema, t_start = 0, 0, None, time.time()
    # tqdm's bar shows the ETA on a terminal; in a log file (nohup, CI) a plain line every 10% says it instead
    bar = tqdm(total=steps, unit="step", file=sys.stderr, mininterval=2.0, dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    while True:
        elapsed = time.time() - t_start
        progress = max(step / steps, elapsed / budget_s if budget_s else 0.0)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, progress, cfg)
        batch = next_batch()  # (B, T+1), or that and the labels to learn (B, T), -100 where nothing is learned
        batch, labels = batch if isinstance(batch, tuple) else (batch, batch[:, 1:])
        with autocast(cfg):
            logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())  # float32 math on bf16 logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch[:, 1:].numel()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
        if bar.disable and step % max(1, steps // 10) == 0:
            log(progress_line(step, steps, time.time() - t_start, loss_ema))
    bar.close()
    return step, tokens_seen, loss_ema, time.time() - t_start


# ----------------------------------------------------------------------------- the script

def make_teacher(cfg: TeacherConfig) -> Path:
    """Build (or reuse) the teacher for `cfg`; return its folder (cfg.out when given)."""
    # --- setup: corpus, tokens, recipe, cache lookup
    validate(cfg)
    if cfg.chat:  # the text teacher first (built or reused, with its check), then its chat fine-tune
        import chat_teacher  # sibling script, imported here: it imports this module

        base = make_teacher(dataclasses.replace(cfg, chat=False, out=None))
        return _copy_out(chat_teacher.make_chat_teacher(cfg, base), cfg.out)
    torch.set_num_threads(os.cpu_count() or 1)
    cache_dir = Path(cfg.cache_dir).resolve()
    corpus_dir = Path(cfg.corpus_dir) if cfg.corpus_dir else cache_dir / "corpus"
    corpus = make_corpus.build_corpus(corpus_dir, stdlib=cfg.stdlib)
    tok, tokens, tokens_info = load_tokens(cfg, corpus_dir, corpus)
    recipe = teacher_recipe(cfg, tokens_info["recipe"])
    final = cache_dir / f"teacher-{short_hash(recipe)}"
    if (final / "teacher.json").exists():
        log(f"reusing cached teacher at {final}")
        check_teacher(final, cfg.min_gain)
        return _copy_out(final, cfg.out)
    log(f"corpus: {corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB; tokens: train {tokens['train'].size:,}, "
        f"heldout {tokens['heldout'].size:,} (tokenizer {tokens_info['tokenizer_train_s']}s, "
        f"tokenize {tokens_info['tokenize_s']}s)")

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    eot_id = tok.token_to_id(EOT)
    model = build_model(cfg, eot_id)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    train_tokens = tokens["train"]
    if train_tokens.size <= cfg.seq_len + 1:
        raise ValueError(f"training split has {train_tokens.size} tokens; need more than --seq-len + 1")
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else None
    log(f"model: {n_params / 1e6:.2f}M parameters, {cfg.layers}x{cfg.hidden}, dtype {cfg.dtype}, "
        f"{torch.get_num_threads()} threads; budget: {cfg.steps} steps"
        + (f" or {cfg.minutes} min, whichever comes first" if budget_s else ""))

    # --- train: random packed windows, AdamW, warmup + cosine over the budget
    def next_batch() -> torch.Tensor:
        starts = rng.integers(0, train_tokens.size - cfg.seq_len, size=cfg.batch_size)  # high is exclusive
        return torch.from_numpy(np.stack([train_tokens[s:s + cfg.seq_len + 1] for s in starts]).astype(np.int64))

    step, tokens_seen, loss_ema, train_s = train_loop(model, next_batch, cfg, cfg.steps, cfg.lr, budget_s)

    # --- evaluate: held-out CE against the unigram baseline, on the same targets
    t0 = time.time()
    windows = eval_windows(tokens["heldout"], cfg.seq_len, cfg.eval_tokens)
    ce = heldout_ce(model, windows, cfg)
    uni = unigram_ce(train_tokens, windows, cfg.vocab_size)
    log(f"trained {step} steps, {tokens_seen:,} tokens in {train_s:.0f}s ({tokens_seen / train_s:.0f} tok/s); "
        f"held-out CE {ce:.3f} nats/token vs unigram {uni:.3f} over {windows[:, 1:].numel():,} tokens "
        f"(eval {time.time() - t0:.0f}s)")

    # --- save to a temp folder, check it loads back identically, then rename into place
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                     model_max_length=cfg.max_positions)
    report = {"recipe": recipe, "recipe_hash": final.name.removeprefix("teacher-"), "params": n_params,
              "steps": step, "tokens_seen": tokens_seen, "train_seconds": round(train_s, 1),
              "tokens_per_second": round(tokens_seen / train_s, 1), "final_train_loss_ema": round(loss_ema, 4),
              "heldout_ce": round(ce, 4), "unigram_ce": round(uni, 4), "heldout_eval_tokens": windows[:, 1:].numel(),
              "corpus": {k: corpus[k] for k in ("stdlib", "python_version", "files", "bytes", "skipped")},
              "tokens": tokens_info, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "document_separator": f"{EOT} (id {eot_id}) before each file; prepend it as BOS when scoring a document"}
    save_teacher(final, model, hf_tok, tok, make_corpus.read_split(corpus_dir, "heldout")[0][:2000], report)
    log(f"saved teacher to {final}")
    check_teacher(final, cfg.min_gain)
    return _copy_out(final, cfg.out)


def teacher_problem(report: dict, min_gain: float) -> str | None:
    """Why the teacher described by `report` (its teacher.json) is not worth distilling from, or None when it is.

    A teacher must beat the unigram baseline on held-out text by a clear margin: one at the unigram level has learned
    nothing but token frequencies, and a student distilled from it gets worse, not better (issue 9: 66 steps gave
    6.613 against 6.625). The default 2,000 steps reach 4.400, 2.2 below; 1,500 steps reached 4.52.
    """
    ce, uni = report["heldout_ce"], report["unigram_ce"]
    if uni - ce >= min_gain:
        return None
    budget = report["recipe"]["settings"]
    how = f"{report['steps']} steps" + (f" (cut at {budget['minutes']} min)" if budget.get("minutes") else "")
    side = f"{uni - ce:.3f} below" if ce <= uni else f"{ce - uni:.3f} above"
    return (f"the teacher is too weak to distill from: its held-out CE is {ce:.3f} nats/token, {side} the "
            f"unigram baseline {uni:.3f}, but at least {min_gain:g} below is expected; it was trained {how}. Train it "
            f"longer: TEACHER_STEPS={TeacherConfig.steps} (the default) or more for scripts/demo.sh, "
            f"--steps {TeacherConfig.steps} for scripts/make_teacher.py")


def check_teacher(folder: Path, min_gain: float | None) -> None:
    """Raise a one-line UserError when the teacher in `folder` fails `teacher_problem` (no check when min_gain is None)."""
    if min_gain is None:
        return
    report = json.loads((folder / "teacher.json").read_text())
    problem = teacher_problem(report, min_gain)
    if problem:
        raise UserError(f"{problem} (teacher folder {folder})")
    log(f"teacher check passed: held-out CE {report['heldout_ce']:.3f} is {report['unigram_ce'] - report['heldout_ce']:.3f} "
        f"nats/token below the unigram baseline {report['unigram_ce']:.3f} (required: {min_gain:g})")


# The --chat fine-tune's settings: in the chat teacher's recipe (scripts/chat_teacher.py), never in the text teacher's.
CHAT_FIELDS = {"chat", "chat_steps", "chat_lr", "chat_fraction", "chat_loss"}


def teacher_recipe(cfg: TeacherConfig, tokens_recipe: dict) -> dict:
    """What the cache key hashes: exactly the settings that determine the weights.

    Not where things live (cache, corpus, stdlib, out), not what is only measured afterwards (eval_tokens), and the time
    limit only when one was chosen (then the weights depend on the machine, and the key says so).
    """
    skip = ({"cache_dir", "corpus_dir", "stdlib", "out", "eval_tokens", "min_gain"} | CHAT_FIELDS
            | ({"minutes"} if cfg.minutes is None else set()))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return {"version": RECIPE_VERSION, "tokens": tokens_recipe, "settings": settings}


def progress_line(step: int, steps: int, elapsed: float, loss: float) -> str:
    """`step 400/2000 (20%), loss 5.123, 1m52s elapsed, ETA 7m28s` (the ETA assumes the pace so far)."""
    eta = elapsed / step * (steps - step) if step else float("nan")
    return (f"step {step}/{steps} ({step / steps:.0%}), loss {loss:.3f}, {_mmss(elapsed)} elapsed, "
            f"ETA {_mmss(eta)}")


def _mmss(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _copy_out(final: Path, out: str | None) -> Path:
    """Copy the cached teacher to `out` (atomically, replacing only an older teacher folder); return the path to use."""
    if out is None:
        return final
    out_path = Path(out).resolve()
    if out_path.exists() and any(out_path.iterdir()) and not (out_path / "teacher.json").exists():
        raise FileExistsError(f"--out {out_path} exists and is not a teacher folder; pass an empty or new folder")
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    shutil.rmtree(out_path, ignore_errors=True)
    os.rename(tmp, out_path)
    log(f"copied teacher to {out_path}")
    return out_path


def parse_args(argv: list[str] | None = None) -> TeacherConfig:
    docs = field_help(TeacherConfig)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TeacherConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=docs[f.name])
            continue
        kind = {"minutes": float, "min_gain": float}.get(f.name) or (type(f.default) if f.default is not None else str)
        parser.add_argument(flag, type=kind, default=f.default, help=docs[f.name],
                            choices={"dtype": ("bfloat16", "float32"), "chat_loss": ("all", "assistant")}.get(f.name))
    return TeacherConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    path = run_or_exit(make_teacher, parse_args(argv))
    print(path, flush=True)  # last stdout line: the folder to pass to from_pretrained


if __name__ == "__main__":
    main()
