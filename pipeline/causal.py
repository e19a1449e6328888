"""Is this model a causal (left-to-right) language model? Asked of every teacher and student before it is used.

`AutoModelForCausalLM` also loads encoders: a BERT becomes `BertLMHeadModel` with a freshly initialised head and, unless
its config says `is_decoder`, bidirectional attention, so position 0 sees token 10. Distilling from or into such a
model exits 0 with wrong results, so `pipeline.teacher`, `trainer.student` and `trainer.online` refuse it from its
config. Imports no torch.
"""

from __future__ import annotations

from .errors import UserError

# Model types whose transformers causal-LM class is an encoder made causal only by `is_decoder=True` in the config
# (their modeling code warns "add `is_decoder=True`" otherwise). Without it they attend in both directions.
ENCODER_MODEL_TYPES = frozenset({
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "rembert",
    "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod",
})


def causal_lm_problem(config) -> str | None:
    """Why a model with this transformers config is not a causal LM (None when it is)."""
    kind = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"a {kind} model is an encoder-decoder (is_encoder_decoder=true), not a causal (decoder-only) language model"
    if kind in ENCODER_MODEL_TYPES and not getattr(config, "is_decoder", False):
        return (f"a {kind} model is an encoder: it attends in both directions (is_decoder=false), so it is not a causal "
                "language model")
    return None


def require_causal_lm(config, what: str) -> None:
    """Raise one UserError naming `what` (e.g. "--teacher path") when the config is not a causal LM's."""
    problem = causal_lm_problem(config)
    if problem:
        raise UserError(f"{what}: {problem}; pass a decoder-only causal LM (GPT-2, Llama, Qwen, ...)")
