"""Hidden-state distillation: which student layer learns from which teacher layer, the learned projections, the loss.

`trainer.train` builds the map (default or `--layer-map`), owns the projections (saved with the student checkpoint but
outside its HF weights, since they are a training aid, not part of the model) and adds `hidden_state_loss` to the loss.
Layer indices index HF `hidden_states` tuples: 0 = embeddings, L = output of the last layer.
"""

import re

import torch
import torch.nn.functional as F

from .config import HIDDEN_LOSS_KINDS


def default_layer_map(n_student_layers: int, n_teacher_layers: int) -> dict[int, int]:
    """Proportional map: student layer i (1..L_s) <-> teacher layer round(i * L_t / L_s), halves rounded up.

    The last student layer meets the last teacher layer; embeddings (index 0) are not mapped.
    """
    if n_student_layers < 1 or n_teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student={n_student_layers}, teacher={n_teacher_layers}")
    # integer round-half-up of i * L_t / L_s, so the map does not depend on float rounding or banker's rounding
    return {i: (2 * i * n_teacher_layers + n_student_layers) // (2 * n_student_layers)
            for i in range(1, n_student_layers + 1)}


def parse_layer_map(text: str) -> dict[int, int]:
    """Parse "student:teacher,..." (e.g. "1:2,2:4") into {1: 2, 2: 4}. Raises ValueError listing every bad pair."""
    hint = "expected comma-separated student:teacher pairs of non-negative integers, e.g. '1:2,2:4'"
    if not text or not text.strip():
        raise ValueError(f"empty layer map; {hint}")
    mapping: dict[int, int] = {}
    problems = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", item)
        if match is None:
            problems.append(f"{item.strip()!r} is not student:teacher")
            continue
        student, teacher = int(match.group(1)), int(match.group(2))
        if student in mapping:
            problems.append(f"student layer {student} is mapped twice")
        mapping[student] = teacher
    if problems:
        raise ValueError(f"bad layer map {text!r}: {'; '.join(problems)}; {hint}")
    return mapping


def make_projections(layer_map: dict[int, int], d_student: int, d_teacher: int) -> torch.nn.ModuleDict:
    """One Linear(d_student, d_teacher) per mapped student layer, keyed by str(student_layer).

    A projection is learned even when the widths match: the student's basis need not be the teacher's.
    """
    if d_student < 1 or d_teacher < 1:
        raise ValueError(f"hidden sizes must be >= 1, got d_student={d_student}, d_teacher={d_teacher}")
    return torch.nn.ModuleDict({str(s): torch.nn.Linear(d_student, d_teacher) for s in sorted(layer_map)})


def hidden_state_loss(student_hiddens: dict[int, torch.Tensor], teacher_hiddens: dict[int, torch.Tensor],
                      projections: torch.nn.ModuleDict, mask: torch.Tensor, kind: str = "mse", *,
                      layer_map: dict[int, int] | None = None) -> torch.Tensor:
    """Mean over the mapped pairs of the mean over valid positions of a per-position distance, in float32.

    The pairs are the projections' keys (student layers). student_hiddens[i]: (N, d_s) (or (B, T, d_s)).
    teacher_hiddens is keyed by the teacher layer layer_map[i] when layer_map is given, else by the student layer i;
    values (N, d_t). mask (N,) bool: valid positions. kind: "mse" = mean over features of (proj(student) - teacher)^2;
    "cosine" = 1 - cos(proj(student), teacher). All positions masked -> 0. The teacher side gets no gradient.
    """
    if kind not in HIDDEN_LOSS_KINDS:
        raise ValueError(f"hidden loss kind={kind!r} is not one of {', '.join(HIDDEN_LOSS_KINDS)}")
    if len(projections) == 0:
        raise ValueError("no projections: the layer map is empty")
    with torch.autocast(device_type=mask.device.type, enabled=False):  # float32 even inside an autocast region
        return _hidden_state_loss(student_hiddens, teacher_hiddens, projections, mask, kind, layer_map)


def _hidden_state_loss(student_hiddens, teacher_hiddens, projections, mask, kind, layer_map):
    keep = mask.reshape(-1).nonzero().squeeze(1)  # (n_valid,) rows selected first: padded rows may hold anything
    total = None
    for key, proj in projections.items():
        student_layer = int(key)
        teacher_layer = layer_map[student_layer] if layer_map is not None else student_layer
        if student_layer not in student_hiddens:
            raise ValueError(f"student hidden states lack layer {student_layer} (have {sorted(student_hiddens)})")
        if teacher_layer not in teacher_hiddens:
            raise ValueError(f"teacher hidden states lack layer {teacher_layer} (have {sorted(teacher_hiddens)})")
        s = student_hiddens[student_layer]
        t = teacher_hiddens[teacher_layer]
        s = s.reshape(-1, s.shape[-1]).index_select(0, keep).float()  # (n_valid, d_s)
        t = t.reshape(-1, t.shape[-1]).index_select(0, keep).detach().float()  # (n_valid, d_t)
        bias = None if proj.bias is None else proj.bias.float()
        x = F.linear(s, proj.weight.float(), bias)  # (n_valid, d_t)
        if kind == "mse":
            per_position = (x - t).pow(2).mean(-1)
        else:
            per_position = 1.0 - F.cosine_similarity(x, t, dim=-1, eps=1e-8)
        term = per_position.sum() / max(keep.numel(), 1)  # 0 (with zero gradients) when all are masked
        total = term if total is None else total + term
    return total / len(projections)
