"""Issue 11 end to end: a JSONL of conversations captured with a ChatML template (packed, position ids restarting at each
conversation), trained on and evaluated; the stream layout (--cross-document-attention) and version-1 datasets still
read. A real tiny Llama teacher whose tokenizer has the ChatML special tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.common.errors import UserError
from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset, verify_dataset
from pipeline.precompute import precompute
from tests.pipeline.chat_templates import CHATML, chat_tokenizer

T, K = 256, 8
TOPICS = [("textwrap.dedent", "Remove common leading whitespace."), ("bisect.insort", "Insert x and keep a sorted."),
          ("os.path.join", "Join path parts."), ("json.dumps", "Serialize obj to a JSON string."),
          ("re.escape", "Escape special characters."), ("shutil.copy", "Copy data and mode bits."),
          ("math.isclose", "True if a and b are close."), ("zlib.crc32", "Compute a CRC-32 checksum."),
          ("heapq.heappush", "Push item onto the heap."), ("glob.glob", "Return paths matching a pattern.")]


def conversations() -> list[list[dict]]:
    out = []
    for i, (name, answer) in enumerate(TOPICS):
        conv = [{"role": "user", "content": f"What does {name} do?"}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:  # a second turn: both assistant turns are trained
            conv += [{"role": "user", "content": "Short?"}, {"role": "assistant", "content": "Yes."}]
        out.append(conv)
    return out


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory, tokenizer_dir):
    """A tiny Llama whose tokenizer has the ChatML special tokens but no template (--chat-template sets it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = chat_tokenizer(tokenizer_dir, "chatml")
    tok.chat_template = None
    out = tmp_path_factory.mktemp("chat-teacher")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    template = out.parent / "chatml.jinja"
    template.write_text(CHATML)
    return out, template


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-data") / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations()))
    return path


def capture(teacher, data, out, **kw):
    cfg = dict(teacher=str(teacher), data=[str(data)], out=str(out), seq_len=T, top_k=K, batch_size=2, shard_size=3,
               progress=False)
    return precompute(PrecomputeConfig(**(cfg | kw)))


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory, chat_teacher, chat_data):
    teacher, template = chat_teacher
    out = tmp_path_factory.mktemp("chat-ds") / "ds"
    capture(teacher, chat_data, out, chat_template=str(template))
    return out


def columns(ds, name):
    return np.concatenate([s.column(name) for s in ds.shards])


