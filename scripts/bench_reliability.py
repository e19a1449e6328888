"""Reliability benchmark (issue 9, R1-R5): fault injection on tiny real fixtures, reported as counts.

R1  `distill precompute` killed with SIGKILL at random points, then rerun: the final dataset must be byte-identical to an
    uninterrupted run (the manifest compared without `created_by`, which holds the per-process timing sessions,
    docs/FORMAT.md) and hold no leftovers (the same set of files as the uninterrupted run).
R2  `distill train` killed with SIGKILL at random points, then `--resume`: final weights identical (every tensor).
R3  one byte flipped in every kind of dataset file: `distill verify` and `distill train` must both refuse
    (exit != 0, no traceback) and train must write no model.
R4  bad inputs to every command: one-line error, exit != 0, no traceback, nothing that existed before changed.
R5  malicious datasets: refused by verify and train (exit != 0, no traceback, no hang), nothing outside written.

Fixtures are built here, as the tests build theirs: a byte-level BPE tokenizer trained with `tokenizers` on CPython
standard-library files, tiny random Llama teacher/students and a tiny BERT from configs (save_pretrained). Every command
runs as a real subprocess (`python -m pipeline.common.cli`, the `distill` entry point) with a timeout; a timeout is a
failure, never a hung benchmark.

    python scripts/bench_reliability.py            # full run (~17 min on a busy 2-core machine)
    python scripts/bench_reliability.py --quick    # a few cases per section (~1.5 min)

The table goes to .cache/bench/reliability.md (and stdout). Some R4 cases need root (tmpfs / read-only bind mounts);
without it they fall back to RLIMIT_FSIZE or are reported as skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO  # where `pipeline` and `trainer` are imported from (main() points it at a snapshot of the working tree)
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "colorsys.py", "bisect.py", "keyword.py", "this.py", "shlex.py", "heapq.py", "fnmatch.py",
                "glob.py", "getopt.py", "queue.py", "sched.py", "string.py", "token.py", "tabnanny.py", "netrc.py"]
VOCAB = 320
EOS = "<|endoftext|>"
T, K = 16, 8  # window length and stored top-k
TIMEOUT = 180  # seconds for any one command


# --- fixtures ----------------------------------------------------------------------------------------------------


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def distill(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.common.cli", *map(str, args)]


def train_tokenizer(out: Path, texts: list[str], vocab: int = VOCAB) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                            unk_token=EOS).save_pretrained(str(out))
    return out


def save_model(config, tokenizer_dir: Path, out: Path, seed: int, causal: bool = True) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # spread the output distribution a little (non-degenerate top-k)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def llama_student(vocab: int = VOCAB) -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False).to_dict()


@dataclass
class Fixtures:
    root: Path
    corpus: Path = None
    tokenizer: Path = None
    teacher: Path = None
    student_config: Path = None
    student: Path = None
    bert: Path = None
    bert_config: Path = None
    other_vocab_config: Path = None
    other_tokenizer_student: Path = None
    dataset: Path = None  # precomputed with hidden states (Arrow + Zarr)
    precompute_args: list = field(default_factory=list)


def build_fixtures(root: Path, windows: int) -> Fixtures:
    import torch
    from transformers import AutoTokenizer, BertConfig, LlamaConfig

    torch.set_num_threads(1)
    f = Fixtures(root)
    f.corpus = root / "corpus"
    f.corpus.mkdir(parents=True)
    texts = []
    for name in CORPUS_FILES:
        if (STDLIB / name).exists():
            text = (STDLIB / name).read_text(encoding="utf-8")
            (f.corpus / name).write_text(text, encoding="utf-8")
            texts.append(text)
    f.tokenizer = train_tokenizer(root / "tokenizer", texts)
    tok = AutoTokenizer.from_pretrained(str(f.tokenizer))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, tie_word_embeddings=False)
    f.teacher = save_model(config, f.tokenizer, root / "teacher", seed=0)
    f.student_config = root / "student-config.json"
    f.student_config.write_text(json.dumps(llama_student()))
    f.student = save_model(LlamaConfig(**llama_student()), f.tokenizer, root / "student", seed=1)
    f.other_vocab_config = root / "student-vocab400.json"
    f.other_vocab_config.write_text(json.dumps(llama_student(400)))
    # Same vocabulary size, another tokenizer (trained on reversed texts: other merges, other ids).
    other_tok = train_tokenizer(root / "tokenizer-other", [t[::-1] for t in texts])
    f.other_tokenizer_student = save_model(LlamaConfig(**llama_student()), other_tok, root / "student-other-tok", seed=2)
    bert = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=64, pad_token_id=tok.eos_token_id)
    f.bert = save_model(bert, f.tokenizer, root / "bert", seed=3, causal=False)
    f.bert_config = root / "bert-config.json"
    f.bert_config.write_text(json.dumps(bert.to_dict()))
    f.precompute_args = ["--teacher", f.teacher, "--data", f.corpus, "--seq-len", T, "--top-k", K, "--hidden-layers", "1,2",
                         "--batch-size", 4, "--shard-size", 8, "--max-tokens", windows * T, "--device", "cpu", "--dtype",
                         "float32", "--no-progress"]
    f.dataset = root / "dataset"
    r = run(distill("precompute", *f.precompute_args, "--out", f.dataset))
    if r.rc != 0:
        raise SystemExit(f"fixture precompute failed ({r.rc}): {r.stderr[-3000:]}")
    return f


# --- running commands ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    rc: int | None  # None: timed out (killed)
    stdout: str
    stderr: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def last_line(self) -> str:
        lines = [x for x in self.stderr.strip().splitlines() if x.strip()]
        return lines[-1].strip()[:220] if lines else "(no stderr)"

    @property
    def error_lines(self) -> int:
        return sum(1 for x in self.stderr.splitlines() if x.lower().startswith("error"))

    def describe(self) -> str:
        rc = "timeout" if self.rc is None else f"exit {self.rc}"
        return f"{rc}{', traceback' if self.traceback else ''}: {self.last_line}"


def run(cmd, timeout: float = TIMEOUT, **kw) -> Result:
    start = time.time()
    proc = subprocess.Popen(cmd, env=kw.pop("env", env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, errors="replace", **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, err, time.time() - start)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Result(None, out, err, time.time() - start)


def clean_refusal(r: Result) -> tuple[bool, str]:
    """Exit != 0, no traceback, no timeout, one error line."""
    if r.rc is None:
        return False, r.describe()
    if r.rc == 0:
        return False, f"exit 0 (accepted): {r.last_line}"
    if r.rc < 0:
        return False, f"killed by signal {-r.rc}: {r.last_line}"
    if r.traceback:
        return False, r.describe()
    if r.error_lines != 1:
        return False, f"{r.error_lines} error lines: {r.describe()}"
    return True, r.describe()


def tree_digest(*paths: Path) -> dict:
    """path -> (kind, sha256 or link target) for every entry under paths (not following symlinks)."""
    out = {}
    for base in paths:
        base = Path(base)
        if not os.path.lexists(base):
            out[str(base)] = ("absent",)
            continue
        todo = [base]
        while todo:
            p = todo.pop()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[str(p)] = ("dir",)
                todo += sorted(p.iterdir())
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = ("special", stat.S_IFMT(st.st_mode))
    return out


def digest_diff(before: dict, after: dict) -> str:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return ", ".join(changed[:4]) + (f" (+{len(changed) - 4})" if len(changed) > 4 else "")


def wait_for(pred, timeout: float, proc=None, poll: float = 0.002) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def timed_run(cmd, out: Path) -> tuple[float, Result]:
    """Run to the end; also return when `out` appeared (seconds after the start): where the command's writing begins."""
    start = time.time()
    proc = popen(cmd)
    wait_for(lambda: os.path.lexists(out), TIMEOUT, proc)
    first = time.time() - start
    r = finish(proc, TIMEOUT)
    r.seconds = time.time() - start
    return min(first, r.seconds), r


