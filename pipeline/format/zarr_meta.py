"""Check a hidden-state Zarr group's metadata before zarr parses it, and give zarr a filesystem that is safe for it.

zarr would follow whatever `zarr.json` says: a codec could run code, a chunk key separator like `/../` leaves the folder,
a `storage_transformers` entry or an object dtype changes how bytes are read. So every key is checked against what the
writer (pipeline/format/writer.py) produces: Zarr v3, float16, a regular chunk grid, allowlisted codecs. Imports no torch.
"""

from __future__ import annotations

from ..common.errors import FormatError

# Codecs a hidden-state array may use. Anything else (e.g. a pickle-based numcodecs codec) is refused unread.
ALLOWED_ZARR_CODECS = {"bytes", "zstd", "sharding_indexed", "crc32c", "transpose", "gzip", "blosc"}
ARRAY_KEYS = {"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs",
              "attributes", "dimension_names", "storage_transformers"}
ZARR_V2_FILES = (".zarray", ".zgroup", ".zattrs", ".zmetadata")


def _fail(where: str, msg: str):
    raise FormatError(f"{where}: {msg}; the dataset was not written by distill or was altered: do not use it")


def _scalar_config(conf: dict, where: str, name: str, allowed: dict) -> None:
    """Each configuration key must be known and of its type (zarr would raise on anything else, or misread it)."""
    for key, value in conf.items():
        check = allowed.get(key)
        if check is None or not check(value):
            _fail(where, f"codec {name!r} has configuration {key}={value!r}, which distill does not write or read")


_INT = lambda v: type(v) is int
CODEC_CONFIG = {
    "bytes": {"endian": lambda v: v in ("little", "big")},
    "zstd": {"level": _INT, "checksum": lambda v: type(v) is bool},
    "crc32c": {},
    "gzip": {"level": _INT},
    "transpose": {"order": lambda v: isinstance(v, list) and sorted(v) == [0, 1]},
    "blosc": {"cname": lambda v: isinstance(v, str), "clevel": _INT, "shuffle": lambda v: isinstance(v, str),
              "typesize": _INT, "blocksize": _INT},
}


def check_codecs(codecs, where: str) -> None:
    if not isinstance(codecs, list) or not codecs:
        _fail(where, f"`codecs` is {codecs!r}, expected a non-empty list of codecs")
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else None
        if not isinstance(name, str) or name not in ALLOWED_ZARR_CODECS:
            _fail(where, f"uses zarr codec {name!r}; allowed: {', '.join(sorted(ALLOWED_ZARR_CODECS))}")
        if set(codec) - {"name", "configuration"}:
            _fail(where, f"codec {name!r} has keys {sorted(set(codec) - {'name', 'configuration'})}, expected name and configuration")
        conf = codec.get("configuration", {})
        if not isinstance(conf, dict):
            _fail(where, f"codec {name!r} has configuration {conf!r}, expected an object")
        if name == "sharding_indexed":
            _scalar_config(conf, where, name, {"chunk_shape": lambda v: True, "codecs": lambda v: True,
                                               "index_codecs": lambda v: True, "index_location": lambda v: v in ("start", "end")})
            _check_shape(conf.get("chunk_shape"), where, "sharding chunk_shape")
            check_codecs(conf.get("codecs"), where)
            check_codecs(conf.get("index_codecs"), where)
        else:
            _scalar_config(conf, where, name, CODEC_CONFIG[name])


def _check_shape(shape, where: str, what: str, length: int = 2) -> list[int]:
    if not isinstance(shape, list) or len(shape) != length or not all(type(x) is int and 1 <= x <= 1 << 31 for x in shape):
        _fail(where, f"{what} is {shape!r}, expected {length} positive integers")
    return shape


def check_group_meta(meta, where: str) -> None:
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        _fail(where, "is not a Zarr v3 group (expected zarr_format 3, node_type 'group')")


def check_array_meta(meta, where: str, shape: tuple[int, int], max_chunk_rows: int = 0) -> None:
    """Raise FormatError unless `meta` (a parsed zarr.json) describes a float16 (tokens, width) array as distill writes.

    max_chunk_rows: a chunk may have this many rows even when the array has fewer (an array of trained positions only
    is chunked by windows' worth of rows, T per chunk, whatever its length)."""
    if not isinstance(meta, dict):
        _fail(where, f"is a JSON {type(meta).__name__}, expected an object")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        _fail(where, f"is not a Zarr v3 array (zarr_format {meta.get('zarr_format')!r}, node_type {meta.get('node_type')!r})")
    unknown = sorted(set(meta) - ARRAY_KEYS)
    if unknown:
        _fail(where, f"has keys {unknown} that format version 1 does not use")
    if meta.get("storage_transformers"):
        _fail(where, f"uses storage_transformers {meta['storage_transformers']!r}, which format version 1 does not allow")
    if meta.get("data_type") != "float16":
        _fail(where, f"has data_type {meta.get('data_type')!r}, expected 'float16'")
    if meta.get("shape") != list(shape):
        _fail(where, f"has shape {meta.get('shape')!r}, expected {list(shape)} (stored positions, width)")
    grid = meta.get("chunk_grid")
    if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(grid.get("configuration"), dict):
        _fail(where, f"has chunk_grid {grid!r}, expected a regular grid")
    chunk = _check_shape(grid["configuration"].get("chunk_shape"), where, "chunk_shape")
    bounds = (max(1, shape[0], max_chunk_rows), max(1, shape[1]))
    if any(c > b for c, b in zip(chunk, bounds)):  # a chunk is allocated whole when read: bound it by the array
        _fail(where, f"has chunk_shape {chunk}, larger than the array {list(shape)}")
    check_codecs(meta.get("codecs"), where)
    for codec in meta["codecs"]:
        inner = codec.get("configuration", {}).get("chunk_shape") if codec["name"] == "sharding_indexed" else None
        if isinstance(inner, list) and any(type(c) is not int or c < 1 or o % c for c, o in zip(inner, chunk)):
            _fail(where, f"has sharding chunk_shape {inner}, which does not divide the chunk shape {chunk}")
    keys = meta.get("chunk_key_encoding")
    conf = keys.get("configuration", {}) if isinstance(keys, dict) else None
    if not isinstance(keys, dict) or keys.get("name") != "default" or not isinstance(conf, dict) or \
            set(conf) - {"separator"} or conf.get("separator", "/") not in ("/", "."):
        _fail(where, f"has chunk_key_encoding {keys!r}, expected the default encoding with separator '/' or '.'")
    if type(meta.get("fill_value")) not in (int, float):
        _fail(where, f"has fill_value {meta.get('fill_value')!r}, expected a number")
    names = meta.get("dimension_names")
    if names is not None and (not isinstance(names, list) or len(names) != 2
                              or not all(x is None or isinstance(x, str) for x in names)):
        _fail(where, f"has dimension_names {names!r}, expected two names")


def zarr_filesystem(fs):
    """An fsspec filesystem for one zarr open: a fresh asynchronous instance.

    zarr runs its I/O on its own event loop. An async filesystem (s3, gcs, http) that was created for synchronous use,
    or already used from another loop, holds a session bound to that other loop ("attached to a different loop"), so
    zarr gets a new instance made for it (not from fsspec's instance cache); a synchronous one (memory, local) is wrapped.
    """
    if fs.async_impl:
        return type(fs)(*fs.storage_args, **{**fs.storage_options, "asynchronous": True, "skip_instance_cache": True})
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs, asynchronous=True)
