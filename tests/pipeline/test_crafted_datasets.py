"""Crafted and damaged datasets: a real dataset written by `distill precompute`, then changed on disk. `verify` and
`inspect` must each refuse it with one line that names the file and the problem (exit 2, no traceback), before
reading anything outside the folder or hanging on a special file.

Most cases re-sign the manifest (`resign`): the checksums then match, as in a dataset crafted on purpose, so what is
tested is the check of the value itself, not the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline.common.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    """Top-4 and sampled targets (exact encoding), hidden states of the last layer, 3 shards of 8 windows of 16."""
    out = tmp_path_factory.mktemp("crafted") / "ds"
    r = CliRunner().invoke(main, [str(a) for a in [
        "precompute", "--teacher", teacher_dir, "--data", corpus_dir, "--out", out, "--seq-len", 16, "--top-k", 4,
        "--targets", "both", "--samples", 8, "--hidden-layers", "-1", "--shard-size", 8, "--batch-size", 8,
        "--max-tokens", 300, "--no-progress"]])
    assert r.exit_code == 0, r.output
    return out


# --- helpers that change a dataset on disk --------------------------------------------------------------------------


def sha(path: Path) -> dict:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


def manifest(ds: Path) -> dict:
    return json.loads((ds / "manifest.json").read_text())


def write_manifest(ds: Path, m) -> None:
    (ds / "manifest.json").write_text(json.dumps(m))


def resign(ds: Path) -> None:
    """Recompute every checksum and size the manifest records, as someone crafting a dataset would."""
    m = manifest(ds)
    for r in m["shards"]:
        r["files"] = {rel: sha(ds / "shards" / rel) for rel in r["files"] if (ds / "shards" / rel).is_file()}
        r["bytes"] = sum(f["bytes"] for f in r["files"].values())
    m["tokenizer"]["files"] = {rel: sha(ds / "tokenizer" / rel) for rel in m["tokenizer"]["files"]}
    m["totals"]["bytes"] = sum(r["bytes"] for r in m["shards"])
    m["totals"]["bytes_per_token"] = m["totals"]["bytes"] / m["totals"]["valid_tokens"]
    write_manifest(ds, m)


def edit_manifest(fn):
    def apply(ds: Path):
        m = manifest(ds)
        write_manifest(ds, fn(m) or m)
    return apply


def edit_json(rel: str, fn):
    def apply(ds: Path):
        path = ds / rel
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(fn(meta) or meta))
        resign(ds)
    return apply


def layer_json(ds: Path) -> str:
    layer = manifest(ds)["capture"]["hidden_layers"][0]["index"]
    return f"shards/00000.zarr/layer_{layer}/zarr.json"


def edit_layer(fn):
    def apply(ds: Path):
        edit_json(layer_json(ds), fn)(ds)
    return apply


def rewrite_shard(fn, shard: str = "00000"):
    """Read shard 0's table, let `fn` return a new one (any schema), write it back as an Arrow stream, re-sign."""
    def apply(ds: Path):
        path = ds / "shards" / f"{shard}.arrow"
        table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()  # not mapped: it is overwritten
        table = fn(table)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        resign(ds)
    return apply


def replace_column(name: str, fn):
    """Change the values of a fixed-size-list column (numpy in, numpy out, same shape and dtype). A target column stored
    only at trained positions (format 2: a list of one entry per loss_mask 1) is handed to `fn` at its positions,
    (windows, T[, K]), and only its trained positions are written back."""
    def change(table: pa.Table) -> pa.Table:
        arr = table.column(name).combine_chunks()
        t, shape = arr.type, [len(arr)]
        stored = offsets = None
        if pa.types.is_list(arr.type):
            stored = np.stack(table.column("loss_mask").to_numpy(zero_copy_only=False)).astype(bool)  # (W, T)
            offsets, arr, shape = arr.offsets, arr.flatten(), [len(arr.flatten())]
        types = []
        while pa.types.is_fixed_size_list(arr.type):
            shape.append(arr.type.list_size)
            types.append(arr.type)
            arr = arr.flatten()
        values = arr.to_numpy(zero_copy_only=False).reshape(shape).copy()
        if stored is None:
            values = fn(values)
        else:
            dense = np.zeros(stored.shape + values.shape[1:], values.dtype)
            dense[stored] = values
            values = fn(dense)[stored]
        out = pa.array(values.reshape(-1), type=arr.type)
        for typ in reversed(types):
            out = pa.FixedSizeListArray.from_arrays(out, typ.list_size)
        if offsets is not None:
            out = pa.ListArray.from_arrays(offsets, out)
        return table.set_column(table.schema.get_field_index(name), pa.field(name, t), out)
    return change


