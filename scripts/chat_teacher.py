"""The project's chat teacher: the text teacher of scripts/make_teacher.py taught the ChatML chat format on the stdlib
conversations of `scripts/make_corpus.py --chat`. Run through `python scripts/make_teacher.py --chat`, which

1. builds (or reuses) the text teacher, then loads it,
2. adds `<|im_start|>` and `<|im_end|>` as special tokens (single ids after the BPE vocabulary) and a ChatML chat
   template that opens with the document separator `<|endoftext|>` as BOS (each file of the text teacher's training
   started with it), and resizes the embeddings: old rows untouched, new rows the mean of the old ones, so every
   logit of an old token is unchanged before the fine-tune,
3. fine-tunes on a mix for `--chat-steps` seeded steps: in every batch `round(batch_size * chat_fraction)` random
   windows of the rendered training conversations (learning their assistant tokens, as supervised chat fine-tuning
   does, or with `--chat-loss all` every token) and the rest from the text stream, so it keeps its text,
4. measures held-out CE on the assistant tokens (exactly the positions `distill precompute --train-on assistant`
   trains, found by `pipeline.chat`) before and after, next to a unigram baseline of the training conversations'
   assistant tokens, and text held-out CE after (what the mix cost the text),
5. saves `CACHE_DIR/chat-teacher-<recipe hash>/` atomically (model, tokenizer with its template, teacher.json), reused
   when the recipe (the base teacher's recipe hash, the conversations, template, steps, lr, mix) is unchanged.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import make_corpus
import make_teacher
from make_teacher import EOT, TeacherConfig, log

# Bump when a change here changes the fine-tuned result for the same flags.
CHAT_RECIPE_VERSION = 1
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML without generation markers (what most chat models ship); BOS first, as the text teacher saw before each file.
CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def to_chat(folder: str | os.PathLike):
    """Load the text teacher in `folder` and give it the chat format: (model float32, tokenizer with template).

    The two special tokens get the ids after the vocabulary; their embedding rows (tied: also their output rows) start
    as the mean of the old rows, a token the model finds neither likely nor unlikely.
    """
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    old = model.config.vocab_size
    if len(tok) != old:
        raise ValueError(f"teacher in {folder} has {len(tok)} tokenizer tokens but vocab_size {old}; expected a "
                         "teacher saved by make_teacher.py")
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.chat_template = CHATML
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m.weight): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight[old:] = emb.weight[:old].mean(0)  # (V_new - V_old, H)
    ends = [tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(IM_END)]
    model.generation_config.eos_token_id = ends  # a chat reply ends at <|im_end|>, a document at <|endoftext|>
    return model, tok


def read_conversations(path: Path) -> list[list[dict]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f]


def conversation_stream(targets: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """All conversations (`assistant_targets`, each opening with BOS) one after the other: ids (N,) and the flags of
    the assistant tokens (N,)."""
    return np.concatenate([ids for ids, _ in targets]), np.concatenate([t for _, t in targets])


def assistant_targets(tok, conversations: list[list[dict]], max_len: int | None) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Per conversation (ids (L,), trained (L,)) as `precompute --train-on assistant` marks them (`pipeline.chat`),
    cut to `max_len` tokens; also how many were cut."""
    from pipeline.chat import tokenize_example

    out, cut = [], 0
    for messages in conversations:
        ex = tokenize_example({"format": "chat", "messages": messages}, tok, "assistant", tok.eos_token_id)
        cut += max_len is not None and len(ex.input_ids) > max_len
        out.append((ex.input_ids[:max_len], ex.trained[:max_len]))
    return out, cut