def sigkill(proc: subprocess.Popen) -> bool:
    """True when the process was still running and got killed."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return alive


def popen(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, errors="replace")


# --- results -----------------------------------------------------------------------------------------------------------


@dataclass
class Section:
    key: str
    title: str
    cases: list = field(default_factory=list)  # (name, ok, detail)
    notes: list = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.cases.append((name, ok, detail))
        print(f"  [{self.key}] {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    @property
    def passed(self) -> int:
        return sum(ok for _, ok, _ in self.cases)


# --- R1: precompute killed -----------------------------------------------------------------------------------------


def dataset_files(root: Path) -> dict:
    """relative path -> bytes digest; manifest.json compared without created_by (per-process timing sessions), the
    dataset card (README.md) with the folder's own path replaced (it quotes the command line)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir() and not p.is_symlink():
            out[rel] = "dir"
        elif rel == "README.md":  # the dataset card quotes the command line, whose --out is this folder's path
            out[rel] = hashlib.sha256(p.read_text().replace(str(root), "OUT").encode()).hexdigest()
        elif rel == "manifest.json":
            m = json.loads(p.read_text())
            m.pop("created_by", None)
            out[rel] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def compare_datasets(reference: dict, got: dict) -> str:
    """'' when identical, else what differs."""
    extra = sorted(got.keys() - reference.keys())
    missing = sorted(reference.keys() - got.keys())
    differ = sorted(k for k in reference.keys() & got.keys() if reference[k] != got[k])
    parts = []
    if extra:
        parts.append("leftovers: " + ", ".join(extra[:3]) + (f" (+{len(extra) - 3})" if len(extra) > 3 else ""))
    if missing:
        parts.append("missing: " + ", ".join(missing[:3]) + (f" (+{len(missing) - 3})" if len(missing) > 3 else ""))
    if differ:
        parts.append("differ: " + ", ".join(differ[:3]) + (f" (+{len(differ) - 3})" if len(differ) > 3 else ""))
    return "; ".join(parts)