def set_at(index, value):
    def fn(a):
        a[index] = value
        return a
    return fn


def drop_target(name: str, window: int):
    """Format 2 stores one target entry per trained position: remove the last one of `window` from column `name`."""
    def change(table: pa.Table) -> pa.Table:
        arr = table.column(name).combine_chunks()
        rows = arr.to_pylist()
        rows[window] = rows[window][:-1]
        return table.set_column(table.schema.get_field_index(name), pa.field(name, arr.type), pa.array(rows, arr.type))
    return change


def move_trained_position(table: pa.Table) -> pa.Table:
    """A loss_mask 1 moved to another window (the total, and so the manifest's count, unchanged): the targets stored
    for both windows no longer match their loss_mask counts."""
    arr = table.column("loss_mask").combine_chunks()
    mask = arr.flatten().to_numpy().reshape(len(arr), -1).copy()  # (W, T)
    w, t = np.argwhere(mask == 0)[0]  # the first untrained position
    other = 0 if w != 0 else 1
    assert mask[other, 0] == 1
    mask[w, t], mask[other, 0] = 1, 0
    new = pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), mask.shape[1])
    return table.set_column(table.schema.get_field_index("loss_mask"), pa.field("loss_mask", arr.type), new)


def shorter_lists(table: pa.Table) -> pa.Table:
    """input_ids as lists of 15 where the manifest says 16."""
    arr = table.column("input_ids").combine_chunks()
    flat = arr.flatten().to_numpy().reshape(len(arr), -1)[:, :15]
    new = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 15)
    return table.set_column(1, "input_ids", new)


def extra_sample(table: pa.Table) -> pa.Table:
    """One more id in window 0's sample_ids list than its sample_n adds up to."""
    rows = table.column("sample_ids").to_pylist()
    rows[0] = rows[0] + [1]
    i = table.schema.get_field_index("sample_ids")
    return table.set_column(i, table.schema.field(i), pa.array(rows, type=table.schema.field(i).type))


def to_zarr_v2(ds: Path) -> None:
    rel = layer_json(ds)
    meta = json.loads((ds / rel).read_text())
    (ds / rel).unlink()
    v2 = {"zarr_format": 2, "shape": meta["shape"], "chunks": [16, meta["shape"][1]], "dtype": "|O",
          "compressor": None, "fill_value": 0, "filters": [{"id": "pickle"}], "order": "C"}
    (ds / rel).with_name(".zarray").write_text(json.dumps(v2))
    m = manifest(ds)
    files = m["shards"][0]["files"]
    del files[rel.removeprefix("shards/")]
    files[rel.removeprefix("shards/").replace("zarr.json", ".zarray")] = {}
    write_manifest(ds, m)
    resign(ds)


def symlink(rel: str, target=None):
    """Replace a file or folder of the dataset by a symlink to a copy outside it (same bytes: checksums match)."""
    def apply(ds: Path):
        path = ds / rel
        outside = Path(target) if target else ds.parent / f"outside-{path.name}"
        if not target:
            (shutil.copytree if path.is_dir() else shutil.copy)(path, outside)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.symlink(outside, path)
    return apply


def fifo(ds: Path) -> None:
    path = ds / "shards" / "00001.arrow"
    path.unlink()
    os.mkfifo(path)


