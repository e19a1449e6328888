"""Datasets in object storage: URLs (s3://, gs://, az://, hf://, any fsspec URL) as `--out` of precompute and `--data`.

Who calls it: `pipeline.precompute` (a URL `--out` is captured through `RemoteOutput`), the CLIs (`refuse_url` for the
outputs that must be local, `parse_storage_options`, `redact_command`), and the reader (`open_fs`). Imports no torch.

How a capture reaches a bucket. Each rank works in a local staging folder of its own (no shared disk is assumed) as if
it were the output folder, and the bucket holds the shared state, in the same layout a local capture has:
- `pull` brings the bucket's state into the staging folder before the capture looks at it: its manifest (done), its
  `_progress/settings.json` (compared with this run's settings as a local resume does) and its shard markers (those
  shards are skipped). A local marker the bucket does not have (killed before its upload) is dropped: recomputed.
- `push_shard` (from the writer thread, after each shard) uploads the shard's files, then its marker, then deletes the
  local copies: staging holds about one shard at a time. An object store never shows a half-uploaded object, and the
  marker goes last, so a marker always means the shard's files are complete.
- `exchange` (a rank at its end) uploads its session record and downloads every other rank's markers; the rank that
  sees all of them writes the manifest, and `push_manifest` uploads the tokenizer, then `manifest.json`, then removes
  `_progress/`. A reader trusts only the manifest, so a half-written remote dataset is never read as complete.

Credentials and endpoints come from where each filesystem looks for them (for s3: the AWS_* environment variables,
~/.aws/config and credentials, AWS_ENDPOINT_URL); `--storage-options JSON` passes anything else. Neither is ever
written into a manifest, a run folder or a message: `redact_command` removes the JSON from recorded command lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import fsspec

from ..common.errors import UserError
from .schema import MANIFEST, PROGRESS_DIR, SHARDS_DIR

SECRET_FLAGS = ("--storage-options",)
_USERINFO = re.compile(r"(://)[^/@]*@")


def is_url(path) -> bool:
    """True for a URL of a filesystem other than the local one (`file://` and plain paths are local)."""
    protocol, _ = fsspec.core.split_protocol(str(path))
    return protocol is not None and protocol not in ("file", "local")


def redact(text: str) -> str:
    """A URL or message without a `user:password@` part (some filesystems take credentials in the URL)."""
    return _USERINFO.sub(r"\1***@", str(text))


def looks_like_url(path) -> bool:
    """Any URL, file:// included, or a `scheme:` prefix that a plain path would turn into a folder named `s3:`."""
    text = str(path)
    return is_url(text) or "://" in text or "::" in text or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text) is not None


def local_path(path) -> str:
    """A plain path for `file://PATH` (precompute writes there); other paths unchanged."""
    protocol, rest = fsspec.core.split_protocol(str(path))
    return rest if protocol in ("file", "local") else str(path)


def refuse_url(path, flag: str, command: str) -> None:
    """For outputs that must be a local folder: a URL would otherwise become a local folder named `s3:`."""
    if path is not None and looks_like_url(path):
        raise UserError(f"{flag} {redact(path)} is a URL, but `distill {command}` writes only to a local folder; pass a "
                        f"local folder path (and copy it to the bucket afterwards with your storage's own tool)")


def parse_storage_options(text) -> dict:
    """`--storage-options` JSON (an object of fsspec filesystem arguments) as a dict. The text is never echoed: it may
    hold a secret."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"--storage-options is not valid JSON (at character {getattr(e, 'pos', '?')}); pass a JSON "
                        "object, e.g. '{\"anon\": true}'")
    if not isinstance(value, dict):
        raise UserError(f"--storage-options is a JSON {type(value).__name__}, expected an object of filesystem "
                        "arguments, e.g. '{\"anon\": true}'")
    return value


def redact_command(argv: list[str]) -> list[str]:
    """A command line to record (manifest, run folder), without the value of a flag that may hold credentials."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide = True
        elif arg.startswith(tuple(f"{f}=" for f in SECRET_FLAGS)):
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(redact(arg))
    return out


def open_fs(url: str, storage_options: dict | None = None):
    """(filesystem, root path) of a URL; a missing filesystem package becomes one line naming the install."""
    try:
        fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except ImportError as e:
        protocol = fsspec.core.split_protocol(str(url))[0]
        extra = " (pip install 'offline-distill[s3]')" if protocol in ("s3", "s3a") else ""
        raise UserError(f"{redact(url)}: the filesystem for {protocol}:// is not installed ({' '.join(str(e).split())[:160]})"
                        f"; install it{extra}")
    except (TypeError, ValueError) as e:
        raise UserError(f"{redact(url)}: the filesystem refused its options ({type(e).__name__}); check --storage-options")
    return fs, root.rstrip("/")