def r1(f: Fixtures, work: Path, kills: int, windows: int, rng: random.Random) -> Section:
    s = Section("R1", "precompute killed with SIGKILL, rerun: byte-identical, no leftovers")
    # A longer capture than the fixture's, so that kills land in every phase; its uninterrupted run is the reference
    # (and its wall time under today's load spreads the random delays).
    i_max = f.precompute_args.index("--max-tokens") + 1
    args = f.precompute_args[:i_max] + [windows * T] + f.precompute_args[i_max + 1:]
    out = work / "r1-reference"
    first, r = timed_run(distill("precompute", *args, "--out", out), out)
    if r.rc != 0:
        s.add("uninterrupted run", False, r.describe())
        return s
    reference, wall = dataset_files(out), r.seconds
    s.notes.append(f"uninterrupted precompute: {wall:.1f} s wall, --out created at {first:.1f} s; "
                   f"{len([k for k in reference if k.endswith('.arrow')])} shards; random delays drawn in that window")
    triggers = ["delay", "shard", "zarr", "progress", "manifest"]
    for i in range(kills):
        trigger = triggers[i % len(triggers)] if i < kills // 2 else "delay"
        out = work / f"r1-{i}"
        proc = popen(distill("precompute", *args, "--out", out))
        shards = out / "shards"
        if trigger == "delay":
            delay = rng.uniform(first, first + 0.85 * (wall - first))  # the end of wall is teardown
            time.sleep(delay)
            what = f"after {delay:.2f} s"
        elif trigger == "shard":
            n = rng.randrange(1, max(2, len([k for k in reference if k.endswith('.arrow')])))
            wait_for(lambda shards=shards, n=n: shards.is_dir() and sum(1 for _ in shards.glob("*.arrow*")) >= n, TIMEOUT, proc)
            time.sleep(rng.uniform(0, 0.02))
            what = f"as shard file {n} appeared"
        elif trigger == "zarr":
            n = rng.randrange(1, 4)
            wait_for(lambda shards=shards, n=n: shards.is_dir() and sum(1 for _ in shards.glob("*.zarr*")) >= n, TIMEOUT, proc)
            what = f"as zarr folder {n} appeared"
        elif trigger == "progress":
            wait_for(lambda out=out: (out / "_progress").exists(), TIMEOUT, proc)
            what = "as _progress/ appeared"
        else:
            wait_for(lambda out=out: out.is_dir() and any(p.name.startswith("manifest") for p in out.iterdir()), TIMEOUT, proc)
            what = "as the manifest write began"
        killed = sigkill(proc)
        rerun = run(distill("precompute", *args, "--out", out))
        name = f"kill {i + 1} ({what})" + ("" if killed else " [had already finished]")
        if rerun.rc != 0:
            s.add(name, False, "rerun " + rerun.describe())
        else:
            diff = compare_datasets(reference, dataset_files(out))
            s.add(name, not diff, diff or "identical")
        shutil.rmtree(out, ignore_errors=True)
    return s


# --- R2: train killed ----------------------------------------------------------------------------------------------


def train_args(f: Fixtures, out: Path, steps: int = 12, data: Path | None = None) -> list:
    return ["--data", data or f.dataset, "--out", out, "--student-config", f.student_config, "--batch-size", 4, "--steps",
            steps, "--lr", "3e-3", "--warmup", 2, "--device", "cpu", "--save-every", 3, "--no-progress"]


def full_pass_args(f: Fixtures, out: Path, data: Path) -> list:
    """One epoch over every window, with the hidden-state loss on both stored layers: a train run that reads every
    byte of the dataset, so a damaged or crafted file it accepts is one it used."""
    return ["--data", data, "--out", out, "--student-config", f.student_config, "--batch-size", 4, "--epochs", 1,
            "--device", "cpu", "--hidden-weight", 1, "--hidden-map", "1:1,2:2", "--save-every", 1000, "--no-progress"]


