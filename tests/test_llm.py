"""A transformers decoder, as a new user would hand it over: default config, dict batches.

A random ``LlamaForCausalLM`` (2 layers, hidden 64, vocab 256) compiles with its default
config (``use_cache`` on: the capture turns it off on its copy, never on the caller's model),
and graphs holding vmap regions (how transformers builds attention masks when mask functions
are combined, and did for every mask on older versions) run in every pass: the capture
outlines each region into one call_module (``l2fx.frontend.outline_vmap_regions``).
"""
from __future__ import annotations

import copy

import pytest
import torch

import l2fx
from l2fx.artifact import ArtifactReader
from l2fx.config import CompileConfig, ReconstructionConfig, SensitivityConfig
from l2fx.evaluate import DownstreamRunner
from l2fx.frontend import capture, outline_vmap_regions

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, tie: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_calib() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as a tokenizer pads for generation
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]},
            {"input_ids": ids[2:, :11], "attention_mask": mask[2:, :11]}]


def fast() -> CompileConfig:
    return CompileConfig(sensitivity=SensitivityConfig(num_samples=4, num_steps=8),
                         reconstruction=ReconstructionConfig(transform_iters=3, weight_iters=3))


def test_default_config_llama_compiles_and_leaves_the_callers_model_alone(tmp_path):
    model = tiny_llama()
    assert model.config.use_cache is True  # transformers' default: the output carries a DynamicCache
    before = copy.deepcopy(model.state_dict())
    calib = llama_calib()
    compiled = l2fx.compile(model, target_cr=8, calib=calib, config=fast(), verify=True)
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01
    notes = compiled.report.records["capture"]["notes"]
    assert any("use_cache=False" in n for n in notes), notes
    assert model.config.use_cache is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        got = compiled(**calib[0]).logits
        want = model(**calib[0], use_cache=False).logits
    assert got.shape == want.shape
    rel = float((got - want).pow(2).sum() / (want - want.mean()).pow(2).sum())
    assert rel < 0.1, rel  # 8x on random weights: a loose sanity bound, not a quality claim
    path = tmp_path / "llama.l2fx"
    l2fx.save(compiled, path)
    restored = l2fx.load(path, tiny_llama(seed=5))
    with torch.no_grad():
        assert torch.equal(restored(**calib[0]).logits, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_llama_compresses_on_a_float32_copy(tmp_path, dtype):
    """Traced in bfloat16, LlamaRMSNorm's ``h.to(input_dtype)`` is a constant cast to bfloat16,
    so the graph cannot be cast to float32: the compile captures a float32 copy (the caller's
    model is never copied in its own dtype first nor modified), and returns the artifact loaded
    on the model's own graph, which runs in its dtype as the model does."""
    model = tiny_llama().to(dtype)
    before = copy.deepcopy(model.state_dict())
    calib = llama_calib()
    compiled = l2fx.compile(model, target_cr=8, calib=calib, config=fast(), method="gptq")
    assert all(before[k].dtype == v.dtype and torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any("float32 copy" in n for n in compiled.report.records["capture"]["notes"])
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01
    with torch.no_grad():
        got = compiled(**calib[0]).logits
        want = model(**calib[0], use_cache=False).logits
    assert got.dtype == dtype
    rel = float((got.float() - want.float()).pow(2).sum() / (want.float() - want.float().mean()).pow(2).sum())
    assert rel < 0.1, rel
    path = tmp_path / "half.l2fx"
    assert l2fx.save(compiled, path) == compiled.report.file_nbytes
    with torch.no_grad():
        assert torch.equal(l2fx.load(path, tiny_llama(seed=5).to(dtype))(**calib[0]).logits, got)
        mine = l2fx.load_into(path, tiny_llama(seed=5).to(dtype))
        assert torch.equal(mine(**calib[0], use_cache=False).logits, got)
    assert {p.dtype for p in ArtifactReader(path).plain_entries} == {str(dtype).replace("torch.", "")}


def test_capture_matches_eager_exactly():
    model = tiny_llama()
    batch = llama_calib()[0]
    gm, info = capture(model, batch)
    assert info.frontend == "export" and info.notes
    with torch.no_grad():
        assert torch.equal(gm(**batch).logits, model(**batch, use_cache=False).logits)


def _vmap_sdpa_mask(monkeypatch):
    """Makes transformers build every sdpa mask through torch.vmap (its ``use_vmap`` path)."""
    masking = transformers.masking_utils
    original = masking.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def with_vmap(*args, **kwargs):
        kwargs["use_vmap"] = True
        kwargs["allow_is_causal_skip"] = False
        return original(*args, **kwargs)

    monkeypatch.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", with_vmap)


def _vmap_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "vmap" in str(n.target))


def test_vmap_mask_graph_runs_in_every_runner(monkeypatch):
    _vmap_sdpa_mask(monkeypatch)
    model = tiny_llama()
    calib = llama_calib()
    gm, info = capture(model, calib[0])
    assert any("vmap" in n for n in info.notes), info.notes
    assert _vmap_calls(gm) == 0
    assert any(name.startswith("l2fx_vmap_") for name, _ in gm.named_children())
    assert outline_vmap_regions(gm) == 0  # idempotent
    with torch.no_grad():
        want = model(**calib[0], use_cache=False).logits
        assert torch.equal(gm(**calib[0]).logits, want)
    # Re-running only what the embedding reaches (the mask's sizes come from its output).
    runner = DownstreamRunner(gm, calib[0])
    node = next(n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) == "model.embed_tokens.weight")
    out = runner.run_with(node, gm.get_parameter("model.embed_tokens.weight"))
    assert torch.equal(out.logits, want)
    # The whole pipeline, block reconstruction included.
    compiled = l2fx.compile(model, target_cr=8, calib=calib, config=fast(), verify=True)
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01


