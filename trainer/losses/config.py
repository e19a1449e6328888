"""Configuration and result of the distillation losses, and the allowed values of each choice (defined here only).

Imports no torch: `trainer.config` takes the loss settings from here (same names, defaults and help text) for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd")
TAIL_MODES = ("tail", "renormalize", "uniform")
HIDDEN_LOSS_KINDS = ("mse", "cosine")


@dataclass
class LossConfig:
    loss: str = "forward_kl"
    """Divergence between teacher and student: forward_kl = KL(teacher || student) (mass covering), reverse_kl =
    KL(student || teacher) (mode seeking), jsd = generalized Jensen-Shannon with mixture weight `beta`."""

    tail: str = "tail"
    """What sparse targets say about the vocabulary outside the stored ids: tail = one ghost bucket holding the teacher's
    leftover mass (the default: the best stored-top-64 row of the quality table, level with online full-vocabulary KD),
    renormalize = the stored probabilities rescaled to sum to 1 (tail ignored), uniform = the leftover mass spread evenly
    over the ids not stored. Ignored for dense (online teacher) targets."""

    alpha: float = 0.5
    """Weight of the next-token cross-entropy; the KD term gets 1 - alpha. alpha = 1 (or no teacher targets) is plain CE."""

    temperature: float = 1.0
    """Softening temperature T: student logits are divided by T, the teacher is tempered to match, and KD is scaled by
    T^2 so its gradients keep their size across T. CE always uses T = 1. Stored top-k targets are tempered exactly only
    with the tempered log-normalizer captured for this T; without it the tail is approximated."""

    beta: float = 0.5
    """JSD mixture weight: M = beta * teacher + (1 - beta) * student, JSD = beta KL(teacher||M) + (1-beta) KL(student||M).
    Must lie strictly between 0 and 1 (at either end the divergence is identically 0)."""

    chunk_size: int = 1024
    """Tokens per chunk in the fused path. Its peak memory is about chunk_size x vocab x 4 bytes (one float32 buffer for
    sparse targets at T = 1; two at T != 1; a few for dense targets or the uniform tail) plus the float32 gradient of the
    output embedding (vocab x hidden x 4 bytes). Smaller chunks save memory at a little speed."""

    ignore_index: int = -100
    """Label value of positions that contribute nothing (padding, prompt tokens)."""

    def validate(self) -> None:
        """Raise one ValueError listing every bad field, with the allowed values."""
        problems = []
        if self.loss not in LOSS_KINDS:
            problems.append(f"loss={self.loss!r} is not one of {', '.join(LOSS_KINDS)}")
        if self.tail not in TAIL_MODES:
            problems.append(f"tail={self.tail!r} is not one of {', '.join(TAIL_MODES)}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha={self.alpha!r} must be in [0, 1] (weight of CE; KD gets 1 - alpha)")
        if not self.temperature > 0.0:
            problems.append(f"temperature={self.temperature!r} must be > 0")
        if not 0.0 < self.beta < 1.0:
            problems.append(f"beta={self.beta!r} must be strictly between 0 and 1")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            problems.append(f"chunk_size={self.chunk_size!r} must be a positive integer")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            problems.append(f"ignore_index={self.ignore_index!r} must be an integer")
        if problems:
            raise ValueError("invalid loss config: " + "; ".join(problems))


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate: alpha * ce + (1 - alpha) * kd (just ce when no teacher targets are given)."""

    ce: torch.Tensor
    """Detached scalar: mean next-token cross-entropy over valid positions (T = 1)."""

    kd: torch.Tensor
    """Detached scalar: mean divergence over valid positions, already scaled by T^2 (0 when KD is off)."""

    n_tokens: int
    """Number of valid (non-ignored) positions, the normalizer of both terms."""