def flip_byte(rel: str):
    def apply(ds: Path):
        data = bytearray((ds / rel).read_bytes())
        data[len(data) // 3] ^= 0x01
        (ds / rel).write_bytes(bytes(data))
    return apply


def add_tokenizer_file(ds: Path) -> None:
    (ds / "tokenizer" / "added_tokens.json").write_text(json.dumps({"<evil>": 5}))


def totals(key, value):
    return edit_manifest(lambda m: m["totals"].__setitem__(key, value))


def shard0(key, value):
    return edit_manifest(lambda m: m["shards"][0].__setitem__(key, value))


def cap(key, value):
    return edit_manifest(lambda m: m["capture"].__setitem__(key, value))


# case: (change, file named in the message, pattern of the problem, does inspect catch it too?)
CASES = {
    # manifest values
    "encoding value": (cap("encoding", "fancy"), "manifest.json", r"capture.encoding.*'fancy'", True),
    "targets value": (cap("targets", ["logits"]), "manifest.json", r"capture.targets.*'logits'", True),
    "shards is a string": (edit_manifest(lambda m: m.__setitem__("shards", "00000")), "manifest.json", r"`shards` is '00000'", True),
    "numeric shard name": (edit_manifest(lambda m: m["shards"][0].__setitem__("name", 0)), "manifest.json",
                           r"shards\[0\].name` is 0 \(a int\), expected the string '00000'", True),
    "manifest is a list": (edit_manifest(lambda m: [m]), "manifest.json", r"a JSON list, expected an object", True),
    "invalid JSON": (lambda ds: (ds / "manifest.json").write_text('{"format": "distill-logits", '), "manifest.json",
                     r"not valid JSON", True),
    "format name": (edit_manifest(lambda m: m.__setitem__("format", "other")), "manifest.json", r"`format` is 'other'", True),
    "teacher.vocab_size below the tokenizer": (edit_manifest(lambda m: m["teacher"].__setitem__("vocab_size", 300)),
                                               "manifest.json", r"tokenizer.vocab_size` 320 is larger than `teacher.vocab_size` 300", True),
    "teacher.vocab_size vs token dtype": (edit_manifest(lambda m: m["teacher"].__setitem__("vocab_size", 70000)),
                                          "manifest.json", r"capture.token_dtype` is 'uint16' but `teacher.vocab_size` gives 'uint32'", True),
    "tokenizer.sha256": (edit_manifest(lambda m: m["tokenizer"].__setitem__("sha256", "ab" * 32)), "manifest.json",
                         r"tokenizer.tokenizer_sha256|tokenizer.sha256", True),
    "capture.temperature": (cap("temperature", 2.0), "manifest.json", r"capture.temperature` is 2.0", True),
    "capture.top_k": (cap("top_k", 5), "manifest.json", r"schema` does not match|capture.top_k", True),
    "capture.samples": (cap("samples", 9), "manifest.json", r"capture.samples", True),
    "capture.sample_temperature": (cap("sample_temperature", -1.0), "manifest.json", r"capture.sample_temperature` is -1.0", True),
    "hidden layer width": (edit_manifest(lambda m: m["capture"]["hidden_layers"][0].__setitem__("width", 7)), "manifest.json",
                           r"hidden_layers\[0\].width` is 7 but `teacher.hidden_size` gives 48", True),
    "seq_len": (edit_manifest(lambda m: m["corpus"].__setitem__("seq_len", 8)), "manifest.json", r"settings.seq_len|schema", True),
    "totals.windows": (totals("windows", 99), "manifest.json", r"totals.windows` is 99", True),
    "totals.valid_tokens": (totals("valid_tokens", 5), "manifest.json", r"totals.valid_tokens` is 5", True),
    "totals.topk_mass_mean": (totals("topk_mass_mean", 0.5), "manifest.json", r"totals.topk_mass_mean` is 0.5", True),
    "settings copy": (edit_manifest(lambda m: m["settings"].__setitem__("top_k", 3)), "manifest.json", r"capture.top_k.*settings.top_k", True),
    "negative window count": (shard0("windows", -3), "manifest.json", r"shards\[0\].windows` is -3", True),
    "absurd window count": (edit_manifest(lambda m: [m["shards"][-1].__setitem__("windows", 10**12),
                                                     m["totals"].__setitem__("windows", 10**12)] and None), "manifest.json",
                            r"shards\[2\].windows` is 1000000000000", True),
    "shard tokens": (shard0("tokens", 5), "manifest.json", r"shards\[0\].tokens` is 5", True),
    "file size": (edit_manifest(lambda m: m["shards"][0]["files"]["00000.arrow"].__setitem__("bytes", 10**15)),
                  "manifest.json", r"shards\[0\].bytes", True),
    "path escape": (edit_manifest(lambda m: m["shards"][0]["files"].__setitem__("../../etc/passwd", m["shards"][0]["files"]["00000.arrow"])),
                    "manifest.json", r"not a plain relative path", True),
    # Zarr metadata (re-signed: the checksums match)
    "zarr codecs null": (edit_layer(lambda z: z.__setitem__("codecs", None)), "zarr.json", r"`codecs` is None", True),
    "zarr /../ separator": (edit_layer(lambda z: z.__setitem__("chunk_key_encoding", {"name": "default", "configuration": {"separator": "/../"}})),
                            "zarr.json", r"chunk_key_encoding", True),
    "zarr storage_transformers": (edit_layer(lambda z: z.__setitem__("storage_transformers", [{"name": "x"}])), "zarr.json",
                                  r"storage_transformers", True),
    "zarr data_type object": (edit_layer(lambda z: z.__setitem__("data_type", "object")), "zarr.json", r"data_type 'object'", True),
    "zarr pickle codec": (edit_layer(lambda z: z.__setitem__("codecs", [{"name": "numcodecs.pickle"}])), "zarr.json",
                          r"codec 'numcodecs.pickle'", True),
    "zarr v2 .zarray": (to_zarr_v2, ".zarray", r"Zarr v2", True),
    "zarr absurd chunk": (edit_layer(lambda z: z["chunk_grid"]["configuration"].__setitem__("chunk_shape", [2**31, 48])),
                          "zarr.json", r"chunk_shape \[2147483648, 48\], larger than the array", True),
    "zarr group not v3": (edit_json("shards/00000.zarr/zarr.json", lambda z: z.__setitem__("zarr_format", 2)), "zarr.json",
                          r"not a Zarr v3 group", True),
    # Arrow files that differ from the manifest (re-signed)
    "arrow schema": (rewrite_shard(lambda t: t.set_column(4, "target_logprob", t.column(4).cast(pa.list_(pa.float64(), 16)))),
                     "00000.arrow", r"columns differ from the manifest schema", True),
    "arrow list length": (rewrite_shard(shorter_lists), "00000.arrow", r"columns differ from the manifest schema", True),
    "sampled list length": (rewrite_shard(extra_sample), "00000.arrow", r"sample_ids: window 0 holds \d+ values but its sample_n", False),
    "arrow row count": (rewrite_shard(lambda t: t.slice(0, 7)), "00000.arrow", r"holds 7 windows but the manifest says 8", False),
    # format 2 stores targets only where loss_mask is 1: one entry per trained position of each window
    "top-k targets one short": (rewrite_shard(drop_target("topk_ids", 1)), "00000.arrow",
                                r"topk_ids: window 1 holds (\d+) entries but its loss_mask marks (?!\1)\d+ trained positions", False),
    "sample counts one short": (rewrite_shard(drop_target("sample_n", 2)), "00000.arrow",
                                r"sample_n: window 2 holds (\d+) entries but its loss_mask marks (?!\1)\d+ trained positions", False),
    "loss mask moved": (rewrite_shard(move_trained_position, "00002"), "00002.arrow",
                        r"target_logprob: window \d+ holds (\d+) entries but its loss_mask marks (?!\1)\d+ trained positions", False),
    "hidden rows not the trained count": (edit_layer(lambda z: z.__setitem__("shape", [z["shape"][0] + 16, z["shape"][1]])),
                                          "zarr.json", r"has shape \[(\d+), \d+\], expected \[(?!\1)\d+, \d+\] \(stored positions, width\)", True),
    # tokenizer
    "tokenizer auto_map": (edit_json("tokenizer/tokenizer_config.json", lambda c: c.__setitem__("auto_map", {"AutoTokenizer": ["evil.Tok", None]})),
                           "tokenizer_config.json", r"asks for remote code", True),
    "tokenizer.json flipped byte": (flip_byte("tokenizer/tokenizer.json"), "tokenizer.json", r"checksum mismatch", True),
    "tokenizer_config.json flipped byte": (flip_byte("tokenizer/tokenizer_config.json"), "tokenizer_config.json", r"checksum mismatch", True),
    "tokenizer.json re-signed edit": (edit_json("tokenizer/tokenizer.json", lambda t: t["model"]["vocab"].__setitem__("zzzz", 999)),
                                      "tokenizer.json", r"hashes to .* but manifest.json's tokenizer.sha256", True),
    "tokenizer special token": (edit_json("tokenizer/tokenizer_config.json", lambda c: c.__setitem__("eos_token", "def")),
                                "tokenizer_config.json", r"eos_token is 'def' but manifest.json's tokenizer.special_tokens", True),
    "tokenizer special token id": (edit_manifest(lambda m: [m["tokenizer"].__setitem__("eos_token_id", 7),
                                                            m["settings"].__setitem__("x", 1)] and None),
                                   "tokenizer.json", r"eos token '<\|endoftext\|>' has id 0 but manifest.json's tokenizer.eos_token_id is 7", True),
    "zarr codec configuration": (edit_layer(lambda z: z["codecs"][0].__setitem__("configuration", "x")), "zarr.json",
                                 r"codec 'sharding_indexed' has configuration 'x'", True),
    "unlisted tokenizer file": (add_tokenizer_file, "added_tokens.json", r"not listed in manifest.json", True),
    # symlinks and special files
    "symlinked shard": (symlink("shards/00000.arrow"), "00000.arrow", r"is a symlink", True),
    "symlinked shards folder": (symlink("shards"), "shards", r"is a symlink", True),
    "symlinked zarr folder": (symlink("shards/00000.zarr"), "00000.zarr", r"is a symlink", True),
    "symlinked tokenizer file": (symlink("tokenizer/tokenizer.json"), "tokenizer.json", r"is a symlink", True),
    "shard is /dev/zero": (symlink("shards/00001.arrow", "/dev/zero"), "00001.arrow", r"is a symlink", True),
    "shard is a FIFO": (fifo, "00001.arrow", r"is a FIFO, expected a regular file", True),
}


def assert_one_line(result, file: str, pattern: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert file in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_dataset_is_refused_in_one_line(case, base, tmp_path):
    change, file, pattern, inspect_catches = CASES[case]
    ds = tmp_path / "ds"
    shutil.copytree(base, ds)
    change(ds)
    assert_one_line(CliRunner().invoke(main, ["verify", str(ds)]), file, pattern)
    r = CliRunner().invoke(main, ["inspect", str(ds)])
    if inspect_catches:
        assert_one_line(r, file, pattern)
    else:  # only reading the rows finds it; inspect summarizes the manifest and checks the files' headers
        assert r.exit_code == 0, r.output


def test_the_base_dataset_verifies(base):
    r = CliRunner().invoke(main, ["verify", str(base)])
    assert r.exit_code == 0 and r.output.startswith("ok: 3 shards"), r.output
    assert "verify" not in r.output  # no progress bar when not on a terminal
    from pipeline.format import verify_dataset

    seen = []
    verify_dataset(base, progress=lambda shard: seen.append((shard.name, shard.windows)))
    assert seen == [("00000", 8), ("00001", 8), ("00002", 3)]  # called once per verified shard, in order


def test_verify_a_file_instead_of_a_folder(base):
    for command in ("verify", "inspect"):
        path = base / "manifest.json"
        assert_one_line(CliRunner().invoke(main, [command, str(path)]), "manifest.json", r"is a file, not a dataset folder")


def test_nothing_outside_the_folder_is_read(base, tmp_path):
    """A symlinked shard pointing at a file outside the dataset is refused before it is opened: even one whose
    bytes would pass every check."""
    ds = tmp_path / "ds"
    shutil.copytree(base, ds)
    outside = tmp_path / "outside.arrow"
    shutil.copy(ds / "shards" / "00000.arrow", outside)
    os.chmod(outside, 0)  # opening it would fail differently (and root would read it anyway): the message proves no open
    symlink("shards/00000.arrow", outside)(ds)
    r = CliRunner().invoke(main, ["verify", str(ds)])
    assert_one_line(r, "00000.arrow", r"is a symlink")


# --- values: checksums match (re-signed), only reading the values finds them -----------------------------------------

VALUES = {
    "NaN top-k log-prob": (replace_column("topk_logprobs", set_at((2, 3, 1), np.nan)), r"topk_logprobs: NaN at window 2, position 3"),
    "positive top-k log-prob": (replace_column("topk_logprobs", set_at((1, 0, 0), 0.5)), r"topk_logprobs: log-prob 0.5 > 0 at window 1, position 0"),
    "unsorted top-k": (replace_column("topk_logprobs", lambda a: a[..., ::-1].copy()), r"topk_logprobs: not sorted most probable first"),
    "repeated top-k id": (replace_column("topk_ids", lambda a: np.repeat(a[..., :1], a.shape[-1], -1)), r"topk_ids: an id stored twice"),
    "top-k id >= vocab": (replace_column("topk_ids", set_at((0, 5, 2), 319 + 1)),
                          r"topk_ids: token id 320 at window 0, position 5 is outside the vocabulary of 320"),
    "label >= vocab": (replace_column("labels", set_at((4, 2), 400)), r"labels: token id 400 at window 4, position 2"),
    "input id >= vocab": (replace_column("input_ids", set_at((0, 0), 321)), r"input_ids: token id 321"),
    "loss mask 2": (replace_column("loss_mask", set_at((0, 0), 2)), r"loss_mask: value 2 at window 0, position 0"),
    "NaN target log-prob": (replace_column("target_logprob", set_at((3, 3), np.nan)), r"target_logprob: NaN at window 3, position 3"),
    "positive target log-prob": (replace_column("target_logprob", set_at((3, 3), 1.0)), r"target_logprob: log-prob 1 > 0"),
    "sample count 0 unique": (replace_column("sample_n", set_at((0, 0), 0)), r"sample_n: 0 unique ids at window 0, position 0"),
    "window_index": (replace_column("window_index", lambda a: a[::-1].copy()), r"window_index: window 0 has index 7, expected 0"),
    # format 2: positions restart at 0 or count up (a loss_mask hole is a prompt position, allowed)
    "position jump": (replace_column("position_ids", set_at((2, 5), 9)),
                      r"position_ids: window 2, position 5 neither restarts at 0 nor continues", "00002"),
    "labels not shifted": (replace_column("labels", set_at((1, 4), 7)), r"labels: label differs from the next input at window 1, position 4"),
}


@pytest.mark.parametrize("case", list(VALUES))
def test_impossible_values_are_refused_by_verify(case, base, tmp_path):
    change, pattern, shard = (*VALUES[case], "00000")[:3]
    ds = tmp_path / "ds"
    shutil.copytree(base, ds)
    rewrite_shard(change, shard)(ds)
    assert_one_line(CliRunner().invoke(main, ["verify", str(ds)]), f"{shard}.arrow", pattern)


def test_verify_shows_a_progress_bar_on_a_terminal(base):
    """On a terminal (a real pseudo-terminal here) verify draws a bar on stderr; --no-progress hides it."""
    import pty
    import subprocess
    import sys

    def run(*extra):
        import fcntl
        import struct
        import termios

        controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(base), *extra], stdout=subprocess.PIPE,
                              stderr=terminal, timeout=120)
        os.close(terminal)
        shown = b""
        try:
            while chunk := os.read(controller, 65536):
                shown += chunk
        except OSError:  # the terminal's other end is closed: all read
            pass
        os.close(controller)
        return proc, shown.decode(errors="replace")

    proc, shown = run()
    assert proc.returncode == 0 and proc.stdout.startswith(b"ok: 3 shards")
    assert "verify" in shown and "19/19" in shown, shown
    proc, shown = run("--no-progress")
    assert proc.returncode == 0 and "verify" not in shown


