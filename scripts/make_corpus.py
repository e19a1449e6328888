"""Build the project's real corpus: the CPython standard library source of the running interpreter.

Every machine with Python has it, so the teacher, the capture and the benchmarks can run on real code text without a
download. `build_corpus(out_dir)` writes

    out_dir/train.jsonl     {"text": ..., "path": relpath} per file, sorted by relpath
    out_dir/heldout.jsonl   the same for the held-out files (~5%, chosen by a hash of the relpath)
    out_dir/corpus.json     recipe, counts and content hashes; written last, so its presence means the rest is complete

and, for captures that take only a prefix of a split (`--max-tokens`), `mixed_split(out_dir, split)` writes
`{split}-mixed.jsonl`: the same documents ordered by sha256 of their path, so any prefix is a fair sample of the whole
standard library instead of its alphabetically first packages (asyncio, collections, ...).

and reuses existing output when the recipe (stdlib path, python version, split rule) is unchanged.
Called by `scripts/make_teacher.py` (imported by path) and from the command line:

    python scripts/make_corpus.py --out .cache/corpus
    python scripts/make_corpus.py --out .cache/corpus --chat     # also the conversational corpus below

`build_chat_corpus(out_dir)` writes a real conversational corpus from the same files, split by the same rule:

    out_dir/chat-train.jsonl     {"messages": [user, assistant], "path": relpath, "name": qualified name} per definition
    out_dir/chat-heldout.jsonl   the same for the held-out files
    out_dir/chat.json            recipe and counts, written last

For every public function, class and method with a docstring, the user asks what it does, showing its module, its
signature and its body (docstring removed, at most CHAT_BODY_LINES lines); the assistant answers with the docstring.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / ".cache" / "corpus"

# Folders skipped at any depth: test suites are huge, repetitive and full of deliberately odd files (bad encodings,
# syntax errors), and site-packages is whatever happens to be installed, which would make the corpus machine-dependent.
EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
HELDOUT_PERCENT = 5
# Bump when the output layout or the selection logic changes, so old caches are rebuilt instead of trusted.
FORMAT_VERSION = 1


def is_heldout(relpath: str, heldout_percent: int = HELDOUT_PERCENT) -> bool:
    """Deterministic split by file: the same relpath lands in the same split on every machine and every run.

    Hashing the path (not the content) keeps a file in its split across Python patch releases that edit it.
    """
    return int(hashlib.sha256(relpath.encode("utf-8")).hexdigest(), 16) % 100 < heldout_percent


def corpus_recipe(stdlib: Path, heldout_percent: int = HELDOUT_PERCENT) -> dict:
    """Everything that decides the corpus content; equal recipes mean the existing output can be reused."""
    return {
        "format_version": FORMAT_VERSION,
        "stdlib": str(stdlib),
        "python_version": platform.python_version(),
        "excluded_dirs": list(EXCLUDED_DIRS),
        "split_rule": f"int(sha256(relpath), 16) % 100 < {heldout_percent} -> heldout",
    }


def list_source_files(stdlib: Path) -> list[str]:
    """Relative posix paths of the `*.py` files under `stdlib`, minus excluded folders, sorted."""
    relpaths = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        relpaths.append(rel.as_posix())  # posix separators: the split hash must not depend on the OS
    return sorted(relpaths)


def build_corpus(out_dir: str | os.PathLike = DEFAULT_OUT, stdlib: str | os.PathLike | None = None,
                 heldout_percent: int = HELDOUT_PERCENT) -> dict:
    """Write train/heldout JSONL for `stdlib` (default: this interpreter's) into `out_dir`; return corpus.json's content.

    Reuses the existing output when its recipe matches. Files that are not valid UTF-8 are skipped and counted.
    """
    # --- setup: reuse when the recipe is unchanged
    out_dir = Path(out_dir)
    stdlib = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"]).resolve()
    if not stdlib.is_dir():
        raise FileNotFoundError(f"stdlib folder {stdlib} does not exist; pass an existing folder as stdlib")
    recipe = corpus_recipe(stdlib, heldout_percent)
    manifest_path = out_dir / "corpus.json"
    if manifest_path.exists():
        info = json.loads(manifest_path.read_text())
        if info.get("recipe") == recipe and all((out_dir / f).exists() for f in ("train.jsonl", "heldout.jsonl")):
            info["reused"] = True
            return info

    # --- read and split, in relpath order so the files are byte-identical between runs
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "heldout": []}
    skipped = []
    for relpath in list_source_files(stdlib):
        try:
            text = (stdlib / relpath).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(relpath)
            continue
        splits["heldout" if is_heldout(relpath, heldout_percent) else "train"].append((relpath, text))

    # --- write each split atomically (temp name, then os.replace), the manifest last
    counts = {}
    for split, docs in splits.items():
        final = out_dir / f"{split}.jsonl"
        tmp = out_dir / f".{split}.jsonl.tmp-{os.getpid()}"
        digest = hashlib.sha256()
        with open(tmp, "wb") as f:
            for relpath, text in docs:
                line = (json.dumps({"text": text, "path": relpath}, ensure_ascii=False) + "\n").encode("utf-8")
                f.write(line)
                digest.update(line)
        os.replace(tmp, final)
        counts[split] = {"files": len(docs), "bytes": sum(len(t.encode("utf-8")) for _, t in docs),
                         "sha256": digest.hexdigest()}
    info = {
        "recipe": recipe,
        "stdlib": str(stdlib),
        "python_version": platform.python_version(),
        "files": sum(c["files"] for c in counts.values()),
        "bytes": sum(c["bytes"] for c in counts.values()),
        "skipped": len(skipped),
        "skipped_paths": skipped,
        "splits": counts,
    }
    tmp = out_dir / f".corpus.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    info["reused"] = False
    return info


def read_split(corpus_dir: str | os.PathLike, split: str) -> list[str]:
    """The texts of one split ("train" or "heldout"), in file order."""
    with open(Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def mixed_split(corpus_dir: str | os.PathLike, split: str) -> Path:
    """Write (once, atomically) `{split}-mixed.jsonl`: the split's documents ordered by sha256 of their path."""
    corpus_dir = Path(corpus_dir)
    out = corpus_dir / f"{split}-mixed.jsonl"
    source = corpus_dir / f"{split}.jsonl"
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    with open(source, encoding="utf-8") as f:
        lines = f.readlines()
    lines.sort(key=lambda line: hashlib.sha256(json.loads(line)["path"].encode()).hexdigest())
    tmp = corpus_dir / f".{out.name}.tmp-{os.getpid()}"
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


CHAT_BODY_LINES = 40
CHAT_MIN_DOC_CHARS = 20  # one-word docstrings ("Close.") teach nothing about the code
CHAT_FORMAT_VERSION = 1


def chat_examples(relpath: str, source: str) -> list[dict]:
    """The conversations of one source file, in source order (module, then each class's methods after the class)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    module = relpath[:-3].replace("/", ".")
    module = module[: -len(".__init__")] if module.endswith(".__init__") else module
    examples = []

    def visit(body, prefix: str) -> None:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= CHAT_MIN_DOC_CHARS:
                examples.append(_conversation(module, prefix + node.name, node, inspect.cleandoc(doc), relpath))
            if isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return examples


def _conversation(module: str, qualname: str, node, doc: str, relpath: str) -> dict:
    stripped = ast.parse(ast.unparse(node)).body[0]  # a copy; the docstring goes, the code stays
    stripped.body = stripped.body[1:] or [ast.Expr(ast.Constant(...))]
    lines = ast.unparse(stripped).splitlines()
    if len(lines) > CHAT_BODY_LINES:
        lines = lines[:CHAT_BODY_LINES] + ["    ..."]
    kind = "class" if isinstance(node, ast.ClassDef) else "function"
    code = "\n".join(lines)
    question = f"What does the {kind} `{qualname}` of the module `{module}` do?\n\n```python\n{code}\n```"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": doc}],
            "path": relpath, "name": f"{module}.{qualname}"}


def build_chat_corpus(out_dir: str | os.PathLike = DEFAULT_OUT, stdlib: str | os.PathLike | None = None,
                      heldout_percent: int = HELDOUT_PERCENT) -> dict:
    """Write chat-train/chat-heldout JSONL for `stdlib` into `out_dir`; return chat.json's content (reused when the
    recipe matches)."""
    out_dir = Path(out_dir)
    stdlib = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"]).resolve()
    if not stdlib.is_dir():
        raise FileNotFoundError(f"stdlib folder {stdlib} does not exist; pass an existing folder as stdlib")
    recipe = corpus_recipe(stdlib, heldout_percent) | {"chat_format_version": CHAT_FORMAT_VERSION,
                                                        "body_lines": CHAT_BODY_LINES, "min_doc_chars": CHAT_MIN_DOC_CHARS}
    manifest_path = out_dir / "chat.json"
    if manifest_path.exists():
        info = json.loads(manifest_path.read_text())
        if info.get("recipe") == recipe and all((out_dir / f"chat-{s}.jsonl").exists() for s in ("train", "heldout")):
            info["reused"] = True
            return info
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "heldout": []}
    for relpath in list_source_files(stdlib):
        try:
            text = (stdlib / relpath).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        splits["heldout" if is_heldout(relpath, heldout_percent) else "train"] += chat_examples(relpath, text)
    counts = {}
    for split, rows in splits.items():
        tmp = out_dir / f".chat-{split}.jsonl.tmp-{os.getpid()}"
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        tmp.write_bytes(data)
        os.replace(tmp, out_dir / f"chat-{split}.jsonl")
        counts[split] = {"conversations": len(rows), "files": len({r["path"] for r in rows}),
                         "sha256": hashlib.sha256(data).hexdigest()}
    info = {"recipe": recipe, "stdlib": str(stdlib), "python_version": platform.python_version(), "splits": counts}
    tmp = out_dir / f".chat.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    info["reused"] = False
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--stdlib", default=None, help="source folder (default: this interpreter's stdlib)")
    parser.add_argument("--mixed", action="store_true", help="also write train-mixed.jsonl and heldout-mixed.jsonl")
    parser.add_argument("--chat", action="store_true",
                        help="also write the conversational corpus: chat-train.jsonl and chat-heldout.jsonl")
    args = parser.parse_args(argv)
    if args.chat:
        chat = build_chat_corpus(args.out, stdlib=args.stdlib)
        c = chat["splits"]
        print(f"{'reused' if chat['reused'] else 'wrote'} chat corpus: train {c['train']['conversations']} conversations "
              f"from {c['train']['files']} files, heldout {c['heldout']['conversations']} from {c['heldout']['files']}",
              file=sys.stderr)
    info = build_corpus(args.out, stdlib=args.stdlib)
    if args.mixed:
        for split in ("train", "heldout"):
            mixed_split(args.out, split)
    verb = "reused" if info["reused"] else "wrote"
    splits = info["splits"]
    print(f"{verb} corpus at {Path(args.out).resolve()}: {info['files']} files, {info['bytes'] / 1e6:.1f} MB "
          f"(train {splits['train']['files']}, heldout {splits['heldout']['files']}), skipped {info['skipped']} "
          f"undecodable; python {info['python_version']} from {info['stdlib']}", file=sys.stderr)
    print(Path(args.out).resolve())


if __name__ == "__main__":
    main()
