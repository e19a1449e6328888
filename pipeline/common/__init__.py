"""What both stages use that is not the dataset format: errors (`errors`), device and dtype resolution (`device`), atomic
and plain-file helpers (`files`), output-folder locking (`outdir`), model checks (`causal`), path identities
(`identity`), and the `distill` command group with the config-to-CLI generator (`cli`).

`trainer/` imports from `pipeline/` only this package and `pipeline.format` (tests/test_seams.py says so).
"""