def segments(pos: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each example in a window: positions restart at 0 (padding continues the last one)."""
    starts = np.flatnonzero(pos == 0).tolist()
    return list(zip(starts, starts[1:] + [len(pos)]))


def test_loss_mask_is_the_assistant_turns_and_the_template_is_kept(chat_dataset):
    from transformers import AutoTokenizer

    ds = open_dataset(chat_dataset)
    verify_dataset(chat_dataset)
    m = ds.manifest
    assert m.format_version == 2 and m.corpus.layout == "packed" and m.corpus.formats == {"chat": len(TOPICS)}
    assert m.corpus.packing_stats["examples"] == len(TOPICS) and m.corpus.packing_stats["split"] == 0
    tok = AutoTokenizer.from_pretrained(str(chat_dataset / "tokenizer"))
    assert tok.chat_template == CHATML  # the student carries it
    labels, mask, pos = columns(ds, "labels"), columns(ds, "loss_mask").astype(bool), columns(ds, "position_ids")
    assert m.corpus.trained_tokens == m.totals.valid_tokens == int(mask.sum())
    runs = []
    for w in range(len(labels)):
        edges = np.flatnonzero(np.diff(np.r_[0, mask[w].astype(np.int8), 0]))  # starts and ends of runs of 1s
        for a, b in zip(edges[::2], edges[1::2]):
            assert any(s <= a and b <= e for s, e in segments(pos[w]))  # a trained run never crosses examples
            runs.append(tok.decode(labels[w, a:b]))
    expected = [t["content"] + "<|im_end|>" for c in conversations() for t in c if t["role"] == "assistant"]
    assert sorted(runs) == sorted(expected)
    assert max(len(segments(p)) for p in pos) >= 3  # conversations were packed together


def test_stored_logprobs_are_those_of_each_example_alone(chat_dataset, chat_teacher):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(chat_teacher[0])).eval()
    ds = open_dataset(chat_dataset)
    ids, pos, labels = columns(ds, "input_ids"), columns(ds, "position_ids"), columns(ds, "labels")
    target, topk = columns(ds, "target_logprob"), columns(ds, "topk_logprobs").astype(np.float32)
    top_ids = columns(ds, "topk_ids").astype(np.int64)
    mask = columns(ds, "loss_mask").astype(bool)  # targets are stored only where trained (format 2)
    assert ds.capture.positions == "trained" and 0 < mask.mean() < 1
    checked = 0
    for w in range(len(ids)):
        for a, b in segments(pos[w]):
            with torch.no_grad():  # the example alone, positions from 0, nothing before it
                lp = model(torch.from_numpy(ids[w, a:b].astype(np.int64))[None]).logits[0].float().log_softmax(-1)
            m = mask[w, a:b]
            np.testing.assert_allclose(target[w, a:b][m], lp[np.arange(b - a), labels[w, a:b].astype(np.int64)].numpy()[m], atol=1e-4)
            want = lp.topk(K, -1)
            np.testing.assert_allclose(topk[w, a:b][m], want.values.numpy()[m], atol=2e-2, rtol=1e-3)
            near_tie = np.diff(want.values.numpy()[m], axis=-1).min(-1, initial=0) > -1e-3  # (n,) order may flip in float16
            np.testing.assert_array_equal(top_ids[w, a:b][m][~near_tie], want.indices.numpy()[m][~near_tie])
            assert (target[w, a:b][~m] == 0).all() and (topk[w, a:b][~m] == 0).all()  # nothing stored: read as 0
            checked += a > 0 and m.any()  # an example packed after another
    assert checked >= 3
    # attending across the examples would change them: the packed window run as one stream differs
    w = int(np.argmax([len(segments(p)) for p in pos]))
    a = segments(pos[w])[1][0]
    with torch.no_grad():
        lp = model(torch.from_numpy(ids[w].astype(np.int64))[None]).logits[0].float().log_softmax(-1)
    m = mask[w, a:]
    assert np.abs(lp[a:].topk(K, -1).values.numpy()[m] - topk[w, a:][m]).max() > 0.05


def test_train_and_eval_on_the_packed_chat_dataset(chat_dataset, chat_teacher, tmp_path):
    from trainer.config import EvalConfig, TrainConfig
    from trainer.evaluate import evaluate
    from trainer.train import train
    from tests.trainer.conftest import student_config_dict

    ds = open_dataset(chat_dataset)
    n_trained = int(columns(ds, "loss_mask").sum())
    # the teacher as student: eval sees what the capture saw only if the position ids reach the model
    m = evaluate(EvalConfig(student=str(chat_teacher[0]), data=str(chat_dataset), batch_size=4, device="cpu"))
    assert m["tokens"] == n_trained  # metrics over trained positions only
    assert 0 <= m["kl"] < 1e-3 and m["top1_agreement"] > 0.99
    target = columns(ds, "target_logprob")[columns(ds, "loss_mask").astype(bool)]
    assert m["ce"] == pytest.approx(float(-target.mean()), rel=1e-4)
    config = tmp_path / "student.json"
    config.write_text(json.dumps(student_config_dict(vocab=ds.vocab_size, max_position_embeddings=512)))
    result = train(TrainConfig(data=str(chat_dataset), out=str(tmp_path / "run"), student_config=str(config), batch_size=2,
                               steps=3, lr=3e-3, warmup=1, device="cpu", progress=False, save_every=1000, eval_data=str(chat_dataset)))
    assert np.isfinite(result["loss"]) if "loss" in result else True
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [x for x in lines if "eval" in json.dumps(x)]
    assert lines and evals


def test_cross_document_attention_is_the_stream_and_version_1_still_reads(chat_teacher, tmp_path, corpus_dir, monkeypatch):
    from pipeline.corpus import make_windows as stream_windows

    teacher = chat_teacher[0]
    stream = tmp_path / "stream"
    capture(teacher, corpus_dir, stream, max_tokens=300, seq_len=32, cross_document_attention=True)
    ds = open_dataset(stream)
    assert ds.manifest.corpus.layout == "stream" and ds.manifest.corpus.corpus_tokens == 301
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    tokens = []
    for f in sorted(corpus_dir.iterdir()):
        tokens += tok(f.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tokens = np.asarray(tokens[:301], np.uint16)
    inputs, labels, mask = stream_windows(tokens, 0, ds.windows, 32, tok.eos_token_id)
    np.testing.assert_array_equal(columns(ds, "input_ids"), inputs)
    np.testing.assert_array_equal(columns(ds, "labels"), labels)
    np.testing.assert_array_equal(columns(ds, "loss_mask"), mask)
    np.testing.assert_array_equal(columns(ds, "position_ids"), np.broadcast_to(np.arange(32), inputs.shape))

    # a version-1 dataset (no position_ids column) reads, verifies and trains
    import pipeline.format.schema as schema
    import pipeline.precompute as pre

    monkeypatch.setattr(schema, "FORMAT_VERSION", 1)
    monkeypatch.setattr(pre, "FORMAT_VERSION", 1)
    old = tmp_path / "v1"
    capture(teacher, corpus_dir, old, max_tokens=300, seq_len=32, cross_document_attention=True)
    monkeypatch.undo()
    v1 = open_dataset(old)
    assert v1.manifest.format_version == 1 and "position_ids" not in v1.manifest.schema
    verify_dataset(old)
    np.testing.assert_array_equal(columns(v1, "position_ids"), np.broadcast_to(np.arange(32), inputs.shape))
    np.testing.assert_array_equal(columns(v1, "topk_ids"), columns(ds, "topk_ids"))
    from trainer.config import EvalConfig
    from trainer.evaluate import evaluate

    assert evaluate(EvalConfig(student=str(teacher), data=str(old), batch_size=4, device="cpu"))["kl"] < 1e-3


def test_packing_is_refused_on_a_model_that_ignores_position_ids(tmp_path, tokenizer_dir, chat_data, chat_teacher):
    from transformers import AutoTokenizer, OPTConfig

    from tests.conftest import save_tiny_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    opt = save_tiny_model(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=128, attn_implementation="eager"), tokenizer_dir, tmp_path / "opt")
    with pytest.raises(UserError, match="--no-packing"):
        capture(opt, chat_data, tmp_path / "out", chat_template=str(chat_teacher[1]), attn_implementation="eager", seq_len=64)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_no_packing_gives_each_conversation_its_own_window(chat_teacher, chat_data, tmp_path):
    teacher, template = chat_teacher
    out = tmp_path / "unpacked"
    capture(teacher, chat_data, out, chat_template=str(template), packing=False, train_on="all")
    verify_dataset(out)
    ds = open_dataset(out)
    assert ds.manifest.corpus.layout == "unpacked" and ds.windows == len(TOPICS)
    pos, mask = columns(ds, "position_ids"), columns(ds, "loss_mask").astype(bool)
    assert all(len(segments(p)) == 1 for p in pos)
    # --train-on all: every position of a conversation is trained, padding is not
    lengths = mask.sum(1)
    assert (mask == (np.arange(T)[None] < lengths[:, None])).all()
    assert ds.manifest.corpus.packing_stats["padding"] == int((~mask).sum())
