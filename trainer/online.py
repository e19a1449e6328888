"""The online-teacher baseline (`distill train --online-teacher PATH`): the teacher runs at every step.

Called by `trainer.train`. It reads the token windows of the same dataset, so the data order is identical to an offline
run, and hands the teacher's full-vocabulary logits to the same loss code (its dense `teacher_logits` path). This is the
expensive setup offline distillation replaces; it exists so users can measure what the stored top-k costs in quality.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.format.reader import Dataset

from .student import compatibility_problems, load_pretrained, load_tokenizer, position_kwargs


def load_online_teacher(path: str, ds: Dataset, device: torch.device, amp_dtype: torch.dtype | None,
                        trust_remote_code: bool = False):
    """The teacher in eval mode with frozen weights (in the compute dtype: it is never trained), and the reasons it
    cannot stand in for the dataset's teacher."""
    teacher = load_pretrained(path, trust_remote_code, dtype=amp_dtype or torch.float32, what=f"--online-teacher {path}")
    problems = compatibility_problems(teacher, load_tokenizer(path, trust_remote_code), ds, what="online teacher")
    teacher.to(device).eval().requires_grad_(False)
    return teacher, problems


@torch.no_grad()
def online_teacher_logits(teacher, input_ids: torch.Tensor, amp_dtype: torch.dtype | None,
                          position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) token ids [and position ids] -> (B, T, V) float32 teacher logits. no_grad, not inference_mode: the loss
    saves them for backward."""
    autocast = torch.autocast(input_ids.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        return teacher(input_ids=input_ids, use_cache=False, **position_kwargs(position_ids)).logits.float()