def test_tied_embeddings_are_one_tensor_under_export(tmp_path):
    """normalize reads a tied tensor under its first name in state_dict() order; the other is
    pruned, so the artifact stores and counts it once. Read by the embedding and by lm_head, it
    is compressed as one linear-family site (it used to stay plain: the families differ)."""
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    calib = llama_calib()
    compiled = l2fx.compile(model, target_cr=8, calib=calib, config=fast())
    coded = [layer.param for layer in compiled.report.layers]
    assert coded.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in coded
    assert compiled.report.records["mark_weights"]["tied_embedding_linear"] == ["model.embed_tokens.weight"]
    names = set(compiled.graph_module.state_dict())
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & names
    assert compiled.report.original_nbytes == sum(p.numel() * 4 for p in model.parameters())  # counted once
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01
    path = tmp_path / "tied.l2fx"
    l2fx.save(compiled, path)
    loaded = l2fx.load_into(path, tiny_llama(seed=5, tie=True))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # one decoder, one cache
    with torch.no_grad():
        want = compiled(**calib[0]).logits
        assert torch.equal(loaded(**calib[0], use_cache=False).logits, want)
        assert torch.equal(l2fx.load(path, tiny_llama(seed=6, tie=True))(**calib[0]).logits, want)


def test_tied_table_is_solved_in_the_lm_head_block_with_its_hessian():
    """The tied table belongs to the block of its linear read (block_partition), so a one-shot
    solver rounds it with lm_head's input Hessian instead of falling back to round-to-nearest."""
    compiled = l2fx.compile(tiny_llama(tie=True), target_cr=8, calib=llama_calib(), method="gptq", config=fast())
    records = compiled.report.records
    assert "model.embed_tokens.weight" not in records["oneshot_solve"]["fallbacks"]
    assert records["oneshot_solve"]["layers"]["model.embed_tokens.weight"]["recipe"] == "gptq"
    blocks = records["block_partition"]["blocks"]
    assert any("embed_tokens" in w for w in blocks[-1]["weights"])
    assert not any("embed_tokens" in w for b in blocks[:-1] for w in b["weights"])
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01


@pytest.mark.parametrize("metric", ["mse", "kl"])
def test_sensitivity_counts_only_the_real_tokens(monkeypatch, metric):
    """On a language model sensitivity_analysis and joint_rounds measure the output distortion
    on the positions the sensitivity samples' attention_mask keeps (padding excluded)."""
    import l2fx.data

    seen = []
    real = l2fx.data.real_positions

    def spy(batch, output):
        keep = real(batch, output)
        seen.append(None if keep is None else (int(keep.numel()), int(keep.sum())))
        return keep

    monkeypatch.setattr(l2fx.data, "real_positions", spy)
    calib = llama_calib()
    cfg = fast().replace(sensitivity=SensitivityConfig(num_samples=4, num_steps=8, output_metric=metric,
                                                          joint_rounds=1))
    compiled = l2fx.compile(tiny_llama(), target_cr=8, calib=calib, method="gptq", config=cfg)
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01
    batch = l2fx.data.take_samples(calib, 4)
    want = (int(batch["attention_mask"].numel()), int(batch["attention_mask"].sum()))
    assert want[1] < want[0]  # the samples hold padding
    assert seen == [want, want], seen  # sensitivity_analysis, then the joint round