def load_weights(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def same_weights(a: dict, b: dict) -> str:
    import numpy as np

    if a.keys() != b.keys():
        return f"tensor names differ: {sorted(a.keys() ^ b.keys())[:3]}"
    bad = [k for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]
    return f"{len(bad)} tensors differ (e.g. {bad[0]})" if bad else ""


def r2(f: Fixtures, work: Path, kills: int, rng: random.Random) -> Section:
    s = Section("R2", "train killed with SIGKILL, --resume: identical final weights")
    ref = work / "r2-ref"
    sleep = 0.25
    first, r = timed_run(distill("train", *train_args(f, ref), "--step-sleep", sleep), ref)
    if r.rc != 0:
        s.add("uninterrupted run", False, r.describe())
        return s
    reference, wall = load_weights(ref), r.seconds
    s.notes.append(f"uninterrupted train: 12 steps, --save-every 3, --step-sleep {sleep}, {wall:.1f} s wall, --out created "
                   f"at {first:.1f} s; random delays drawn in that window")
    for i in range(kills):
        out = work / f"r2-{i}"
        proc = popen(distill("train", *train_args(f, out), "--step-sleep", sleep))
        if i % 3 == 2:  # right when a checkpoint is being written
            ck = out / "checkpoints"
            wait_for(lambda ck=ck: ck.is_dir() and any(ck.iterdir()), TIMEOUT, proc)
            time.sleep(rng.uniform(0, 0.05))
            what = "as the first checkpoint write began"
        else:
            delay = rng.uniform(first, first + 0.85 * (wall - first))  # the end of wall is teardown
            time.sleep(delay)
            what = f"after {delay:.2f} s"
        killed = sigkill(proc)
        rerun = run(distill("train", *train_args(f, out), "--step-sleep", 0, "--resume"))
        name = f"kill {i + 1} ({what})" + ("" if killed else " [had already finished]")
        if rerun.rc != 0:
            s.add(name, False, "--resume " + rerun.describe())
        else:
            diff = same_weights(reference, load_weights(out))
            s.add(name, not diff, diff or "identical")
        shutil.rmtree(out, ignore_errors=True)
    return s


# --- R3: flipped bytes ---------------------------------------------------------------------------------------------


def file_kinds(ds: Path) -> dict:
    """kind -> list of files of the dataset."""
    # The dataset card (README.md) is for people and the hub, who may edit it; no stage reads it and verify does not
    # check it (docs/FORMAT.md), so a flipped byte there is not a failure to detect.
    files = [p for p in sorted(ds.rglob("*")) if p.is_file() and p.relative_to(ds).as_posix() != "README.md"]
    kinds = {
        "Arrow shard": [p for p in files if p.suffix == ".arrow"],
        "Zarr chunk": [p for p in files if ".zarr" in str(p) and p.name != "zarr.json"],
        "zarr.json": [p for p in files if p.name == "zarr.json"],
        "manifest.json": [ds / "manifest.json"],
        "tokenizer file": [p for p in files if p.parent.name == "tokenizer"],
    }
    others = set(files) - {p for v in kinds.values() for p in v}
    if others:
        kinds["other file"] = sorted(others)
    return {k: v for k, v in kinds.items() if v}


def semantically_same_json(a: bytes, b: bytes) -> bool:
    try:
        x, y = json.loads(a), json.loads(b)
    except ValueError:
        return False
    if isinstance(x, dict) and isinstance(y, dict):
        x.pop("created_by", None), y.pop("created_by", None)
    return x == y


def r3(f: Fixtures, work: Path, per_kind: int, rng: random.Random, only: str = "", jobs: int = 1) -> Section:
    s = Section("R3", "one byte flipped: detected by verify and by train before it uses the data")
    kinds = {k: v for k, v in file_kinds(f.dataset).items() if only.lower() in k.lower()}
    flips = []  # (kind, file, offset, xor): drawn up front so the cases do not depend on the order they finish in
    for kind, files in kinds.items():
        for _ in range(per_kind):
            src = rng.choice(files)
            flips.append((kind, src, rng.randrange(src.stat().st_size), rng.randrange(1, 256)))

    def one(i, kind, src, off, xor):
        ds, out = work / f"r3-ds-{i}", work / f"r3-run-{i}"
        shutil.copytree(f.dataset, ds, symlinks=True)
        target = ds / src.relative_to(f.dataset)
        original = target.read_bytes()
        data = bytearray(original)
        data[off] ^= xor
        target.write_bytes(bytes(data))
        name = f"{kind}: {target.relative_to(ds)} byte {off} ^ 0x{xor:02x}"
        harmless = target.name == "manifest.json" and semantically_same_json(original, bytes(data))
        v = run(distill("verify", ds, "--no-progress"), timeout=120)
        t = run(distill("train", *full_pass_args(f, out, ds)), timeout=180)
        model_written = (out / "model").exists()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ds, ignore_errors=True)
        v_ok, v_detail = clean_refusal(v)
        t_ok, t_detail = clean_refusal(t)
        if harmless:  # whitespace or timing only: exit 0 or a clean refusal are both right
            return name + " (no-op edit)", (v.rc == 0 or v_ok) and (t.rc == 0 or t_ok), f"verify {v.describe()}; train {t.describe()}"
        ok = v_ok and t_ok and not model_written
        detail = f"verify {v_detail}; train {t_detail}" + ("; train wrote model/" if model_written and not ok else "")
        return name, ok, detail if not ok else f"verify: {v.last_line[:90]} | train: {t.last_line[:90]}"

    run_cases(s, [lambda i=i, fl=fl: one(i, *fl) for i, fl in enumerate(flips)], jobs)
    return s


def run_cases(s: Section, cases: list, jobs: int) -> None:
    """Run independent cases (callables returning (name, ok, detail)) on `jobs` threads; results kept in case order."""
    from concurrent.futures import ThreadPoolExecutor

    def guarded(c):
        try:
            return c()
        except Exception as e:  # a broken case is a failure in the table, not a lost run
            return f"case #{cases.index(c) + 1}", False, f"benchmark error: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for name, ok, detail in pool.map(guarded, cases):
            s.add(name, ok, detail)


# --- R4: bad inputs ----------------------------------------------------------------------------------------------------


class Mount:
    """A tiny tmpfs (size) or, without size, a read-only bind mount of an empty folder (root ignores permission bits);
    ok is False when mounting is not allowed here."""

    def __init__(self, path: Path, size: str | None = None):
        self.path, self.ok = path, False
        path.mkdir(parents=True, exist_ok=True)
        if size:
            cmds = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]]
        else:
            cmds = [["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,ro,bind", str(path)]]
        try:
            for c in cmds:
                subprocess.run(c, check=True, capture_output=True, timeout=20)
            self.ok = True
        except (OSError, subprocess.SubprocessError):
            self.close()

    def close(self) -> None:
        subprocess.run(["umount", str(self.path)], capture_output=True, timeout=20, check=False)


def newer_format(src: Path, out: Path) -> Path:
    shutil.copytree(src, out, symlinks=True)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = m["format_version"] + 1
    m["settings"]["format_version"] = m["format_version"]
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