# --- no malformed value anywhere becomes a traceback -----------------------------------------------------------------

ODD_VALUES = [None, "x", -1, [], {}, 10**12, 1.5, True, "/../"]


def json_leaves(obj, path=()):
    if path:
        yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:2]):
            yield from json_leaves(v, path + (i,))


def variants(obj):
    """`obj` with one value replaced by an odd one, for every value (lists: their first two items) and odd value."""
    import copy

    for path in json_leaves(obj):
        for value in ODD_VALUES:
            changed = copy.deepcopy(obj)
            node = changed
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            yield path, value, changed


def test_no_manifest_or_zarr_value_causes_a_traceback(base):
    """Every value of manifest.json and of a layer's zarr.json replaced by each odd value: the checks either accept it
    or raise FormatError, never another exception (which the CLI would print as a traceback)."""
    from pipeline.common.errors import FormatError
    from pipeline.format.manifest import check_manifest
    from pipeline.format.zarr_meta import check_array_meta

    refused = 0
    m = manifest(base)
    m["corpus"]["files"] = m["corpus"]["files"][:1]
    for path, value, changed in variants(m):
        try:
            check_manifest(changed)
        except FormatError:
            refused += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"manifest {path} = {value!r}: {type(e).__name__}: {e}")
    assert refused > 500
    meta = json.loads((base / layer_json(base)).read_text())
    for path, value, changed in variants(meta):
        try:
            check_array_meta(changed, "zarr.json", tuple(meta["shape"]))
        except FormatError:
            pass
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"zarr.json {path} = {value!r}: {type(e).__name__}: {e}")


@pytest.mark.parametrize("rel", ["shards/00001.arrow", "shards/00000.zarr/zarr.json", "LAYER/zarr.json", "LAYER/c/0/0",
                                 "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_a_flipped_byte_in_any_kind_of_file_is_found(base, tmp_path, rel, where):
    ds = tmp_path / "ds"
    shutil.copytree(base, ds)
    rel = rel.replace("LAYER", layer_json(ds).rsplit("/", 1)[0])
    data = bytearray((ds / rel).read_bytes())
    data[int(len(data) * where)] ^= 0x20
    (ds / rel).write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(ds)])
    assert_one_line(r, rel.rsplit("/", 1)[-1] if "/c/" not in rel else "c/0/0", r"checksum mismatch")
