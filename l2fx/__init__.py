"""l2fx: lossy + lossless post-training model size compression (the L2 method) as an fx compiler.

    compiled = l2fx.compile(model, target_cr=12, calib=batches)
    l2fx.save(compiled, "model.l2fx")
    restored = l2fx.load("model.l2fx", model=MyArchitecture())
    mine = l2fx.load_into("model.l2fx", MyArchitecture())   # the caller's own class, weights decoding
    print(l2fx.inspect("model.l2fx").table())
"""
from __future__ import annotations

from l2fx.api import CompiledModel, compile, inspect, load, load_into, lower, materialize, save
from l2fx.method import Method, methods, register_method
from l2fx.config import (BackendConfig, CodingConfig, CompileConfig, Granularity, LayerRule, PlainDtype,
                         ReconstructionConfig, SensitivityConfig)
from l2fx.errors import L2fxError
from l2fx.pipeline import DumpIR, L2fxPass, PassContext, PassManager, PassResult, PeakMemory, Progress, Timing
from l2fx.report import CompressionReport
from l2fx.transform import TransformKind
from l2fx import smol  # noqa: E402  (l2fx.smol.train: training-aware SMOL, on top of compile)

__version__ = "0.1.0"
__all__ = [
    "compile", "save", "load", "load_into", "materialize", "inspect", "lower", "CompiledModel", "methods", "register_method", "Method", "CompressionReport", "L2fxError", "CompileConfig",
    "SensitivityConfig", "ReconstructionConfig", "LayerRule", "CodingConfig", "BackendConfig", "Granularity", "PlainDtype", "TransformKind", "L2fxPass",
    "PassResult", "PassContext", "PassManager", "Timing", "DumpIR", "PeakMemory", "Progress", "__version__",
]
