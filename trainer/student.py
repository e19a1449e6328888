"""The student: loading it, refusing one the dataset cannot train correctly, and its forward pass with the losses.

Called by `trainer.train` and `trainer.evaluate`. The forward feeds the fused loss the last hidden state (after the final
norm) and the output embedding, so full (B, T, V) logits are never built; models whose logits are more than a plain
linear map of that state (soft-capping, scaling) fall back to the plain path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from torch import nn

from pipeline.common.causal import require_causal_lm, require_causal_model
from pipeline.common.errors import UserError, describe
from pipeline.format.reader import Dataset
from pipeline.common.causal import max_positions
from pipeline.format.tokenizer_id import tokenizer_sha256

from .losses.fused import fused_distill_loss
from .losses.hidden import default_layer_map, hidden_state_loss, parse_layer_map
from .losses.plain import plain_distill_loss
from .config import TrainConfig

# Config attributes that make logits differ from `hidden @ W.T + b` (Gemma 2, Cohere, Granite, ...).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale", "logit_softcap")


def load_student(cfg: TrainConfig, ds: Dataset):
    """The student in float32 (master weights) and its own tokenizer (None for --student-config or when it has none)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.student_config:
        if not os.path.isfile(cfg.student_config):
            raise UserError(f"--student-config {cfg.student_config}: no such file; pass a config.json of a causal LM")
        try:
            with open(cfg.student_config) as f:
                raw = json.load(f)
            config = AutoConfig.from_pretrained(cfg.student_config, trust_remote_code=cfg.trust_remote_code)
        except (ValueError, OSError) as e:
            raise UserError(f"--student-config {cfg.student_config} is not a usable model config ({describe(e)}); "
                            "pass a config.json with a model_type, as save_pretrained writes it")
        require_causal_lm(config, f"--student-config {cfg.student_config}")
        tokenizer_section = ds.manifest.tokenizer
        if "vocab_size" not in raw:  # a config written for this dataset need not repeat its vocabulary
            config.vocab_size = ds.vocab_size
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key not in raw and getattr(tokenizer_section, key) is not None:
                setattr(config, key, getattr(tokenizer_section, key))
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        require_causal_model(model, f"--student-config {cfg.student_config}")
        return model, None
    return (load_pretrained(cfg.student, cfg.trust_remote_code, what=f"--student {cfg.student}"),
            load_tokenizer(cfg.student, cfg.trust_remote_code))


def position_kwargs(position_ids: torch.Tensor | None) -> dict:
    """`{"position_ids": ...}` when some window restarts its positions (packed examples: transformers then builds a
    block-diagonal causal mask); `{}` when every row is 0..T-1, which is what the model does without them (format-1
    and cross-document windows run exactly as before, on any architecture)."""
    if position_ids is None:
        return {}
    T = position_ids.shape[-1]
    if torch.equal(position_ids, torch.arange(T, device=position_ids.device).expand_as(position_ids)):
        return {}
    return {"position_ids": position_ids}


def looks_local(path: str) -> bool:
    """A path the user meant as a folder on this machine (not a hub id such as `org/name`)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)


def load_pretrained(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, what: str | None = None):
    """A causal LM from a folder or hub id; one UserError naming `what` when it is missing, unloadable or not causal."""
    from transformers import AutoConfig, AutoModelForCausalLM

    what = what or f"model {path}"
    if looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        found = "is a file, not a model folder" if os.path.exists(os.path.expanduser(path)) else "no such folder"
        raise UserError(f"{what}: {found}; pass a model folder (with config.json) or a hub id")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{what}: cannot load its config ({describe(e, 300)}); pass a model folder or hub id")
    require_causal_lm(config, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot load the model ({describe(e, 300)}); pass a model folder or hub id")
    require_causal_model(model, what)
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer saved with a model, or None when there is none."""
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dataset_tokenizer(ds: Dataset):
    """The teacher's tokenizer saved in the dataset's `tokenizer/` folder (copied to a temp folder when remote)."""
    from transformers import AutoTokenizer

    src = f"{ds.root}/tokenizer"
    if ds.is_local:
        return AutoTokenizer.from_pretrained(src)
    tmp = tempfile.mkdtemp(prefix="distill-tokenizer-")
    try:
        for path in ds.fs.ls(src, detail=False):
            ds.fs.get(path, os.path.join(tmp, os.path.basename(path.rstrip("/"))))
        return AutoTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compatibility_problems(model, tokenizer, ds: Dataset, what: str = "student") -> list[str]:
    """Why `ds` cannot train (or evaluate) this model correctly: vocabulary, tokenizer, positions. Empty when it can."""
    problems = []
    vocab = getattr(model.config, "vocab_size", None)
    if vocab != ds.vocab_size:
        problems.append(
            f"{what} vocab size {vocab} differs from the teacher's {ds.vocab_size} in the dataset; use a {what} with "
            f"vocab_size {ds.vocab_size} and the teacher's tokenizer"
        )
    if tokenizer is not None and tokenizer_sha256(tokenizer) != ds.manifest.tokenizer.sha256:
        problems.append(
            f"{what} tokenizer differs from the teacher's tokenizer the dataset was made with (sha256 mismatch); "
            f"use a {what} trained with the dataset's tokenizer/ or rerun precompute with a matching teacher"
        )
    positions = max_positions(model.config)
    if positions is not None and ds.seq_len > positions:
        problems.append(
            f"dataset windows are {ds.seq_len} tokens but the {what} handles at most {positions} positions; "
            f"use a {what} with max_position_embeddings >= {ds.seq_len} or rerun precompute with --seq-len {positions}"
        )
    return problems


