"""Command-line interface: ``sparsecomp demo | inspect | compress``.

Examples
--------
::

    sparsecomp demo --ratios 0.25 0.5 --threads 1
    sparsecomp inspect mypkg.models:make_model
    sparsecomp inspect path/to/file.py:make
    sparsecomp compress path/to/file.py:make --ratio 0.5 -o small.pt2
    sparsecomp compress mypkg.models:make_model --recipe recipe.yaml -o small.pt2
    sparsecomp compress mypkg.models:make_model --speedup 2 --backend ort --calibration calib.pt -o out/

``MODULE:FUNCTION`` names a zero-argument function returning
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``;
``MODULE`` is a dotted module name importable from the current directory or a
path to a ``.py`` file.

Errors are reported as one line on stderr (``sparsecomp: error: ...``) with
exit status 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["CLIError", "load_factory", "main"]

EXIT_OK = 0
EXIT_ERROR = 2


class CLIError(Exception):
    """A user error detected by the command line (bad spec, bad arguments)."""


# ---------------------------------------------------------------------------
# MODULE:FUNCTION loading
# ---------------------------------------------------------------------------


def _import_file(path: Path) -> Any:
    """Import a ``.py`` file as a fresh module; its folder is importable while it loads."""
    name = f"_sparsecomp_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _import_target(target: str, spec: str) -> Any:
    looks_like_path = target.endswith(".py") or os.sep in target or "/" in target
    if looks_like_path:
        path = Path(target)
        if not path.is_file():
            raise CLIError(f"no such Python file: {target!r} (from {spec!r})")
        return _import_file(path)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise CLIError(
                f"cannot import module {target!r} from {spec!r}: no module named {exc.name!r}"
            ) from exc
        raise


def load_factory(spec: str) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """Resolve ``MODULE:FUNCTION``, call it and validate what it returns.

    Parameters
    ----------
    spec : str
        ``"pkg.mod:function"`` or ``"path/to/file.py:function"``.

    Returns
    -------
    model : nn.Module
    example_inputs : tuple
        Positional example inputs (a single tensor is wrapped in a tuple).
    example_kwargs : dict
        Keyword example inputs (empty if the function returned none).

    Raises
    ------
    CLIError
        If the spec is malformed, the module or function cannot be found, or
        the function returns something else than described above.
    """
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        raise CLIError(f"expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    module = _import_target(target, spec)
    factory = getattr(module, func_name, None)
    if factory is None:
        raise CLIError(f"{target!r} has no attribute {func_name!r} (from {spec!r})")
    if not callable(factory):
        raise CLIError(f"{spec!r} is not callable")
    result = factory()

    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise CLIError(
            f"{spec!r} must return (model, example_inputs) or "
            f"(model, example_inputs, example_kwargs), got {type(result).__name__}"
        )
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec!r} returned a model of type {type(model).__name__}, not an nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, list):
        args = tuple(args)
    if not isinstance(args, tuple):
        raise CLIError(
            f"{spec!r} returned example_inputs of type {type(args).__name__}; "
            "expected a tensor or a tuple of inputs"
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise CLIError(
            f"{spec!r} returned example_kwargs of type {type(kwargs).__name__}; expected a dict"
        )
    return model, args, dict(kwargs)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        ratios=tuple(ns.ratios),
        seq_len=ns.seq_len,
        threads=ns.threads,
        criterion=ns.criterion,
        progress=not ns.quiet,
        backends=tuple(ns.backends),
    )
    return EXIT_OK


def _cmd_calibrate(ns: argparse.Namespace) -> int:
    from ..backends.tvm import calibrate

    if ns.show:
        path = calibrate.plan_path()
        print(f"plan file: {path} ({'present' if path.exists() else 'none: the default plan is used'})")
        print(calibrate.plan_for())
        return EXIT_OK
    say = (lambda msg: None) if ns.quiet else (lambda msg: print(msg, flush=True))
    say("Timing the sparse kernels' software-prefetch variants on this CPU (batch 1, one thread, "
        "cold weights; about a minute)...")
    result = calibrate.calibrate(rounds=ns.rounds, cold_bytes=ns.cold_mib << 20, log=say)
    print(result.table())
    print(f"\nplan: {result.plan}\nsaved to {result.path}; every TVM lowering on this machine uses it")
    return EXIT_OK


def _cmd_inspect(ns: argparse.Namespace) -> int:
    import sparsecomp

    model, args, kwargs = load_factory(ns.spec)
    graph = sparsecomp.dependency_graph(model, args, kwargs or None)
    print(graph.summary())
    return EXIT_OK


def _recipe_configs(path: str) -> list[Any]:
    if not Path(path).is_file():
        raise CLIError(f"no such recipe file: {path!r}")
    from ..config import load_recipe

    configs = load_recipe(path)
    if not configs:
        raise CLIError(f"recipe {path!r} holds no configs")
    return configs


def _build_configs(ns: argparse.Namespace) -> list[Any]:
    import sparsecomp

    if ns.recipe is not None:
        given = [
            flag
            for flag, value in (
                ("--ratio", ns.ratio),
                ("--mac-ratio", ns.mac_ratio),
                ("--criterion", ns.criterion),
                ("--granularity", ns.granularity),
            )
            if value is not None
        ]
        if given:
            raise CLIError(f"--recipe cannot be combined with {', '.join(given)}")
        return _recipe_configs(ns.recipe)
    if ns.ratio is not None and ns.mac_ratio is not None:
        raise CLIError("give --ratio (fraction of each group) or --mac-ratio (fraction of the MACs), not both")
    options: dict[str, Any] = ({"mac_ratio": ns.mac_ratio} if ns.mac_ratio is not None
                               else {"ratio": 0.5 if ns.ratio is None else ns.ratio})
    if ns.criterion is not None:
        options["criterion"] = ns.criterion
    if ns.granularity is not None:
        options["granularity"] = ns.granularity
    return [sparsecomp.StructuredPruning(**options)]


def _fmt_count(n: int) -> str:
    for unit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.3f}{suffix} ({n:,})"
    return f"{n:,}"


def _export_for_saving(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.export.ExportedProgram, bool]:
    """Re-export ``module`` with ``torch.export.export`` for ``torch.export.save``.

    Dim 0 of every tensor input is marked as one shared dynamic batch dimension
    when the example batch is larger than 1 (``torch.export`` specialises a
    batch of 1); if the graph refuses that, it is exported with static shapes.

    Returns
    -------
    program : torch.export.ExportedProgram
    dynamic : bool
        Whether the batch dimension is dynamic.
    """
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    batchable = (
        bool(leaves)
        and all(t.dim() > 0 for t in leaves)
        and len({t.shape[0] for t in leaves}) == 1
        and leaves[0].shape[0] > 1
    )
    with torch.no_grad():
        if batchable:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            shapes = torch.export.ShapesCollection()
            for t in leaves:
                shapes[t] = {0: batch}
            try:
                return torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False), True
            except Exception:  # noqa: BLE001 - torch.export raises many types; static export below
                pass
        return torch.export.export(module, args, kwargs, strict=False), False


def load_calibration(path: str, spec: str) -> Any:
    """Calibration data from ``--calibration FILE``.

    ``*.pt`` / ``*.pth``: ``torch.load`` of a tensor, a tuple of tensors, a dict of keyword tensors or a
    list of such batches. Any other file is text, one sentence per line: the spec's module must define
    ``calibration_batches(lines: list[str])`` returning batches (e.g. tokenizer outputs) in that form.
    """
    if not Path(path).is_file():
        raise CLIError(f"no such calibration file: {path!r}")
    if path.endswith((".pt", ".pth")):
        return torch.load(path, weights_only=True)
    with open(path, encoding="utf-8") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    if not lines:
        raise CLIError(f"calibration file {path!r} holds no sentences")
    module = _import_target(spec.rpartition(":")[0], spec)
    encode = getattr(module, "calibration_batches", None)
    if not callable(encode):
        raise CLIError(f"a text calibration file needs {spec.rpartition(':')[0]}.calibration_batches(lines) "
                       "to turn sentences into model inputs (or pass a .pt file of tensors)")
    return encode(lines)


def _cmd_compress(ns: argparse.Namespace) -> int:
    import sparsecomp

    from .metrics import count_macs, count_params

    if ns.importance is not None:
        raise CLIError("--importance was renamed to --criterion")
    if ns.speedup is not None:
        return _cmd_compress_target(ns)
    configs = _build_configs(ns)
    model, args, kwargs = load_factory(ns.spec)
    calibration = None if ns.calibration is None else load_calibration(ns.calibration, ns.spec)
    model.eval()
    if ns.output is not None and os.path.isdir(ns.output):
        raise CLIError(f"output path {ns.output!r} is a directory")

    params_before = count_params(model)
    macs_before = count_macs(model, args, kwargs)
    config: Any = configs[0] if len(configs) == 1 else configs
    for c in configs:
        print(f"config: {c.to_json() if hasattr(c, 'to_json') else c}")
    compressed = sparsecomp.compress(model, args, config, calibration=calibration, example_kwargs=kwargs or None)
    err = compressed.sparsecomp_report[-1].get("output_error")
    if err is not None:
        on = "the calibration data" if calibration is not None else "the example inputs"
        print(f"output error: {err:.4g} (relative L2 on {on})")
    params_after = count_params(compressed)
    macs_after = count_macs(compressed, args, kwargs)

    print(
        f"params: {_fmt_count(params_before)} -> {_fmt_count(params_after)}"
        f"  ({params_before / max(params_after, 1):.2f}x smaller)"
    )
    print(
        f"MACs:   {_fmt_count(macs_before)} -> {_fmt_count(macs_after)}"
        f"  ({macs_before / max(macs_after, 1):.2f}x fewer)"
    )
    if ns.report:
        sparsecomp.report(compressed)
    if ns.output is not None:
        program, dynamic = _export_for_saving(compressed, args, kwargs)
        out_dir = os.path.dirname(os.path.abspath(ns.output))
        os.makedirs(out_dir, exist_ok=True)
        torch.export.save(program, ns.output)
        shapes = "dynamic batch" if dynamic else "static shapes: example input shapes only"
        print(f"saved: {ns.output} ({shapes}; load with torch.export.load(path).module())")
    return EXIT_OK


def _cmd_compress_target(ns: argparse.Namespace) -> int:
    """``compress --speedup S --backend B``: :func:`sparsecomp.compress_to_target`, then the artefact
    (the lowered model: an ORT / TVM directory, or a torch.export ``.pt2``), ``report.json``,
    ``points.md`` (explored points and per-layer choices) and ``target.png`` in the output directory."""
    import sparsecomp
    from ..target.latency import at_batch

    given = [flag for flag, value in (("--ratio", ns.ratio), ("--mac-ratio", ns.mac_ratio), ("--recipe", ns.recipe))
             if value is not None]
    if given:
        raise CLIError(f"--speedup searches the pruning itself; it cannot be combined with {', '.join(given)}")
    if ns.output is None:
        raise CLIError("--speedup needs -o OUT (a directory for the model, the report and the plot)")
    if os.path.isfile(ns.output):
        raise CLIError(f"output path {ns.output!r} is a file; --speedup writes a directory")
    target = sparsecomp.Target(speedup=ns.speedup, backend=ns.backend, batch=ns.batch, threads=ns.threads,
                               max_tries=ns.max_tries, round_to="auto" if ns.round_to is None else ns.round_to)
    model, args, kwargs = load_factory(ns.spec)
    if kwargs:
        raise CLIError("--speedup times positional inputs only; make the factory return every input positionally")
    calibration = None if ns.calibration is None else load_calibration(ns.calibration, ns.spec)
    recover = None
    if ns.recover is not None:
        if calibration is None:
            raise CLIError("--recover needs --calibration FILE: the dense model labels that data for the distillation")
        recover = sparsecomp.Recover(budget_s=ns.recover, progress=not ns.quiet)
    template = None
    if ns.criterion is not None or ns.granularity is not None:
        options: dict[str, Any] = {"mac_ratio": 0.1}
        if ns.criterion is not None:
            options["criterion"] = ns.criterion
        if ns.granularity is not None:
            options["granularity"] = ns.granularity
        template = sparsecomp.StructuredPruning(**options)
    print(f"target: {target.to_json()}")
    result = sparsecomp.compress_to_target(model.eval(), args, target, calibration=calibration, template=template,
                                           progress=not ns.quiet, recover=recover)
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    inputs = at_batch(tuple(args), ns.batch)
    if ns.backend == "torch":
        program, dynamic = _export_for_saving(result.module, args, {})
        artefact = out / "model.pt2"
        torch.export.save(program, str(artefact))
        how = f"torch.export program ({'dynamic batch' if dynamic else 'static shapes'}); torch.export.load(path).module()"
    else:
        lowered = sparsecomp.lower(result.module, inputs, backend=ns.backend, num_threads=ns.threads)
        artefact = out / "model"
        if artefact.exists():
            import shutil

            shutil.rmtree(artefact)
        lowered.save(str(artefact))
        how = f"{ns.backend} runner; sparsecomp.load(path)"
    result.save_report(out / "report.json")
    (out / "points.md").write_text(result.table() + "\n\n" + result.layer_table() + "\n")
    result.plot(out / "target.png")
    c = result.chosen
    print(result.table())
    print(f"chosen: mac_ratio {c.mac_ratio:.3f}: measured {c.speedup:.2f}x (re-measured {c.remeasured_speedup:.2f}x) "
          f"on {ns.backend}, target {ns.speedup:g}x met; output error {c.output_error}")
    if "recover" in result.report:
        r = result.report["recover"]
        print(f"recovery ({r['seconds']:.0f} s): validation loss {r['val_loss_before']:.4g} -> {r['val_loss_after']:.4g}, "
              f"measured {r['measured_speedup']:.2f}x, {'kept' if r['kept'] else 'not kept (the search result is saved)'}")
    for note in result.report["notes"]:
        print(f"note: {note}")
    print(f"saved: {artefact} ({how}), {out / 'report.json'}, {out / 'points.md'}, {out / 'target.png'}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``sparsecomp`` command."""
    parser = argparse.ArgumentParser(
        prog="sparsecomp",
        description="Structured pruning that makes PyTorch models physically smaller and faster.",
    )
    debug_help = "show the full traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="prune all-MiniLM-L6-v2 at several ratios and report size, speed and fidelity",
        description="Compress the bundled all-MiniLM-L6-v2 sentence encoder (offline) at several "
        "pruning ratios and print params, MACs, latency and embedding cosine similarity.",
    )
    demo.add_argument(
        "--ratios", type=_ratio, nargs="+", default=[0.0, 0.25, 0.5, 0.75], metavar="R",
        help="pruning ratios (default: 0 0.25 0.5 0.75)",
    )
    demo.add_argument("--threads", type=_positive_int, default=1, help="intra-op threads (default 1)")
    demo.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per input (default 128)")
    demo.add_argument("--criterion", default="fluctuation",
                      help="ranking criterion (default fluctuation, calibrated on the packaged corpus)")
    demo.add_argument("--backends", nargs="*", choices=["ort", "tvm"], default=["ort", "tvm"],
                      help="also time each model lowered to these backends (default: ort tvm; none: torch only)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=_cmd_demo)

    cal = sub.add_parser(
        "calibrate",
        parents=[common],
        help="measure the TVM sparse kernels' prefetch variants on this CPU and keep the fastest",
        description="Time each software-prefetch variant of the batch-1 sparse kernels (BSR, CSR, "
        "N:M) on cold weights on this machine and save the fastest per kernel walk in the cache "
        "($SPARSECOMP_CACHE_DIR, else ~/.cache/sparsecomp); later TVM lowerings use it.",
    )
    cal.add_argument("--show", action="store_true", help="print the plan in use and where it is kept; measure nothing")
    cal.add_argument("--rounds", type=_positive_int, default=9, help="interleaved timing rounds (default 9)")
    cal.add_argument("--cold-mib", type=_positive_int, default=256,
                     help="MiB of weight copies cycled so that each call reads DRAM (default 256)")
    cal.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    cal.set_defaults(func=_cmd_calibrate)

    spec_help = "MODULE:FUNCTION or FILE.py:FUNCTION returning (model, example_inputs[, example_kwargs])"
    inspect = sub.add_parser(
        "inspect",
        parents=[common],
        help="print the pruning dependency groups of a model",
        description="Capture a model and print its dependency graph summary.",
    )
    inspect.add_argument("spec", metavar="MODULE:FUNCTION", help=spec_help)
    inspect.set_defaults(func=_cmd_inspect)

    compress = sub.add_parser(
        "compress",
        parents=[common],
        help="compress a model and save it as a torch.export program (.pt2)",
        description="Compress a model with StructuredPruning (or a recipe file), report params and "
        "MACs before/after, and save the result with torch.export.save.",
    )
    compress.add_argument("spec", metavar="MODULE:FUNCTION", help=spec_help)
    compress.add_argument("--ratio", type=_ratio, default=None,
                          help="fraction of each group's units to remove (default 0.5)")
    compress.add_argument("--mac-ratio", type=_ratio, default=None,
                          help="fraction of the model's MACs to remove (instead of --ratio)")
    compress.add_argument("--criterion", default=None,
                          help="ranking criterion (default auto: the calibrated recipe with --calibration, "
                               "else l2 weight norms)")
    compress.add_argument("--importance", default=None, help=argparse.SUPPRESS)  # renamed: refused
    compress.add_argument("--calibration", default=None, metavar="FILE",
                          help="calibration data: a .pt file of tensors (a batch or a list of batches), or a "
                               "text file, one sentence per line, encoded by the spec module's "
                               "calibration_batches(lines)")
    compress.add_argument("--granularity", default=None, help="pruning granularity (default auto)")
    compress.add_argument(
        "--recipe", default=None, metavar="FILE",
        help="JSON or YAML recipe (a config, a list of configs, or {passes: [...]})",
    )
    compress.add_argument("-o", "--output", default=None, metavar="OUT.pt2",
                          help="where to save (with --speedup: a directory)")
    compress.add_argument("--speedup", type=float, default=None, metavar="S",
                          help="search the pruning for this measured speedup over the dense model on --backend "
                               "(sparsecomp.compress_to_target); writes the lowered model, report.json, points.md "
                               "and target.png into -o")
    compress.add_argument("--backend", choices=["torch", "ort", "tvm"], default="torch",
                          help="with --speedup: where the speedup is measured and the artefact runs (default torch)")
    compress.add_argument("--batch", type=_positive_int, default=1, help="with --speedup: batch size timed (default 1)")
    compress.add_argument("--threads", type=_positive_int, default=1,
                          help="with --speedup: intra-op threads timed (default 1)")
    compress.add_argument("--max-tries", type=_positive_int, default=4,
                          help="with --speedup: compressions the search may run (default 4)")
    compress.add_argument("--round-to", type=_positive_int, default=None,
                          help="with --speedup: channel multiple (default: measured for the backend)")
    compress.add_argument("--recover", type=_positive_float, default=None, metavar="SECONDS",
                          help="with --speedup and --calibration: distil the chosen model from the dense one for "
                               "this many seconds (sparsecomp.Recover(budget_s=SECONDS)), kept if it still meets "
                               "the target and is not worse on held-out calibration data")
    compress.add_argument("-q", "--quiet", action="store_true", help="with --speedup: no progress output")
    compress.add_argument("--report", action="store_true",
                          help="print the per-pass, per-layer report (sparsecomp.report)")
    compress.set_defaults(func=_cmd_compress)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 500:
        text = text[:497] + "..."
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sparsecomp`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 2 on a user or library error (argparse
        usage errors also exit with 2).
    """
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_ERROR
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except KeyboardInterrupt:
        print("sparsecomp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if ns.debug:
            traceback.print_exc()
        else:
            kind = "error" if isinstance(exc, CLIError) else f"error ({type(exc).__name__})"
            print(f"sparsecomp: {kind}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
