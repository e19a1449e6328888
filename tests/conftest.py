"""Shared fixtures: a tokenizer trained here with the `tokenizers` library, tiny real teachers built from configs, a small
real corpus (files of the CPython standard library). Nothing is downloaded."""

from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path

import pytest

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The shard cache and staging folders default to $XDG_CACHE_HOME/distill: give each test session its own, so no test
# reads a cache left by an earlier run (or by the user) and nothing is written into the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="distill-tests-cache-")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "colorsys.py", "bisect.py", "keyword.py", "this.py", "shlex.py"]
VOCAB = 320
EOS = "<|endoftext|>"


@pytest.fixture(autouse=True)
def own_cache_folder(tmp_path_factory, monkeypatch):
    """Each test its own $XDG_CACHE_HOME: no test reads shards an earlier test left in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def corpus_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in CORPUS_FILES if (STDLIB / name).exists()]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP threads cost ~10x.
    Subprocess tests pass OMP_NUM_THREADS=1 too, so in- and out-of-process runs compute alike."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of real Python source files (one document each)."""
    d = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        src = STDLIB / name
        if src.exists():
            (d / name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 320) trained on the corpus, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS)
    d = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(d))
    return d


def save_tiny_model(config, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Spread the output distribution a little so top-k is not degenerate at random init.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama teacher: 2 layers, width 48, vocab 320, 64 positions."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return save_tiny_model(config, tokenizer_dir, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def gpt2_teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random GPT-2 teacher (tied embeddings), to check we are not Llama-specific."""
    from transformers import AutoTokenizer, GPT2Config

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return save_tiny_model(config, tokenizer_dir, tmp_path_factory.mktemp("gpt2"))
