"""Is this model a causal (left-to-right) language model? Asked of every teacher and student before it is used.

`AutoModelForCausalLM` also loads encoders: a BERT becomes `BertLMHeadModel` with a freshly initialised head and, unless
its config says `is_decoder`, bidirectional attention, so position 0 sees token 10. Distilling from or into such a
model exits 0 with wrong results, so `pipeline.teacher`, `trainer.student` and `trainer.online` refuse it from its
config. Also `max_positions`, the longest window a model handles, which both stages check. Imports no torch.
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


PROBE_TOKENS = 8  # window of the behavioural check: a forward this short costs nothing next to a capture or a run
PROBE_RTOL = 1e-5  # float32 prefixes of a causal model match exactly; an encoder's differ by ~1e-3 of the logits


def sees_the_future(model) -> bool | None:
    """Behavioural check, the config check's second line: change only the last token and see whether the logits of the
    earlier positions move. True: the model attends to later tokens (not causal); None: not checked (only float32
    weights are probed, where a causal model's prefix logits match to rounding)."""
    import torch

    params = list(model.parameters())
    if not params or params[0].dtype != torch.float32:
        return None
    emb = model.get_input_embeddings()
    vocab = int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    n = min(PROBE_TOKENS, limit) if isinstance(limit, int) and limit > 1 else PROBE_TOKENS
    ids = (torch.arange(n) * 37 + 11) % vocab  # (T,)
    pair = torch.stack([ids, ids.clone()])  # (2, T)
    pair[1, -1] = (pair[1, -1] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=pair.to(emb.weight.device if emb is not None else params[0].device),
                           use_cache=False).logits.float()  # (2, T, V)
    finally:
        model.train(was_training)
    prefix = (logits[0, :-1] - logits[1, :-1]).abs().max()
    return bool(prefix > PROBE_RTOL * logits.abs().max().clamp(min=1.0))


def require_causal_model(model, what: str) -> None:
    """The config check, then the behavioural one on the loaded model; one UserError naming `what`."""
    require_causal_lm(model.config, what)
    if sees_the_future(model):
        raise UserError(f"{what}: the model's output at a position changes when a later token changes, so it attends to "
                        "the future and is not a causal language model; pass a decoder-only causal LM")


def max_positions(config) -> int | None:
    """The most positions a model config allows, whichever name its architecture uses; None when it sets none."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
