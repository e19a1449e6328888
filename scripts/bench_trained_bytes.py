"""Bytes on disk per trained token: a chat capture (targets stored only at the assistant's tokens) against a text
capture of the same teacher with the same settings (docs/FORMAT.md, "Targets only where the student learns").

    python scripts/bench_trained_bytes.py --teacher .cache/teacher-... --corpus .cache/corpus

Builds the conversational corpus (`scripts/make_corpus.py --chat`: the user shows a stdlib definition, the assistant
answers with its docstring) when missing, renders it with a ChatML template, and captures `--tokens` corpus tokens of
the chat rows (`--train-on assistant`) and of the text rows (`heldout-mixed.jsonl`, every token trained) with the same
`--seq-len`, `--top-k`, targets and encoding, packed. Prints one markdown row per capture: the share of positions
trained, the dataset bytes, and bytes per trained token (`totals.bytes / totals.valid_tokens`), and the chat/text ratio.
CPU is fine for the 13.8M teacher of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PrecomputeConfig  # noqa: E402
from pipeline.precompute import precompute  # noqa: E402

# ChatML without generation markers: what most chat models ship; the end-of-turn text closes each assistant turn.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def capture(out: Path, a, data: str, **kw) -> dict:
    if out.exists():
        shutil.rmtree(out)
    return precompute(PrecomputeConfig(teacher=a.teacher, data=[data], out=str(out), seq_len=a.seq_len, top_k=a.top_k,
                                       targets=a.targets, encoding=a.encoding, compression=a.compression, max_tokens=a.tokens, batch_size=4,
                                       device="cpu", dtype="float32", progress=False, **kw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--corpus", default=".cache/corpus", help="folder of scripts/make_corpus.py (chat files added)")
    ap.add_argument("--work", default=".cache/bench-trained-bytes")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--targets", default="topk")
    ap.add_argument("--encoding", default="exact")
    ap.add_argument("--compression", default="none", help="none or zstd (Arrow buffer compression of the shards)")
    a = ap.parse_args()
    corpus, work = Path(a.corpus), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (corpus / "chat.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_corpus import build_chat_corpus

        build_chat_corpus(corpus)
    template = work / "chatml.jinja"
    template.write_text(CHATML)
    chat = capture(work / "chat", a, str(corpus / "chat-heldout.jsonl"), format="chat", chat_template=str(template))
    text = capture(work / "text", a, str(corpus / "heldout-mixed.jsonl"))
    print(f"settings: --seq-len {a.seq_len} --top-k {a.top_k} --targets {a.targets} --encoding {a.encoding} --compression {a.compression} "
          f"--max-tokens {a.tokens}, packed")
    print("| capture | positions | trained | trained share | capture.positions | bytes | bytes per trained token |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    per = {}
    for name, m in (("chat (assistant tokens)", chat), ("text (all tokens)", text)):
        t = m["totals"]
        per[name] = t["bytes"] / t["valid_tokens"]
        print(f"| {name} | {t['tokens']} | {t['valid_tokens']} | {t['valid_tokens'] / t['tokens']:.1%} | "
              f"{m['capture'].get('positions', 'all')} | {t['bytes']} | {per[name]:.1f} |")
    ratio = per["chat (assistant tokens)"] / per["text (all tokens)"]
    print(f"\nchat / text bytes per trained token: {ratio:.3f}")
    (work / "result.json").write_text(json.dumps({"chat": chat["totals"], "text": text["totals"], "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
