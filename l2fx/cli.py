"""Command line: ``l2fx compress``, ``l2fx inspect``, ``l2fx methods``, ``l2fx models``.

    l2fx compress efficientnet-lite0 --target-cr 12 -o lite0.l2fx
    l2fx compress mypkg.models:build --calib mypkg.data:calib --target-cr 10 -o m.l2fx
    l2fx compress fmnist-resnet --target-cr 15 --set reconstruction.distill_iters=200 --set seed=3
    l2fx compress fmnist-resnet --target-cr 12 --method l2
    l2fx inspect lite0.l2fx
    l2fx methods
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from l2fx import analyze, api, calibration, zoo
from l2fx.config import CompileConfig, LayerRule, ReconstructionConfig
from l2fx.errors import ConfigError, L2fxError
from l2fx.method import methods
from l2fx.pipeline import Progress
from l2fx.transform import TransformKind


class CLIError(L2fxError):
    """A command-line argument names something that does not exist or cannot be used."""


def _import_callable(spec: str) -> Callable[..., Any]:
    if ":" not in spec:
        raise CLIError(f"{spec!r} is neither a registered model nor a 'module:function' reference")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CLIError(f"{module_name!r} has no callable {attr!r}")
    return fn


def _resolve(model_spec: str, calib_spec: str | None, num_calib: int, batch_size: int, seed: int):
    """(model, calib batches, zoo entry or None) for a registry name or a module:function."""
    if model_spec in zoo.names():
        entry = zoo.get(model_spec)
        model = entry.build()
        calib = _import_callable(calib_spec)() if calib_spec else entry.calib(num_calib, batch_size, seed)
        return model, calib, entry
    model = _import_callable(model_spec)()
    if calib_spec is None:
        raise CLIError("a model given as module:function needs --calib module:function returning calibration batches")
    return model, _import_callable(calib_spec)(), None


def apply_settings(config: Any, settings: list[str]) -> Any:
    """``config`` with ``KEY=VALUE`` settings applied: KEY a dotted path of config fields
    (``reconstruction.weight_iters``), VALUE JSON (``200``, ``true``, ``[0.5, 1.0]``) or a bare
    string (``joint``). Unknown keys and invalid values raise :class:`CLIError`."""
    data = config.to_dict()
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = data, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or type(config).__name__
                known = sorted(node) if isinstance(node, dict) else []
                raise CLIError(f"--set {key}: {where} has no field {part!r} (fields: {', '.join(known)})")
            if i < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = value
    try:
        return type(config).from_dict(data)
    except ConfigError as exc:
        raise CLIError(f"--set: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--set: invalid value: {exc}") from exc


def parse_layer_rule(text: str) -> LayerRule:
    """``--layer 'PATTERN [keep] [bits=8] [kind=linear] [granularity=per_group] [group_size=64]'``:
    a :class:`LayerRule`; values are JSON or bare strings. Bad fields raise :class:`CLIError`."""
    pattern, *fields = text.split()
    if not fields:
        raise CLIError(f"--layer {text!r}: give the pattern, then keep or KEY=VALUE fields (e.g. 'lm_head bits=8')")
    data: dict[str, Any] = {"pattern": pattern}
    for item in fields:
        key, sep, raw = item.partition("=")
        if not sep:
            data[key] = True
            continue
        try:
            data[key] = json.loads(raw)
        except json.JSONDecodeError:
            data[key] = raw
    try:
        return LayerRule.from_dict(data)
    except ConfigError as exc:
        raise CLIError(f"--layer {text!r}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--layer {text!r}: invalid value: {exc}") from exc


def cmd_compress(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, calib, entry = _resolve(args.model, args.calib, args.num_calib, args.batch_size, args.seed)
    if args.calib_source != "real":
        generated = args.num_generated or args.num_calib
        if not args.quiet:
            print(f"calibration source {args.calib_source}: {generated} generated samples", file=sys.stderr)
        calib = calibration.calibration_source(args.calib_source, model, calib, None, generated, args.seed,
                                               batch_size=args.batch_size)
    config = CompileConfig(target_cr=args.target_cr, method=args.method, transform=TransformKind(args.transform),
                           seed=args.seed, reconstruction=ReconstructionConfig(enabled=not args.no_reconstruction))
    config = apply_settings(config, args.set)
    if args.layer:
        config = config.replace(layers=config.layers + tuple(parse_layer_rule(r) for r in args.layer))
    compiled = api.compile(model, target_cr=config.target_cr, calib=calib, config=config,
                           instruments=[] if args.quiet else [Progress()], verify=args.verify)
    out = Path(args.output or f"{args.model.replace(':', '_').replace('.', '_')}-cr{config.target_cr:g}.l2fx")
    nbytes = api.save(compiled, out)
    print(compiled.report.table())
    print(f"wrote {out} ({nbytes:,} bytes) in {time.perf_counter() - t0:.1f} s")
    if entry is not None and not args.no_eval:
        metrics = entry.evaluate(compiled, reference=model)
        print("evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.report_json:
        Path(args.report_json).write_text(compiled.report.to_json())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    report = api.inspect(args.artifact)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report.table())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name, description in methods().items():
        print(f"{name:<20} {description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name in zoo.names():
        print(f"{name:<20} {zoo.get(name).description}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """``l2fx analyze MODEL``: S, Q, S->Q, Q->S per pattern x format (:func:`l2fx.analyze.interplay`);
    prints the tables, writes ``interplay.json``, ``interplay.md`` and the two plots into ``-o``."""
    t0 = time.perf_counter()
    model, calib, entry = _resolve(args.model, args.calib, args.num_calib, args.batch_size, args.seed)
    if args.eval and entry is None:
        raise CLIError("--eval needs a registered model (its evaluation data); a module:function model has none")
    evaluate = (lambda m: entry.evaluate(m, reference=model)) if args.eval else None
    report = analyze.interplay(model, calib, patterns=args.patterns, formats=args.formats, evaluate=evaluate,
                               max_layers=args.max_layers, on_unfit=args.on_unfit, name=args.model)
    print(report.table(layers=args.layers))
    out = Path(args.output or f"interplay_{args.model.replace(':', '_').replace('.', '_')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "interplay.json").write_text(report.to_json())
    (out / "interplay.md").write_text(report.table(layers=True) + "\n")
    plots = report.plot(out / "interplay")
    print(f"wrote {out / 'interplay.json'}, {out / 'interplay.md'}, {', '.join(str(p) for p in plots)} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l2fx", description="Post-training model size compression (L2) as an fx compiler")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a model to a target compression ratio")
    c.add_argument("model", help="a registered model (see `l2fx models`) or module:function returning an nn.Module")
    c.add_argument("--target-cr", type=float, default=12.0, help="target CR of the compressed weights (default 12)")
    c.add_argument("--calib", help="module:function returning calibration batches (default: the model's own)")
    c.add_argument("--num-calib", type=int, default=256, help="calibration samples for registered models")
    c.add_argument("--calib-source", default="real", choices=calibration.SOURCES,
                   help="build calibration inputs from the real ones (--calib or the model's own): synthetic "
                        "(BatchNorm-statistics synthesis; the real ones give only shape and value range), "
                        "+real (with them), +augment (strongly augmented views of them); see l2fx.calibration")
    c.add_argument("--num-generated", type=int, default=None,
                   help="synthetic / augmented samples each for --calib-source (default: --num-calib)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--method", default="l2", help="a registered method (see `l2fx methods`; default l2)")
    c.add_argument("--transform", default="joint", choices=["joint", "linear", "log", "exp", "prune"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-o", "--output", help="artifact path (default <model>-cr<target>.l2fx)")
    c.add_argument("--report-json", help="also write the report as JSON here")
    c.add_argument("--no-eval", action="store_true", help="skip evaluating the compressed model")
    c.add_argument("--no-reconstruction", action="store_true",
                   help="skip block reconstruction (faster; allocation and rounding only)")
    c.add_argument("--verify", action="store_true", help="run the IR verifier after every pass")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any CompileConfig field, e.g. reconstruction.distill_iters=200 (repeatable)")
    c.add_argument("--layer", action="append", default=[], metavar="'PATTERN FIELDS'",
                   help="a per-layer rule, first match wins: 'lm_head|conv1 bits=8', 'classifier keep', "
                        "'layers\\.0\\..* granularity=per_group group_size=64' (repeatable)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compress)
    i = sub.add_parser("inspect", help="per-layer report of an artifact")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    me = sub.add_parser("methods", help="list the registered compression methods")
    me.set_defaults(func=cmd_methods)
    a = sub.add_parser("analyze", help="sparsity x block-quantisation interplay: S, Q, S->Q, Q->S per layer and model")
    a.add_argument("model", help="a registered model (see `l2fx models`) or module:function returning an nn.Module")
    a.add_argument("--calib", help="module:function returning calibration batches (default: the model's own)")
    a.add_argument("--num-calib", type=int, default=128, help="calibration samples for registered models")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--patterns", nargs="+", default=["50%", "2:4"],
                   help="sparsity patterns: 50%%, 50%%/row, N:M (2:4, 4:8), BRxBC@50%% (1x4@50%%, 4x4@50%%)")
    a.add_argument("--formats", nargs="+", default=["mxfp8_e4m3", "mxfp4_e2m1"],
                   help="formats: mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1 mxint8 hbfp8 (= hbfp8_b64), "
                        "hbfpM_bK, int8_channel, int4_channel")
    a.add_argument("--max-layers", type=int, help="analyse only the first N layers in depth order")
    a.add_argument("--on-unfit", choices=["dense", "raise"], default="dense",
                   help="a pattern that does not divide a layer: leave it dense there (recorded) or fail")
    a.add_argument("--eval", action="store_true",
                   help="also run the registered model's evaluation on every compressed model (slow)")
    a.add_argument("--layers", action="store_true", help="print every layer row too")
    a.add_argument("-o", "--output", help="report directory (default interplay_<model>)")
    a.set_defaults(func=cmd_analyze)
    m = sub.add_parser("models", help="list the registered real models")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except L2fxError as exc:
        print(f"l2fx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
