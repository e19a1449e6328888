"""Stage one's commands (`precompute`, `inspect`, `verify`): a thin layer that parses flags into configs and calls the
stage functions. The `distill` group that lists them with stage two's lives in `pipeline.common.cli`.

torch and transformers are imported inside the commands, so `distill --help`, `inspect` and `verify` stay light.
A `UserError` becomes one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys

import click

from .chat import TRAIN_ON
from .common.cli import config_options, field_help
from .common.errors import run_or_exit
from .config import DTYPES, TARGETS, PrecomputeConfig
from .format.manifest import COMPRESSIONS, ENCODINGS
from .packing import LONG
from .sources import FORMATS


STORAGE_OPTIONS_HELP = field_help(PrecomputeConfig)["storage_options"]  # inspect/verify take it too


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def commands():
    """distill stage one: precompute, inspect, verify (`python -m pipeline.cli` runs them without stage two)."""


@commands.command()
@config_options(PrecomputeConfig, required=("teacher", "data", "out"), skip=("command",), on_off=("packing", "progress"),
                choices={"format": FORMATS, "train_on": TRAIN_ON, "long_examples": LONG, "targets": TARGETS,
                         "encoding": ENCODINGS, "compression": COMPRESSIONS, "dtype": DTYPES},
                extra_help={"data": "Repeatable.", "temperatures": "Comma-separated.", "hidden_layers": "Comma-separated, e.g. 2,-1."})
def precompute(**values):
    """Run a teacher over a corpus once and write its top-k log-probs (and hidden states) as a dataset."""

    def go():
        from .format.remote import redact, redact_command
        from .precompute import precompute as run

        cfg = PrecomputeConfig(**(values | {"data": list(values["data"])}), command=redact_command(["distill"] + sys.argv[1:]))
        manifest = run(cfg)
        if "totals" in manifest:
            t = manifest["totals"]
            click.echo(f"wrote {redact(cfg.out)}: {t['shards']} shards, {t['tokens']} tokens, {t['bytes_per_token']:.1f} bytes/token")

    run_or_exit(go)


# Where the manifest's recon_kl is measured (pipeline.targets.FIDELITY_STRIDE): a sample, not every position. On a real
# teacher's top-64 it read 0.49090 against 0.49279 over all positions (issue 15; BENCHMARKS.md).
RECON_KL_POSITIONS = "every 8th (t % 8 == 0 of each window)"


def summary(ds) -> dict:
    m = ds.manifest
    t, cap = m.totals, m.capture
    return {
        "path": ds.url,
        "format": f"{m.format} v{m.format_version}",
        "teacher": m.teacher.name_or_path,
        "teacher_type": m.teacher.model_type,
        "teacher_dtype": m.teacher.dtype,
        "teacher_parameters": m.teacher.parameters,
        "tokenizer_vocab_size": m.tokenizer.vocab_size,
        "tokenizer_sha256": m.tokenizer.sha256,
        "vocab_size": m.teacher.vocab_size,
        "seq_len": m.corpus.seq_len,
        "documents": m.corpus.documents,
        "tokens": t.tokens,
        "valid_tokens": t.valid_tokens,
        "windows": t.windows,
        "shards": t.shards,
        "targets": list(cap.targets),
        "top_k": cap.top_k,
        "samples": cap.samples if "sampled" in cap.targets else None,
        "sample_temperature": cap.sample_temperature if "sampled" in cap.targets else None,
        "encoding": cap.encoding,
        "compression": cap.compression,
        "hidden_layers": cap.hidden_indices,
        # top-k tempered exactly by `train --temperature T` at these (1 always; others with a stored log-normalizer)
        "exact_temperatures": [1.0, *cap.log_norm_temperatures] if cap.top_k else None,
        "bytes": t.bytes,
        "bytes_per_token": t.bytes_per_token,
        **{f"{stat}_mean": value for stat, value in t.means.items()},
        **({"recon_kl_positions": RECON_KL_POSITIONS} if "recon_kl" in t.means else {}),
        "created_by": m.created_by.to_json(),
    }


@commands.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def inspect(path, as_json, storage_options):
    """Summarize a dataset: teacher, tokenizer, tokens, shards, k, layers, bytes per token, fidelity."""

    def go():
        from .format import open_dataset
        from .format.verify import check_structure

        from .format.remote import parse_storage_options

        ds = open_dataset(path, parse_storage_options(storage_options))
        check_structure(ds)  # cheap: no rows are read (`verify` reads them)
        s = summary(ds)
        if as_json:
            click.echo(json.dumps(s, indent=2))
            return
        for key, value in s.items():
            if key == "created_by":
                value = " ".join(str(x) for x in value.get("command") or []) or value.get("tool")
            elif isinstance(value, float):
                value = f"{value:.4g}"
            if key == "recon_kl_mean":
                value = f"{value} (measured on every 8th position, not all)"
            click.echo(f"{key:22s} {value}")

    run_or_exit(go)


@commands.command()
@click.argument("path")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (it is shown only on a terminal).")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
@click.option("--cache-dir", default=None, help="Local folder for the shards of a remote dataset (default "
              "$XDG_CACHE_HOME/distill/shards); each is checked against its checksums on arrival.")
@click.option("--cache-gb", default=None, type=float, help="Size limit of --cache-dir in GB (default 20); least "
              "recently used shards not in use are deleted to stay under it.")
def verify(path, no_progress, storage_options, cache_dir, cache_gb):
    """Check everything a dataset can be checked against (exit 0 when sound): the manifest against itself, the
    tokenizer files, every checksum, schemas, every column's values and the Zarr metadata (docs/FORMAT.md, "Verify")."""

    def go():
        from tqdm import tqdm

        from .format import verify_dataset

        bar = None

        def progress(shard):
            nonlocal bar
            if bar is None:  # the dataset is open by now: its size is known
                bar = tqdm(total=shard.dataset.windows, desc="verify", unit="window", file=sys.stderr,
                           disable=no_progress or not sys.stderr.isatty())
            bar.update(shard.windows)

        try:
            from .format.remote import parse_storage_options

            ds = verify_dataset(path, progress=progress, storage_options=parse_storage_options(storage_options),
                                cache_dir=cache_dir, cache_gb=cache_gb)
        finally:
            if bar is not None:
                bar.close()
        click.echo(f"ok: {len(ds.shards)} shards, {ds.windows} windows verified")

    run_or_exit(go)