def r4(f: Fixtures, work: Path, quick: bool, only: str = "", jobs: int = 1) -> Section:
    s = Section("R4", "bad inputs: one-line error, exit != 0, no traceback, nothing existing changed")
    w = work / "r4"
    w.mkdir()
    user = w / "user"  # the user's own files
    user.mkdir()
    a_file = user / "notes.txt"
    a_file.write_text("my notes\n")
    busy = user / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("keep me\n")
    empty_jsonl = user / "empty.jsonl"
    empty_jsonl.write_bytes(b"")
    no_text = user / "notext.jsonl"
    no_text.write_text('{"body": "hello"}\n{"body": "world"}\n')
    bad_line = user / "badline.jsonl"
    bad_line.write_text('{"text": "fine"}\n{"text": \n')
    bad_parquet = user / "garbage.parquet"
    bad_parquet.write_bytes(os.urandom(256))
    bad_json = user / "bad.json"
    bad_json.write_text('{"steps": 4, "lr": ')
    newer = newer_format(f.dataset, user / "newer-ds")
    other_ds = user / "other-ds"
    shutil.copytree(f.dataset, other_ds)
    protect_all = [f.root, user]
    p_args = [a for a in f.precompute_args]

    def case(name, cmd, *, timeout=TIMEOUT, protect=(), post=None):
        before = tree_digest(*protect_all, *protect)
        r = run(cmd, timeout=timeout)
        ok, detail = clean_refusal(r)
        after = tree_digest(*protect_all, *protect)
        if before != after:
            ok, detail = False, f"changed existing files: {digest_diff(before, after)}; {detail}"
        if ok and post:
            extra = post()
            if extra:
                ok, detail = False, f"{extra}; {detail}"
        return name, ok, detail

    def pre(**over):
        args = list(p_args)
        for k, v in over.items():
            flag = "--" + k.replace("_", "-")
            if flag in args:
                args[args.index(flag) + 1] = v
            else:
                args += [flag, v]
        return args

    def t_base(out, **kw):
        return train_args(f, out, steps=2, **kw)

    cases = [
        ("precompute --out is a file", distill("precompute", *p_args, "--out", a_file)),
        ("precompute --out is a non-empty folder of the user's files", distill("precompute", *p_args, "--out", busy)),
        ("precompute --out is a dataset made with other settings (--top-k 4)",
         distill("precompute", *pre(top_k=4), "--out", other_ds)),
        ("precompute --data is a zero-byte .jsonl", distill("precompute", *pre(data=empty_jsonl), "--out", w / "o1")),
        ("precompute --data .jsonl without the text column", distill("precompute", *pre(data=no_text), "--out", w / "o2")),
        ("precompute --data .jsonl with an invalid JSON line", distill("precompute", *pre(data=bad_line), "--out", w / "o3")),
        ("precompute --data garbage .parquet", distill("precompute", *pre(data=bad_parquet), "--out", w / "o4")),
        ("precompute --data missing path", distill("precompute", *pre(data=w / "nope.txt"), "--out", w / "o5")),
        ("precompute --teacher missing folder", distill("precompute", *pre(teacher=w / "no-teacher"), "--out", w / "o6")),
        ("precompute --teacher BERT (not a causal LM)", distill("precompute", *pre(teacher=f.bert), "--out", w / "o7")),
        ("precompute --top-k 1000 (> vocab 320)", distill("precompute", *pre(top_k=1000), "--out", w / "o8")),
        ("precompute --hidden-layers 9 (teacher has 2)", distill("precompute", *pre(hidden_layers="9"), "--out", w / "o9")),
        ("precompute --seq-len 0", distill("precompute", *pre(seq_len=0), "--out", w / "o10")),
        ("verify FILE (not a folder)", distill("verify", a_file)),
        ("verify missing path", distill("verify", w / "nope")),
        ("verify dataset of a newer format version", distill("verify", newer)),
        ("inspect FILE", distill("inspect", a_file)),
        ("inspect folder without manifest", distill("inspect", busy)),
        ("inspect dataset of a newer format version", distill("inspect", newer)),
        ("train --out is a file", distill("train", *t_base(a_file))),
        ("train --out is a non-empty folder of the user's files", distill("train", *t_base(busy))),
        ("train dataset of a newer format version", distill("train", *t_base(w / "t1", data=newer))),
        ("train --data missing", distill("train", *t_base(w / "t2", data=w / "nope"))),
        ("train --student-config with another vocabulary (400)",
         distill("train", *[a if a != f.student_config else f.other_vocab_config for a in t_base(w / "t3")])),
        ("train --student with another tokenizer (same size)",
         distill("train", *[a for a in t_base(w / "t4") if a not in ("--student-config", f.student_config)], "--student",
                 f.other_tokenizer_student)),
        ("train --student missing folder",
         distill("train", *[a for a in t_base(w / "t5") if a not in ("--student-config", f.student_config)], "--student",
                 w / "no-student")),
        ("train --student BERT folder",
         distill("train", *[a for a in t_base(w / "t6") if a not in ("--student-config", f.student_config)], "--student", f.bert)),
        ("train --student-config BERT config",
         distill("train", *[a if a != f.student_config else f.bert_config for a in t_base(w / "t7")])),
        ("train --student-config invalid JSON",
         distill("train", *[a if a != f.student_config else bad_json for a in t_base(w / "t8")])),
        ("train --config invalid JSON", distill("train", *t_base(w / "t9"), "--config", bad_json)),
        ("train --batch-size 0", distill("train", *[a if a != 4 else 0 for a in t_base(w / "t10")])),
        ("train --hidden-map 5:9 (no such layers)", distill("train", *t_base(w / "t11"), "--hidden-weight", 1, "--hidden-map", "5:9")),
        ("eval --batch-size 0", distill("eval", "--student", f.student, "--data", f.dataset, "--batch-size", 0, "--device", "cpu")),
        ("eval --student missing folder", distill("eval", "--student", w / "no-student", "--data", f.dataset, "--device", "cpu")),
        ("eval --student BERT", distill("eval", "--student", f.bert, "--data", f.dataset, "--device", "cpu")),
        ("eval --data is a file", distill("eval", "--student", f.student, "--data", a_file, "--device", "cpu")),
        ("eval dataset of a newer format version", distill("eval", "--student", f.student, "--data", newer, "--device", "cpu")),
    ]
    if quick:
        cases = [c for c in cases if c[0] in ("precompute --out is a file", "verify FILE (not a folder)",
                                              "precompute --data is a zero-byte .jsonl", "eval --batch-size 0")]
    cases = [c for c in cases if only.lower() in c[0].lower()]
    run_cases(s, [lambda name=name, cmd=cmd: case(name, cmd) for name, cmd in cases], jobs)
    if quick or only:
        return s

    # Read-only output folder: a read-only bind mount (root ignores permission bits).
    ro = Mount(w / "ro")
    if ro.ok:
        try:
            s.add(*case("precompute --out inside a read-only folder", distill("precompute", *p_args, "--out", ro.path / "ds")))
            s.add(*case("train --out inside a read-only folder", distill("train", *t_base(ro.path / "run"))))
        finally:
            ro.close()
    else:
        s.notes.append("read-only folder: skipped (mount --bind/remount ro not permitted here)")
    # Disk full: a 96 KiB tmpfs.
    for label, cmd_of in (("precompute", lambda d: distill("precompute", *p_args, "--out", d / "ds")),
                          ("train", lambda d: distill("train", *t_base(d / "run")))):
        full = Mount(w / f"full-{label}", size="96k")
        if full.ok:
            try:
                s.add(*case(f"{label} on a full disk (96 KiB tmpfs)", cmd_of(full.path)))
            finally:
                full.close()
        else:
            s.notes.append(f"disk full ({label}): skipped (tmpfs mount not permitted here)")
    # Two writers on one --out.
    s.cases.append(two_precomputes(f, w))
    print(f"  [R4] {'ok  ' if s.cases[-1][1] else 'FAIL'} {s.cases[-1][0]}: {s.cases[-1][2]}", flush=True)
    s.cases.append(two_trains(f, w))
    print(f"  [R4] {'ok  ' if s.cases[-1][1] else 'FAIL'} {s.cases[-1][0]}: {s.cases[-1][2]}", flush=True)
    return s