def cache_home() -> Path:
    """distill's local cache folder: $XDG_CACHE_HOME/distill (default ~/.cache/distill)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill"


class RemoteOutput:
    """The bucket side of a capture whose `--out` is a URL; `stage` is this rank's local staging folder."""

    def __init__(self, url: str, storage_options: dict | None, stage_dir: str | None, rank: int, world_size: int):
        self.url = str(url).rstrip("/")
        self.fs, self.root = open_fs(self.url, storage_options)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        base = Path(stage_dir) if stage_dir else cache_home() / "stage"
        self.stage = base / key / f"rank-{rank:05d}-of-{world_size:05d}"

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _names(self, rel: str) -> set[str]:
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._remote(rel), detail=False)}
        except FileNotFoundError:
            return set()

    def _get(self, rel: str, local: Path) -> None:
        tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}")
        self.fs.get_file(self._remote(rel), str(tmp))
        os.replace(tmp, local)

    def pull(self, stage: Path) -> None:
        """Before the capture looks at its output folder: make the staging folder show the bucket's state."""
        self.fs.invalidate_cache()
        if self.fs.isfile(self.root):
            raise UserError(f"--out {redact(self.url)} is an object (a file), expected a prefix to write a dataset under; "
                            "choose another --out")
        progress = stage / PROGRESS_DIR
        if self.fs.exists(self._remote(MANIFEST)):
            self._get(MANIFEST, stage / MANIFEST)  # complete: the capture compares settings and returns it
            return
        (stage / MANIFEST).unlink(missing_ok=True)
        remote = self._names(PROGRESS_DIR)
        if "settings.json" not in remote:
            present = [p for p in self.fs.find(self.root, maxdepth=None)][:1] if self.fs.exists(self.root) else []
            if present:
                raise UserError(f"--out {redact(self.url)} is not empty and holds no distill dataset (found "
                                f"{present[0].rsplit('/', 1)[-1]!r}); choose an empty or new prefix")
            shutil.rmtree(progress, ignore_errors=True)  # a fresh capture: what staging holds belongs to no capture here
            return
        local_settings = progress / "settings.json"
        old = local_settings.read_bytes() if local_settings.exists() else None
        with self.fs.open(self._remote(f"{PROGRESS_DIR}/settings.json"), "rb") as f:
            settings = f.read()
        if old is not None and json.loads(old) != json.loads(settings):
            shutil.rmtree(progress, ignore_errors=True)  # staging of an older capture to this URL: its tokens differ too
        progress.mkdir(parents=True, exist_ok=True)
        (progress / "settings.json").write_bytes(settings)
        for p in progress.glob("shard-*.json"):
            if p.name not in remote:  # killed before its upload: the shard is computed again
                p.unlink()
        for name in sorted(remote):
            if name.startswith(("shard-", "rank-")) and name.endswith(".json") and not (progress / name).exists():
                self._get(f"{PROGRESS_DIR}/{name}", progress / name)

    def _push_settings(self, stage: Path) -> None:
        rel = f"{PROGRESS_DIR}/settings.json"
        if (stage / rel).exists() and not self.fs.exists(self._remote(rel)):
            self.fs.put_file(str(stage / rel), self._remote(rel))

    def push_shard(self, stage: Path, marker: Path, files) -> None:
        """Upload one finished shard (`files`: paths relative to shards/), then its marker; free the local copies."""
        self._push_settings(stage)  # before any shard object: a prefix with objects but no settings is not ours
        for rel in sorted(files):
            self.fs.put_file(str(stage / SHARDS_DIR / rel), self._remote(f"{SHARDS_DIR}/{rel}"))
        self.fs.put_file(str(marker), self._remote(f"{PROGRESS_DIR}/{marker.name}"))
        for top in sorted({rel.split("/", 1)[0] for rel in files}):
            path = stage / SHARDS_DIR / top
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def exchange(self, progress: Path) -> None:
        """At a rank's end: upload its session record, download every rank's markers and records.

        When another rank has finished the dataset meanwhile (its manifest is there, `_progress/` gone or going), the
        manifest is brought into staging and FileNotFoundError raised: precompute then returns that manifest, as it
        does when a rank sharing a local folder finishes at the same moment."""
        self.fs.invalidate_cache()
        try:
            if self.fs.exists(self._remote(MANIFEST)):
                raise FileNotFoundError(self._remote(f"{PROGRESS_DIR}"))
            self._push_settings(progress.parent)
            remote = self._names(PROGRESS_DIR)
            for p in sorted(progress.glob("rank-*.json")):
                if p.name not in remote:
                    self.fs.put_file(str(p), self._remote(f"{PROGRESS_DIR}/{p.name}"))
            for name in sorted(remote):
                if name.startswith(("shard-", "rank-")) and name.endswith(".json") and not (progress / name).exists():
                    self._get(f"{PROGRESS_DIR}/{name}", progress / name)
        except FileNotFoundError:
            self.fs.invalidate_cache()
            if self.fs.exists(self._remote(MANIFEST)):
                self._get(MANIFEST, progress.parent / MANIFEST)
            raise

    def push_manifest(self, stage: Path) -> None:
        """Upload the tokenizer and the dataset card, then the manifest (last: it makes the dataset exist), then drop `_progress/`."""
        folder = stage / "tokenizer"
        for p in sorted(q for q in folder.rglob("*") if q.is_file()):
            self.fs.put_file(str(p), self._remote(f"tokenizer/{p.relative_to(folder).as_posix()}"))
        if (stage / "README.md").is_file():  # the dataset card, written just before the manifest
            self.fs.put_file(str(stage / "README.md"), self._remote("README.md"))
        self.fs.put_file(str(stage / MANIFEST), self._remote(MANIFEST))
        try:
            self.fs.rm(self._remote(PROGRESS_DIR), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def close(self) -> None:
        """After the run: the staging folder goes once the bucket holds the finished dataset (tokens and all)."""
        try:
            done = self.fs.exists(self._remote(MANIFEST))
        except Exception:  # noqa: BLE001 (unreachable storage now: keep staging for the rerun)
            done = False
        if done:
            shutil.rmtree(self.stage, ignore_errors=True)