def _repadded(calib: list[dict[str, torch.Tensor]], seed: int) -> list[dict[str, torch.Tensor]]:
    """The same batches with other token ids at every padded position (attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in calib:
        ids = b["input_ids"].clone()
        pad = b["attention_mask"] == 0
        ids[pad] = torch.randint(0, 256, (int(pad.sum()),), generator=g)
        out.append({"input_ids": ids, "attention_mask": b["attention_mask"]})
    return out


def test_the_hessians_count_only_the_real_tokens(monkeypatch):
    """GPTQ's per-layer Hessians, streamed block by block (oneshot_solve) and over the whole
    model (model_hessians, OBC's tables), add only the rows of real tokens: their count is the
    calibration's attention_mask sum, and what the padded positions hold changes nothing."""
    import l2fx.passes.oneshot as oneshot_module
    from l2fx.layerwise import model_hessians
    from l2fx.method import structural_pipeline
    from l2fx.passes import MarkWeights
    from l2fx.pipeline import PassContext, PassManager

    calib = llama_calib()
    real = sum(int(b["attention_mask"].sum()) for b in calib)
    assert real < sum(int(b["attention_mask"].numel()) for b in calib)  # the calibration holds padding
    block_hessians = oneshot_module.block_hessians
    runs: list[dict[str, tuple[int, torch.Tensor]]] = []

    def spy(prog, inputs, *keep):
        stats = block_hessians(prog, inputs, *keep)
        runs[-1].update({st.site.param: (st.nsamples, st.hessians) for st in stats if st.hessians is not None})
        return stats

    monkeypatch.setattr(oneshot_module, "block_hessians", spy)
    for c in (calib, _repadded(calib, 1)):
        runs.append({})
        l2fx.compile(tiny_llama(), target_cr=8, calib=c, method="gptq", config=fast())
    assert len(runs[0]) == 15 and runs[0].keys() == runs[1].keys()  # 7 linears a layer, lm_head
    for param, (n, H) in runs[0].items():
        assert n == real, (param, n, real)
        torch.testing.assert_close(runs[1][param][1], H, rtol=1e-4, atol=1e-6)

    gm, _ = capture(tiny_llama(), calib[0])
    with PassContext(config=CompileConfig(min_numel=1), calib=calib, verify=True):
        gm = PassManager([*structural_pipeline().passes, MarkWeights()])(gm).graph_module
    wanted = set(runs[0])
    dense = [model_hessians(gm, c, torch.device("cpu"), wanted) for c in (calib, _repadded(calib, 2))]
    for param in wanted:
        assert dense[0][param].nsamples == real
        torch.testing.assert_close(dense[1][param].hessians, dense[0][param].hessians, rtol=1e-4, atol=1e-6)


def test_reconstruction_losses_count_only_the_real_tokens():
    """L2's block reconstruction compares block outputs at the real tokens only: what the padded
    positions hold changes no loss it records, and its relative MSE is that of the real rows."""
    from l2fx.optim import relative_mse

    calib = llama_calib()
    recs = []
    for c in (calib, _repadded(calib, 4)):
        compiled = l2fx.compile(tiny_llama(), target_cr=8, calib=c, config=fast())
        recs.append(compiled.report.records["block_reconstruction"]["blocks"])
    assert len(recs[0]) == len(recs[1]) >= 2
    for a, b in zip(*recs):
        for key in ("loss_before", "loss_after_transform", "loss_after"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["name"], key)

    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    keep = torch.tensor([[True] * 5, [False, False, True, True, True]])
    want = (out - target)[keep].pow(2).mean() / 2.0
    assert float(relative_mse(out, target, 2.0, keep)) == pytest.approx(float(want))
    assert float(relative_mse(out, target, 2.0, torch.zeros(2, 5, dtype=torch.bool))) == 0.0  # all padding
    assert float(relative_mse(out, target, 2.0)) == pytest.approx(float((out - target).pow(2).mean() / 2.0))
