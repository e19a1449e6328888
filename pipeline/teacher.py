"""Load the teacher and its tokenizer, and pick the device and dtype. Called by `pipeline.precompute`.

Loading failures become one-line `UserError`s: a missing path, a hub id that cannot be fetched, or a model that is not
a causal LM. `trust_remote_code` is passed through only when the user asked for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .common.causal import max_positions, require_causal_lm, require_causal_model
from .common.errors import UserError, describe
from .format.sections import Teacher


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def load_tokenizer(name: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"--teacher {name}: no such folder; pass a local model folder or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"--teacher {name}: cannot load its tokenizer ({describe(e)})")
    if tokenizer.eos_token_id is None:
        raise UserError(f"--teacher {name}: its tokenizer has no EOS token, needed between documents; set eos_token in its tokenizer_config.json")
    return tokenizer


def load_teacher(name: str, revision: str | None, dtype: torch.dtype, device: torch.device, trust_remote_code: bool,
                 attn_implementation: str | None = None, device_map: str | None = None, max_memory: dict | None = None,
                 tp_plan: str | None = None, tp_size: int | None = None):
    """Return the model in eval mode on `device`; with `device_map`, placed by accelerate across this node's devices
    (`max_memory` per device, 'cpu' = offload); with `tp_plan`, split by transformers' tensor parallelism across the
    torchrun processes (`tp_size` of them per replica)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"--teacher {name}: cannot load its config ({describe(e)})")
    require_causal_lm(config, f"--teacher {name}")
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if device_map:  # what fits nowhere in max_memory goes to a private temporary folder (accelerate's disk offload)
            import tempfile

            offload = tempfile.TemporaryDirectory(prefix="distill-offload-")
            extra |= {"device_map": device_map, "offload_folder": offload.name} | ({"max_memory": max_memory} if max_memory else {})
        if tp_plan:  # over the default process group: pipeline/tensor_parallel.py makes it this replica's tp_size ranks
            extra |= tp_load_options(tp_plan, tp_size)
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            raise UserError(
                f"--teacher {name}: a {type(config).__name__} ({config.model_type}) is not a causal language model; "
                "pass a model that AutoModelForCausalLM can load"
            )
        if tp_plan and "tp_plan" in str(e):
            raise UserError(f"--teacher {name}: --tp {tp_size} needs the model's tensor-parallel plan, and transformers has "
                            f"none for a {type(config).__name__} ({config.model_type}); use --device-map auto instead")
        raise UserError(f"--teacher {name}: cannot load the model ({describe(e)})")
    except OSError as e:
        raise UserError(f"--teacher {name}: cannot load the model weights ({describe(e)})")
    except ImportError as e:  # e.g. --device-map without accelerate, or a flash attention kernel not installed
        raise UserError(f"--teacher {name}: {describe(e)}")
    model = (model if device_map or tp_plan else model.to(device)).eval()
    if device_map:
        model._distill_offload = offload  # removed with the model
    require_causal_model(model, f"--teacher {name}")  # float32 teachers: also checked by behaviour
    return model


def tp_load_options(tp_plan: str, tp_size: int) -> dict:
    """from_pretrained's tensor-parallel arguments: a DistributedConfig where transformers has one (the bare
    tp_plan/tp_size arguments are deprecated there), else the bare arguments of earlier 5.x releases."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": tp_plan, "tp_size": tp_size}
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan, tp_size=tp_size)}


def teacher_record(name: str, revision: str | None, model, dtype: torch.dtype) -> Teacher:
    """The manifest's `teacher` section."""
    config = model.config
    text = json.dumps(config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict(), sort_keys=True, default=str)
    commit = getattr(config, "_commit_hash", None)
    return Teacher(
        name_or_path=name,
        revision=revision or commit,
        model_type=config.model_type,
        architectures=getattr(config, "architectures", None),
        config_sha256=hashlib.sha256(text.encode()).hexdigest(),
        dtype=str(dtype).removeprefix("torch."),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else int(config.vocab_size),
        num_hidden_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        max_position_embeddings=max_positions(config),
        parameters=int(sum(p.numel() for p in model.parameters())),
    )
