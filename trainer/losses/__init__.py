"""The loss library of stage two: KD against stored (sparse) or online (dense) teacher targets, CE, hidden-state losses.

`trainer.train` (`distill train`) calls these; they are pure tensor functions, tested in `tests/trainer/test_losses.py` and
measured by `scripts/bench_losses.py`. Import from the modules (this package imports nothing, so `trainer.losses.config`
stays free of torch for the configs and the CLI help):

- `config`   LossConfig, LossOutput and the allowed values (LOSS_KINDS, TAIL_MODES, HIDDEN_LOSS_KINDS); no torch
- `buckets`  how the teacher's targets become a distribution over buckets (stored ids + tail), and the divergences over them
- `plain`    reference path on materialized (N, V) student logits
- `fused`    default path: logits built chunk by chunk from hidden states and the output embedding, never (N, V) at once
- `hidden`   layer maps, projections and the hidden-state loss
"""
