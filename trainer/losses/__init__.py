"""The loss library of stage two: KD against stored (sparse) or online (dense) teacher targets, CE, hidden-state losses.

`trainer.train` (`distill train`) calls these; they are pure tensor functions, tested in `tests/trainer/test_losses.py` and
measured by `scripts/bench_losses.py`.

- `config`   LossConfig, LossOutput (no torch import, so configs and CLI help stay light)
- `buckets`  how the teacher's targets become a distribution over buckets (stored ids + tail), and the divergences over them
- `plain`    reference path on materialized (N, V) student logits
- `fused`    default path: logits built chunk by chunk from hidden states and the output embedding, never (N, V) at once
- `hidden`   layer maps, projections and the hidden-state loss

Names are loaded lazily (PEP 562) so `from trainer.losses import LossConfig` does not import torch.
"""

import importlib

_EXPORTS = {
    "LossConfig": "config",
    "LossOutput": "config",
    "LOSS_KINDS": "config",
    "TAIL_MODES": "config",
    "plain_distill_loss": "plain",
    "fused_distill_loss": "fused",
    "tempered_log_norm": "buckets",
    "tempered_teacher_logprobs": "buckets",
    "log_norm_from_partitions": "buckets",
    "default_layer_map": "hidden",
    "parse_layer_map": "hidden",
    "make_projections": "hidden",
    "hidden_state_loss": "hidden",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