def num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))


def resolve_layer_map(cfg: TrainConfig, model, ds: Dataset) -> tuple[dict[int, int], list[str]]:
    """Student -> teacher hidden_states indices for the hidden loss, and the problems that make it unusable."""
    if cfg.hidden_weight == 0:
        return {}, []
    n_student, n_teacher = num_layers(model.config), int(ds.manifest.teacher.num_hidden_layers)
    stored = ds.hidden_layers
    if not stored:
        return {}, ["--hidden-weight needs hidden states but the dataset has none; rerun precompute with --hidden-layers, "
                    "or pass --hidden-weight 0"]
    try:
        layer_map = parse_layer_map(cfg.hidden_map) if cfg.hidden_map else default_layer_map(n_student, n_teacher)
    except ValueError as e:
        return {}, [f"--hidden-map: {e}"]
    if not cfg.hidden_map and not set(layer_map.values()) <= set(stored):
        # Fewer layers stored than the proportional map needs (e.g. only --hidden-layers -1): pair each stored teacher
        # layer with the student layer at the same relative depth instead (round half up; embeddings 0 with 0).
        layer_map = {}
        for t in sorted(stored):
            layer_map.setdefault(0 if t == 0 else max(1, (2 * t * n_student + n_teacher) // (2 * n_teacher)), t)
    problems = []
    for s, t in sorted(layer_map.items()):
        if not 0 <= s <= n_student:
            problems.append(f"--hidden-map student layer {s} is outside 0..{n_student}")
        if t not in stored:
            problems.append(
                f"hidden loss maps student layer {s} to teacher layer {t}, which the dataset does not store (it has "
                f"{stored}); pass --hidden-map using those layers or rerun precompute with --hidden-layers {t}"
            )
    return layer_map, problems


def fused_blocker(model) -> str | None:
    """Why the fused loss cannot reproduce this model's logits (None when it can)."""
    emb = model.get_output_embeddings()
    if not isinstance(emb, nn.Linear):
        return "the model has no linear output embedding"
    for key in LOGIT_TRANSFORMS:
        value = getattr(model.config, key, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            return f"the model config sets {key}={value}"
    return None


class DistillStep(nn.Module):
    """Student forward plus every loss term, in one module because DDP syncs gradients only for work in a forward."""

    def __init__(self, model, projections: nn.ModuleDict, loss_cfg, layer_map: dict[int, int], hidden_weight: float,
                 hidden_loss: str, fused: bool):
        super().__init__()
        self.model, self.projections, self.loss_cfg = model, projections, loss_cfg
        self.layer_map, self.hidden_weight, self.hidden_loss, self.fused = layer_map, hidden_weight, hidden_loss, fused

    def forward(self, input_ids, labels, teacher_ids=None, teacher_logprobs=None, teacher_logits=None, hidden=None,
                position_ids=None, teacher_log_norm=None):
        """input_ids, labels, position_ids (B, T); teacher_ids/logprobs (B, T, K); teacher_logits (B, T, V); hidden
        {teacher layer: (B, T, H)}. Restarting position ids keep packed examples apart (no attention mask is passed).
        teacher_log_norm (B, T): the stored log sum_v p_v^(1/T) at the loss temperature (exact tempering of top-k)."""
        pos = position_kwargs(position_ids)
        need_hiddens = bool(self.layer_map)
        flat = lambda x: None if x is None else x.flatten(0, 1)  # (B, T, ...) -> (N, ...)
        targets = dict(teacher_ids=flat(teacher_ids), teacher_logprobs=flat(teacher_logprobs), teacher_logits=flat(teacher_logits),
                       teacher_log_norm=flat(teacher_log_norm))
        if self.fused:
            out = self.model.base_model(input_ids=input_ids, output_hidden_states=need_hiddens, use_cache=False, **pos)
        else:
            out = self.model(input_ids=input_ids, output_hidden_states=need_hiddens, use_cache=False, **pos)
        # The losses do their own float32 math on (possibly bfloat16) inputs; autocast must not recast inside them.
        with torch.autocast(input_ids.device.type, enabled=False):
            if self.fused:
                emb = self.model.get_output_embeddings()
                res = fused_distill_loss(out.last_hidden_state.flatten(0, 1), emb.weight, labels.flatten(),
                                                self.loss_cfg, bias=emb.bias, **targets)
            else:
                res = plain_distill_loss(out.logits.flatten(0, 1), labels.flatten(), self.loss_cfg, **targets)
        loss, hidden_part = res.loss, torch.zeros((), device=input_ids.device)
        if need_hiddens:
            student_h = {s: out.hidden_states[s].flatten(0, 1) for s in self.layer_map}  # (N, d_s)
            teacher_h = {t: hidden[t].flatten(0, 1) for t in self.layer_map.values()}  # (N, d_t)
            mask = (labels != self.loss_cfg.ignore_index).flatten()  # (N,)
            hidden_part = hidden_state_loss(student_h, teacher_h, self.projections, mask, kind=self.hidden_loss,
                                                   layer_map=self.layer_map)
            loss = loss + self.hidden_weight * hidden_part
        return {"loss": loss, "ce": res.ce, "kd": res.kd, "hidden": hidden_part.detach(),
                "n_tokens": torch.tensor(float(res.n_tokens), device=input_ids.device)}