@torch.no_grad()
def assistant_ce(model, targets: list[tuple[np.ndarray, np.ndarray]], cfg: TeacherConfig) -> tuple[float, int]:
    """Mean CE (nats) of the trained tokens, each conversation scored alone in pieces of --seq-len + 1 tokens that
    overlap by one (every token scored once), as `precompute --long-examples split` stores it: the teacher never saw a
    position past --seq-len in training, and beyond it its predictions get worse (held-out 6.097 scored whole
    against 6.033 in pieces of 256, the first chat teacher). Also returns how many tokens were scored."""
    model.eval()
    total, n = 0.0, 0
    for ids, trained in targets:
        for a in range(0, len(ids) - 1, cfg.seq_len):
            x = torch.from_numpy(np.asarray(ids[a:a + cfg.seq_len + 1], np.int64))[None]  # (1, L)
            keep = torch.from_numpy(trained[a + 1:a + cfg.seq_len + 1].astype(bool))  # (L-1,) label at p is token p+1
            if not keep.any():
                continue
            with make_teacher.autocast(cfg):
                logits = model(input_ids=x[:, :-1]).logits[0]  # (L-1, V)
            total += F.cross_entropy(logits.float()[keep], x[0, 1:][keep], reduction="sum").item()
            n += int(keep.sum())
    model.train()
    return total / n, n


def unigram_assistant_ce(train: list[tuple[np.ndarray, np.ndarray]], heldout: list[tuple[np.ndarray, np.ndarray]],
                         vocab: int) -> float:
    """Baseline: CE of the held-out assistant tokens under add-one-smoothed frequencies of the training ones."""
    counts = np.ones(vocab, np.float64)
    for ids, trained in train:
        counts += np.bincount(ids[trained == 1], minlength=vocab)
    logp = np.log(counts / counts.sum())
    return float(-np.mean(np.concatenate([logp[ids[trained == 1]] for ids, trained in heldout])))


def chat_recipe(cfg: TeacherConfig, base: Path, chat: dict) -> dict:
    """What the cache key hashes: the base teacher (its recipe hash), the conversations, the format and the fine-tune."""
    return {"version": CHAT_RECIPE_VERSION, "base": base.name, "conversations": chat["recipe"],
            "conversations_sha256": {s: c["sha256"] for s, c in chat["splits"].items()},
            "template": CHATML, "special_tokens": [IM_START, IM_END],
            "settings": {"chat_steps": cfg.chat_steps, "chat_lr": cfg.chat_lr, "chat_fraction": cfg.chat_fraction}
            # only when chosen, so the teachers cached before the option keep their key
            | ({"chat_loss": cfg.chat_loss} if cfg.chat_loss != "all" else {})}