@commands.command("export")
@click.argument("dataset")
@click.option("--to", "to", required=True, type=click.Choice(["axolotl"]), help="The other trainer's format.")
@click.option("--out", required=True, help="A new or empty folder for the exported rows (parquet) and their README.")
@click.option("--logprobs", default="renormalized", show_default=True, type=click.Choice(["renormalized", "full"]),
              help="renormalized: over the stored top-k at --temperature, what axolotl's v2 loader makes; full: the "
                   "stored full-vocabulary log-probs as they are (lossless).")
@click.option("--temperature", default=1.0, show_default=True, type=float,
              help="Rescale the renormalized top-k to this temperature (set axolotl's kd_temperature to the same).")
def export_(dataset, to, out, logprobs, temperature):
    """Write a dataset's top-k targets for another trainer (axolotl's KD plugin: pre-tokenized parquet rows)."""

    def go():
        from .format.remote import refuse_url
        from .interop_axolotl import export_axolotl

        refuse_url(out, "--out", "export")  # never a local folder named `s3:`
        s = export_axolotl(dataset, out, logprobs=logprobs, temperature=temperature)
        click.echo(f"wrote {s['out']}: {s['rows']} rows of {s['tokens_per_row']} tokens, top-{s['top_k']}, {s['files']} parquet file(s)")

    run_or_exit(go)


@commands.command("import")
@click.argument("source")
@click.option("--from", "from_", required=True, type=click.Choice(["axolotl"]), help="The other trainer's format.")
@click.option("--tokenizer", required=True, help="The tokenizer whose ids the rows hold (a folder with tokenizer.json).")
@click.option("--out", required=True, help="A new or empty folder for the distill dataset.")
@click.option("--seq-len", default=None, type=int, help="Window length (default: the longest row minus one).")
@click.option("--shard-size", default=None, type=int, help="Windows per shard (default: the exported dataset's, else 256).")
@click.option("--teacher", default=None, help="The teacher's name to record (default: from the export's "
              "distill_export.json, else unknown).")
def import_(source, from_, tokenizer, out, seq_len, shard_size, teacher):
    """Turn another trainer's logit rows into a distill dataset (manifest, checksums, tokenizer) for `distill train`."""

    def go():
        from .format.remote import refuse_url
        from .interop_axolotl import import_axolotl

        refuse_url(out, "--out", "import")  # never a local folder named `s3:`
        m = import_axolotl(source, out, tokenizer, seq_len=seq_len, shard_size=shard_size, teacher=teacher,
                           command=["distill"] + sys.argv[1:])
        t = m["totals"]
        click.echo(f"wrote {out}: {t['shards']} shards, {t['windows']} windows of {m['corpus']['seq_len']} tokens, "
                   f"top-{m['capture']['top_k']}")

    run_or_exit(go)



@commands.command("report")
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder for the PNG plots and report.md (new, empty, or an earlier report's).")
@click.option("--max-windows", default=2000, show_default=True, type=int,
              help="Windows read per dataset for the distributions (from evenly spread shards).")
def report_(paths, out, max_windows):
    """Pictures of datasets (top-k mass, teacher entropy, bytes per column) and runs (loss, CE, KD, lr, grad norm,
    eval points, overlaid) as PNG plots, with a short markdown summary."""

    def go():
        from .format.remote import refuse_url
        from .report import report

        refuse_url(out, "--out", "report")  # never a local folder named `s3:`
        s = report(list(paths), out, max_windows=max_windows)
        click.echo(f"wrote {out}: {', '.join(s['files'])}")

    run_or_exit(go)


if __name__ == "__main__":
    commands()