def finish(proc: subprocess.Popen, timeout: float) -> Result:
    start = time.time()
    try:
        _, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, "", err, time.time() - start)
    except subprocess.TimeoutExpired:
        sigkill(proc)
        return Result(None, "", proc.stderr.read() if proc.stderr else "", time.time() - start)


def two_writers_verdict(a: Result, b: Result) -> tuple[bool, str]:
    results = sorted([a, b], key=lambda r: r.rc != 0)
    first, second = results
    if first.rc != 0:
        return False, f"neither finished: A {a.describe()}; B {b.describe()}"
    if second.rc == 0:
        return False, "both exited 0 (no exclusion of the second writer)"
    ok, detail = clean_refusal(second)
    return ok, "one finished, the other: " + detail


def two_precomputes(f: Fixtures, w: Path) -> tuple:
    name = "precompute x2 on one --out at once (no --rank)"
    out = w / "two-pre"
    args = [a if a != f.precompute_args[f.precompute_args.index("--max-tokens") + 1] else 640 * T for a in f.precompute_args]
    a = popen(distill("precompute", *args, "--out", out))
    b = popen(distill("precompute", *args, "--out", out))
    ra, rb = finish(a, TIMEOUT), finish(b, TIMEOUT)
    ok, detail = two_writers_verdict(ra, rb)
    v = run(distill("verify", out, "--no-progress"))
    if v.rc != 0:
        ok, detail = False, f"{detail}; then verify {v.describe()}"
    return name, ok, detail


def two_trains(f: Fixtures, w: Path) -> tuple:
    name = "train x2 on one --out at once"
    out = w / "two-train"
    a = popen(distill("train", *train_args(f, out), "--step-sleep", 0.5))
    wait_for(lambda: out.exists(), TIMEOUT, a)
    b = popen(distill("train", *train_args(f, out), "--step-sleep", 0.5))
    rb = finish(b, TIMEOUT)
    a_running_when_b_ended = a.poll() is None
    ra = finish(a, TIMEOUT)
    ok, detail = two_writers_verdict(ra, rb)
    if not a_running_when_b_ended and rb.rc != 0 and ra.rc == 0:
        detail += " (A had already ended)"
    if ok and not (out / "model" / "model.safetensors").exists():
        ok, detail = False, f"no final model; {detail}"
    return name, ok, detail