def make_chat_teacher(cfg: TeacherConfig, base: Path) -> Path:
    """Build (or reuse) the chat teacher fine-tuned from the text teacher in `base`; return its folder."""
    # --- setup: corpora, recipe, cache lookup
    cache_dir = Path(cfg.cache_dir).resolve()
    corpus_dir = Path(cfg.corpus_dir) if cfg.corpus_dir else cache_dir / "corpus"
    chat = make_corpus.build_chat_corpus(corpus_dir, stdlib=cfg.stdlib)
    recipe = chat_recipe(cfg, base, chat)
    final = cache_dir / f"chat-teacher-{make_teacher.short_hash(recipe)}"
    if (final / "teacher.json").exists():
        log(f"reusing cached chat teacher at {final}")
        return final
    corpus = make_corpus.build_corpus(corpus_dir, stdlib=cfg.stdlib)
    _, tokens, _ = make_teacher.load_tokens(cfg, corpus_dir, corpus)
    model, tok = to_chat(base)
    train_conv = read_conversations(corpus_dir / "chat-train.jsonl")
    held_conv = read_conversations(corpus_dir / "chat-heldout.jsonl")
    t0 = time.time()
    train_targets, _ = assistant_targets(tok, train_conv, max_len=None)
    chat_tokens, chat_trained = conversation_stream(train_targets)
    held_targets, _ = assistant_targets(tok, held_conv, max_len=None)
    uni = unigram_assistant_ce(train_targets, held_targets, len(tok))
    log(f"conversations: train {len(train_conv):,} ({chat_tokens.size:,} tokens), held-out {len(held_conv):,} "
        f"(scored in pieces of {cfg.seq_len} tokens); rendered and tokenized in {time.time() - t0:.0f}s")
    if chat_tokens.size <= cfg.seq_len + 1:
        raise ValueError(f"the training conversations hold {chat_tokens.size} tokens; need more than --seq-len + 1")
    ce_before, n_eval = assistant_ce(model, held_targets, cfg)
    log(f"before the fine-tune: held-out assistant CE {ce_before:.3f} nats/token vs unigram {uni:.3f} "
        f"over {n_eval:,} tokens")

    # --- fine-tune on the mix: chat windows first in each batch, then text windows, both seeded
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    text_tokens = tokens["train"]
    n_chat = round(cfg.batch_size * cfg.chat_fraction)

    def next_batch() -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        rows, learn = [], []
        for stream, n in ((chat_tokens, n_chat), (text_tokens, cfg.batch_size - n_chat)):
            starts = rng.integers(0, stream.size - cfg.seq_len, size=n)
            rows += [np.asarray(stream[s:s + cfg.seq_len + 1], np.int64) for s in starts]
            learn += [chat_trained[s + 1:s + cfg.seq_len + 1] == 1 if stream is chat_tokens and cfg.chat_loss == "assistant"
                      else np.ones(cfg.seq_len, bool) for s in starts]
        batch = torch.from_numpy(np.stack(rows))  # (B, T+1)
        if cfg.chat_loss == "all":
            return batch
        return batch, batch[:, 1:].masked_fill(~torch.from_numpy(np.stack(learn)), -100)  # (B, T) labels

    log(f"fine-tune: {cfg.chat_steps} steps of {n_chat} conversation + {cfg.batch_size - n_chat} text windows "
        f"x {cfg.seq_len} tokens, peak lr {cfg.chat_lr:g}, learning {cfg.chat_loss} tokens of the conversations")
    step, tokens_seen, loss_ema, train_s = make_teacher.train_loop(model, next_batch, cfg, cfg.chat_steps, cfg.chat_lr)

    # --- evaluate: assistant tokens of the held-out conversations, and held-out text
    ce_after, _ = assistant_ce(model, held_targets, cfg)
    windows = make_teacher.eval_windows(tokens["heldout"], cfg.seq_len, cfg.eval_tokens)
    text_ce = make_teacher.heldout_ce(model, windows, cfg)
    base_report = json.loads((base / "teacher.json").read_text())
    log(f"trained {step} steps, {tokens_seen:,} tokens in {train_s:.0f}s; held-out assistant CE {ce_before:.3f} -> "
        f"{ce_after:.3f} nats/token (unigram {uni:.3f}); held-out text CE {text_ce:.3f} "
        f"(base teacher {base_report['heldout_ce']:.3f})")

    # --- save to a temp folder, check it loads back identically (chat template included), then rename into place
    def keeps_template(folder: Path) -> None:
        if AutoTokenizer.from_pretrained(folder).chat_template != CHATML:
            raise RuntimeError(f"the tokenizer saved in {folder} lost its chat template")

    report = {"recipe": recipe, "recipe_hash": final.name.removeprefix("chat-teacher-"), "base_teacher": str(base),
              "vocab_size": len(tok), "special_tokens": {t: tok.convert_tokens_to_ids(t) for t in (EOT, IM_START, IM_END)},
              "steps": step, "tokens_seen": tokens_seen, "conversation_windows_per_step": n_chat,
              "train_seconds": round(train_s, 1), "final_train_loss_ema": round(loss_ema, 4),
              "assistant_ce_before": round(ce_before, 4), "assistant_ce_after": round(ce_after, 4),
              "assistant_unigram_ce": round(uni, 4), "assistant_eval_tokens": n_eval,
              "heldout_conversations": len(held_conv), "assistant_eval_piece_tokens": cfg.seq_len,
              "text_heldout_ce_after": round(text_ce, 4), "text_heldout_ce_base": base_report["heldout_ce"],
              "text_heldout_eval_tokens": windows[:, 1:].numel(), "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    sample = tok.apply_chat_template(held_conv[0], tokenize=False)
    make_teacher.save_teacher(final, model, tok, tok.backend_tokenizer, sample, report, check=keeps_template)
    log(f"saved chat teacher to {final}")
    return final
