"""Knowledge-base evaluation (#15): three documents as a user uploads them (a manual as PDF, a price list as
markdown, an FAQ as HTML; 25 chunks of <= 40 words), 48 questions.

- `recall_at_3` (`recall_at_1`): a top-3 passage (the top one) comes from the right document and holds the
  answer's words.
- `accuracy_with_documents` / `accuracy_without`: the CPU default LLM (and any other --models), one
  thread, the session's prompt layout (the passages open the user's message), the reply cut by the
  session's ReplyShaper; right = every expected word group in the reply.
- `retrieval_ms`: embedding the question and searching (what a turn waits for when no interim lookup
  came), p50/p95, on one CPU thread.
- `interim`: as a session has it. Each question is spoken (piper), and the words ASR hears in the
  first second after the VAD starts the utterance (plus the pre-roll: the session's interim
  transcript, `serve_app/session/listener.py`) are what the passages are looked up from; recall@3 and
  recall@1 of those, and each model's accuracy with them. `spoken_s`: how long the questions take to say.

The same pipeline as the platform (models.documents, models.embed, models.vector_index), without Ray.
Writes benchmarks/results/knowledge_eval.json.    python -m benchmarks.knowledge_eval
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.knowledge_docs import QUESTIONS, KBQuestion, documents
from benchmarks.llm_eval import reply_to
from benchmarks.local_app import cpu_llm_model
from models.documents import chunk_text, extract_text, kind_of
from models.embed import MiniLMEmbedder
from models.llm import EmbeddedLlamaCpp, GenerationParams, build_messages, knowledge_block
from models.vector_index import VectorIndex

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ("You are Kim, the support assistant of Brightline, a coffee machine maker, on a live video call. "
          "Answer in one short sentence.")


def right(reply: str, q: KBQuestion) -> bool:
    low = reply.lower()
    return all(any(w.lower() in low for w in group) for group in q.expect)


async def answer(llm: EmbeddedLlamaCpp, question: str, block: str) -> str:
    """The reply a session would speak (llm_eval.reply_to: ReplyShaper, an unfinished last clause dropped)."""
    messages = build_messages(SYSTEM, "", [{"role": "user", "content": question}], knowledge=block)
    return (await reply_to(llm, messages, GenerationParams()))["text"]


def interim_lookups(index: VectorIndex, embedder: MiniLMEmbedder, sources: list[str]) -> dict:
    """The passages a session finds for each question from its interim transcript (see the module doc)."""
    from models.asr import WhisperASR
    from models.audio import resample
    from models.tts import PiperTTS
    from models.vad import CHUNK, SpeechSegmenter
    from serve_app.session.listener import INTERIM_AFTER_S, PRE_ROLL_CHUNKS, RATE

    tts, asr = PiperTTS(), WhisperASR()
    vad_delay = SpeechSegmenter().start_chunks * CHUNK  # the VAD starts an utterance this far into the speech
    hits, firsts, spoken, heard, blocks = [], [], [], [], []
    for q in QUESTIONS:
        speech = tts.synthesize(q.text)
        audio = resample(speech.audio, speech.sample_rate, RATE).astype(np.float32)
        onset = int(np.argmax(np.abs(audio) > 0.02))
        start = onset + vad_delay - PRE_ROLL_CHUNKS * CHUNK
        end = onset + vad_delay + int(INTERIM_AFTER_S * RATE)
        spoken.append((len(audio) - onset) / RATE)
        words = asr.transcribe(audio[max(0, start):end]).text.strip() if end < len(audio) else ""
        heard.append(words)
        found = index.search(embedder.embed([words])[0], sources, k=3) if words else []
        hits.append(any(p.document_id == q.source and right(p.text, q) for p in found))
        firsts.append(bool(found) and found[0].document_id == q.source and right(found[0].text, q))
        blocks.append(knowledge_block([p.text for p in found if p.score >= 0.25]))
    return {"interim_after_s": INTERIM_AFTER_S, "spoken_s": {"p10": round(float(np.percentile(spoken, 10)), 2),
                                                             "p50": round(float(np.percentile(spoken, 50)), 2)},
            "too_short": sum(not w for w in heard), "recall_at_3": round(float(np.mean(hits)), 3),
            "recall_at_1": round(float(np.mean(firsts)), 3), "heard": heard, "blocks": blocks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(dict.fromkeys([cpu_llm_model(), "smollm2-135m"])),
                    help="embedded LLMs to answer with (default: the CPU profile's, then SmolLM2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knowledge_eval.json"))
    a = ap.parse_args()
    embedder = MiniLMEmbedder(threads=1)
    index = VectorIndex()
    docs = {}
    for source, (name, data, ctype) in documents().items():
        chunks = [c.text for c in chunk_text(extract_text(data, kind_of(ctype, name, data)))]
        index.put(source, embedder.embed(chunks), chunks)
        docs[source] = {"file": name, "bytes": len(data), "chunks": len(chunks)}
    embedder.embed(["warm up"])
    hits, firsts, ms, blocks = [], [], [], []
    for q in QUESTIONS:
        t0 = time.perf_counter()
        found = index.search(embedder.embed([q.text])[0], list(docs), k=3)
        ms.append((time.perf_counter() - t0) * 1000)
        hits.append(any(p.document_id == q.source and right(p.text, q) for p in found))
        firsts.append(bool(found) and found[0].document_id == q.source and right(found[0].text, q))
        blocks.append(knowledge_block([p.text for p in found if p.score >= 0.25]))
    interim = interim_lookups(index, embedder, list(docs))
    out = {"documents": docs, "questions": len(QUESTIONS), "recall_at_3": round(float(np.mean(hits)), 3),
           "recall_at_1": round(float(np.mean(firsts)), 3),
           "retrieval_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)},
           "misses": [q.text for q, h in zip(QUESTIONS, hits, strict=True) if not h],
           "interim": {k: v for k, v in interim.items() if k != "blocks"}, "cpu_default": cpu_llm_model(),
           "models": {}}
    for name in a.models:
        llm = EmbeddedLlamaCpp(n_parallel=1, threads=1, model=name)
        llm.warmup()

        async def run(llm=llm):
            try:
                return [(await answer(llm, q.text, b), await answer(llm, q.text, ""), await answer(llm, q.text, ib))
                        for q, b, ib in zip(QUESTIONS, blocks, interim["blocks"], strict=True)]
            finally:
                await llm.aclose()
        pairs = asyncio.run(run())
        rows = list(zip(pairs, QUESTIONS, strict=True))
        out["models"][name] = {
            "accuracy_with_documents": round(float(np.mean([right(w, q) for (w, _, _), q in rows])), 3),
            "accuracy_without": round(float(np.mean([right(n, q) for (_, n, _), q in rows])), 3),
            "accuracy_with_interim_passages": round(float(np.mean([right(i, q) for (_, _, i), q in rows])), 3),
            "answers": [{"question": q.text, "with_documents": w, "without": n, "with_interim_passages": i,
                         "right": right(w, q)} for (w, n, i), q in rows]}
        print(name, {k: v for k, v in out["models"][name].items() if k != "answers"})
    print({k: v for k, v in out.items() if k not in ("models", "misses")}, out["misses"])
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