# --- R5: malicious datasets --------------------------------------------------------------------------------------------


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def rehash(ds: Path) -> None:
    """Rewrite the manifest's checksums to match the files (what a crafted dataset would carry)."""
    m = json.loads((ds / "manifest.json").read_text())
    for shard in m["shards"]:
        for rel in shard.get("files", {}):
            p = ds / "shards" / rel
            if p.is_file() and not p.is_symlink():
                shard["files"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    tok = ds / "tokenizer"
    if tok.is_dir() and not tok.is_symlink():
        m["tokenizer"]["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                                   for p in sorted(tok.iterdir()) if p.is_file() and not p.is_symlink()}
    (ds / "manifest.json").write_text(json.dumps(m, indent=2))


def edit_manifest(ds: Path, fn) -> None:
    m = json.loads((ds / "manifest.json").read_text())
    fn(m)
    (ds / "manifest.json").write_text(json.dumps(m, indent=2))


def rewrite_arrow(path: Path, fn) -> None:
    import pyarrow as pa

    table = fn(pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all())  # in memory: the file is rewritten
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def arrow_rename(table):
    return table.rename_columns(["labelz" if n == "labels" else n for n in table.column_names])


def arrow_longer_lists(table):
    import pyarrow as pa

    col = table.column("input_ids").combine_chunks()
    rows = col.to_pylist()
    longer = pa.array([r + [r[-1]] for r in rows], pa.list_(col.type.value_type, len(rows[0]) + 1))
    return table.set_column(table.column_names.index("input_ids"), "input_ids", longer)


def arrow_drop_row(table):
    return table.slice(0, table.num_rows - 1)


def r5(f: Fixtures, work: Path, quick: bool, only: str = "", jobs: int = 1) -> Section:
    s = Section("R5", "malicious datasets: refused by verify and train, nothing outside read or written")
    w = work / "r5"
    w.mkdir()
    outside = w / "outside"  # the attacker's targets: a valid copy of the data, outside the dataset
    shutil.copytree(f.dataset, outside / "copy")
    (outside / "escape.arrow").write_bytes((f.dataset / "shards" / "00000.arrow").read_bytes())
    marker = outside / "REMOTE_CODE_RAN"
    first = "00000"

    def zarr_edit(ds, fn):
        p = ds / "shards" / f"{first}.zarr" / "layer_1" / "zarr.json"
        meta = json.loads(p.read_text())
        fn(meta)
        p.write_text(json.dumps(meta, indent=2))
        rehash(ds)

    def symlink(ds, rel, target):
        p = ds / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        p.symlink_to(target)

    def special(ds, rel, kind):
        p = ds / rel
        p.unlink()
        if kind == "fifo":
            os.mkfifo(p)
        else:
            os.mknod(p, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero

    def remote_code(ds):
        tok = ds / "tokenizer"
        (tok / "evil_tokenizer.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
        cfg["tokenizer_class"] = "EvilTokenizer"
        (tok / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        rehash(ds)

    def shard_field(key, value):
        def fn(m):
            m["shards"][0][key] = value
        return fn

    def arrow(fn):
        def craft(ds):
            rewrite_arrow(ds / "shards" / f"{first}.arrow", fn)
            rehash(ds)
        return craft

    def codec(meta):
        meta["codecs"][0]["configuration"]["codecs"][1] = {"name": "numcodecs.pickle", "configuration": {}}

    crafts = [
        ("manifest shard name '../escape'", lambda ds: edit_manifest(ds, shard_field("name", "../../outside/escape"))),
        ("manifest shard name absolute", lambda ds: edit_manifest(ds, shard_field("name", str(outside / "escape")))),
        ("manifest shard name 'x/../00000'", lambda ds: edit_manifest(ds, shard_field("name", f"x/../{first}"))),
        ("manifest tokenizer path '../outside/copy/tokenizer'",
         lambda ds: edit_manifest(ds, lambda m: m["tokenizer"].__setitem__("path", "../outside/copy/tokenizer"))),
        ("symlink: shards/00000.arrow -> outside copy",
         lambda ds: symlink(ds, f"shards/{first}.arrow", outside / "copy" / "shards" / f"{first}.arrow")),
        ("symlink: shards/00000.zarr -> outside copy",
         lambda ds: symlink(ds, f"shards/{first}.zarr", outside / "copy" / "shards" / f"{first}.zarr")),
        ("symlink: a Zarr chunk -> outside copy",
         lambda ds: symlink(ds, f"shards/{first}.zarr/layer_1/c/0/0", outside / "copy" / "shards" / f"{first}.zarr/layer_1/c/0/0")),
        ("symlink: shards/ -> outside copy", lambda ds: symlink(ds, "shards", outside / "copy" / "shards")),
        ("symlink: tokenizer/tokenizer.json -> outside copy",
         lambda ds: symlink(ds, "tokenizer/tokenizer.json", outside / "copy" / "tokenizer" / "tokenizer.json")),
        ("symlink: tokenizer/ -> outside copy", lambda ds: symlink(ds, "tokenizer", outside / "copy" / "tokenizer")),
        ("symlink: manifest.json -> outside copy", lambda ds: symlink(ds, "manifest.json", outside / "copy" / "manifest.json")),
        ("Zarr codec outside the allowlist (numcodecs.pickle)", lambda ds: zarr_edit(ds, codec)),
        ("Zarr data_type object", lambda ds: zarr_edit(ds, lambda m: m.__setitem__("data_type", "object"))),
        ("Zarr shape 10^12 rows", lambda ds: zarr_edit(ds, lambda m: m.__setitem__("shape", [10**12, m["shape"][1]]))),
        ("tokenizer asking for remote code (auto_map)", remote_code),
        ("absurd shard windows 10^12", lambda ds: edit_manifest(ds, shard_field("windows", 10**12))),
        ("negative shard windows", lambda ds: edit_manifest(ds, shard_field("windows", -8))),
        ("absurd totals.windows 10^15",
         lambda ds: edit_manifest(ds, lambda m: m["totals"].__setitem__("windows", 10**15))),
        ("absurd hidden width 10^9",
         lambda ds: edit_manifest(ds, lambda m: m["capture"]["hidden_layers"][0].__setitem__("width", 10**9))),
        ("absurd seq_len 10^9", lambda ds: edit_manifest(ds, lambda m: m["corpus"].__setitem__("seq_len", 10**9))),
        ("absurd top_k 10^9", lambda ds: edit_manifest(ds, lambda m: m["capture"].__setitem__("top_k", 10**9))),
        ("absurd shard file bytes 10^18",
         lambda ds: edit_manifest(ds, lambda m: m["shards"][0]["files"][f"{first}.arrow"].__setitem__("bytes", 10**18))),
        ("Arrow schema differs from the manifest (labels renamed)", arrow(arrow_rename)),
        ("Arrow list length differs (input_ids of 17)", arrow(arrow_longer_lists)),
        ("Arrow row count differs (7 rows, manifest 8)", arrow(arrow_drop_row)),
        ("a FIFO as a shard", lambda ds: special(ds, f"shards/{first}.arrow", "fifo")),
        ("a FIFO as a Zarr chunk", lambda ds: special(ds, f"shards/{first}.zarr/layer_1/c/0/0", "fifo")),
        ("a character device (/dev/zero) as a shard", lambda ds: special(ds, f"shards/{first}.arrow", "chr")),
    ]
    if quick:
        crafts = [c for c in crafts if c[0] in ("manifest shard name '../escape'", "a FIFO as a shard",
                                                "symlink: shards/00000.arrow -> outside copy")]
    crafts = [c for c in crafts if only.lower() in c[0].lower()]

    def one(i, name, craft):
        ds, out = w / f"ds-{i}", w / f"run-{i}"
        shutil.copytree(f.dataset, ds, symlinks=True)
        craft(ds)
        before = tree_digest(outside, f.root)
        v = run(distill("verify", ds, "--no-progress"), timeout=60)
        t = run(distill("train", *full_pass_args(f, out, ds)), timeout=120)
        after = tree_digest(outside, f.root)
        v_ok, v_detail = clean_refusal(v)
        t_ok, t_detail = clean_refusal(t)
        problems = []
        if not v_ok:
            problems.append(f"verify {v_detail}")
        if not t_ok:
            problems.append(f"train {t_detail}")
        if (out / "model").exists():
            problems.append("train wrote model/")
        if marker.exists():
            problems.append("the tokenizer's code ran")
        if before != after:
            problems.append(f"outside changed: {digest_diff(before, after)}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ds, ignore_errors=True)
        return name, not problems, "; ".join(problems) if problems else f"verify: {v.last_line[:90]} | train: {t.last_line[:90]}"

    run_cases(s, [lambda i=i, c=c: one(i, *c) for i, c in enumerate(crafts)], jobs)
    return s


# --- report ------------------------------------------------------------------------------------------------------------


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(sections: list[Section], args, seconds: float) -> str:
    lines = ["# Reliability (R1-R5)", "",
             (f"`python scripts/bench_reliability.py{' --quick' if args.quick else ''} --seed {args.seed}"
              f"{' --only ' + args.only if getattr(args, 'only', 'R1,R2,R3,R4,R5') != 'R1,R2,R3,R4,R5' else ''}"
              f"{' --case ' + repr(args.case) if getattr(args, 'case', '') else ''}`, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.1f} min, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; {args.code}."), "",
             "| | what | passed |", "| --- | --- | --- |"]
    for s in sections:
        lines.append(f"| {s.key} | {s.title} | {s.passed}/{len(s.cases)} |")
    for s in sections:
        lines += ["", f"## {s.key}: {s.title} ({s.passed}/{len(s.cases)})", ""]
        lines += [f"- {n}" for n in s.notes]
        if s.notes:
            lines.append("")
        lines += ["| case | result | detail |", "| --- | --- | --- |"]
        for name, ok, detail in s.cases:
            lines.append(f"| {md_escape(name)} | {'pass' if ok else '**FAIL**'} | {md_escape(detail)} |")
    return "\n".join(lines) + "\n"


def snapshot_source(work: Path) -> str:
    """Copy pipeline/ and trainer/ as they are now, so a run measures one version of the code even while the working
    tree is being edited; returns the version's description (commit, and whether files differed from it)."""
    global SRC
    SRC = work / "src"
    for pkg in ("pipeline", "trainer"):
        shutil.copytree(REPO / pkg, SRC / pkg, ignore=shutil.ignore_patterns("__pycache__"))

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False, timeout=60).stdout.strip()

    dirty = git("status", "--porcelain", "--", "pipeline", "trainer")
    return f"commit {git('rev-parse', '--short', 'HEAD')}" + (" + uncommitted changes in pipeline/, trainer/" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few cases per section (~1.5 min)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points and flipped bytes")
    p.add_argument("--only", default="R1,R2,R3,R4,R5", help="comma-separated sections to run")
    p.add_argument("--case", default="", help="R3-R5: run only the cases (R3: file kinds) whose name holds this text")
    p.add_argument("--jobs", type=int, default=3, help="R3-R5: cases run at once (each is a few subprocesses)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed at the end)")
    p.add_argument("--out", default=str(REPO / ".cache" / "bench" / "reliability.md"), help="markdown report")
    args = p.parse_args(argv)
    only = {x.strip().upper() for x in args.only.split(",")}
    rng = random.Random(args.seed)
    start = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        args.code = snapshot_source(work)
        print(f"code: {args.code}; fixtures in {work} ...", flush=True)
        f = build_fixtures(work / "fx", windows=48 if args.quick else 96)
        sections = []
        if "R1" in only:
            sections.append(r1(f, work, 2 if args.quick else 20, 64 if args.quick else 192, rng))
        if "R2" in only:
            sections.append(r2(f, work, 1 if args.quick else 10, rng))
        if "R3" in only:
            sections.append(r3(f, work, 1 if args.quick else 6, rng, args.case, args.jobs))
        if "R4" in only:
            sections.append(r4(f, work, args.quick, args.case, args.jobs))
        if "R5" in only:
            sections.append(r5(f, work, args.quick, args.case, args.jobs))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = report(sections, args, time.time() - start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
