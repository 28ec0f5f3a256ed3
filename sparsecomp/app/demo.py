"""End-to-end demo: structured pruning of all-MiniLM-L6-v2 on CPU.

``run_demo`` loads the bundled sentence encoder (offline), captures it with
``torch.export``, compresses it with :class:`sparsecomp.StructuredPruning` at
several ratios (the global fraction of MACs removed, calibration-driven
allocation over heads and MLP neurons) and prints, per ratio, the physical
size, MACs, single-thread latency and the fidelity of the sentence embeddings
(mean cosine similarity to the dense model's embeddings over held-out
sentences), with least-squares reconstruction and, side by side, the same
pruning without it.

Run it with ``sparsecomp demo`` or ``python -m sparsecomp.app.demo``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .evaluate import embed, load_encoder
from .metrics import count_macs, count_params, markdown_table, measure_latencies
from .models import HELDOUT_SENTENCES, calibration_corpus, encode_batch, encoder_dynamic_shapes, length_batches

__all__ = ["DemoRow", "format_table", "run_demo"]

#: calibration sentences the demo uses by default (``None``: the whole packaged corpus, ~1200 sentences;
#: batches are length-bucketed, so the cost follows the real token count, ~16k tokens)
DEMO_CALIBRATION: int | None = None


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo table.

    Attributes
    ----------
    ratio : float
        Pruning ratio passed to ``StructuredPruning`` (``0.0`` is the dense
        captured model).
    params : int
        Stored weight elements (:func:`sparsecomp.app.metrics.count_params`).
    macs : int
        MACs of one batch-1 call (:func:`sparsecomp.app.metrics.count_macs`).
    latency_ms, latency_p10_ms, latency_p90_ms : float
        Median / p10 / p90 latency of one batch-1 call.
    speedup : float
        Dense median latency divided by this row's median latency.
    mac_reduction : float
        Dense MACs divided by this row's MACs.
    cosine : float
        Mean cosine similarity between this row's and the dense eager model's
        sentence embeddings over the evaluation sentences.
    min_cosine : float
        Smallest cosine similarity over those sentences.
    reconstruct : bool
        Whether the row's model was reconstructed (least-squares refit).
    baseline_speedup, baseline_cosine : float or None
        The same selection without reconstruction (``None`` when not measured).
    ort_ms, tvm_ms : float or None
        Median latency of the same model lowered to ONNX Runtime / TVM (``sparsecomp.lower``), timed
        interleaved with the torch models; ``None`` when that backend is not installed or not asked for.
    """

    ratio: float
    params: int
    macs: int
    latency_ms: float
    latency_p10_ms: float
    latency_p90_ms: float
    speedup: float
    mac_reduction: float
    cosine: float
    min_cosine: float
    reconstruct: bool = False
    baseline_speedup: float | None = None
    baseline_cosine: float | None = None
    ort_ms: float | None = None
    tvm_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the row as a plain JSON-serialisable dict."""
        return asdict(self)


def _progress(enabled: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return say


def _capture(sparsecomp: Any, encoder: nn.Module, hf_model: nn.Module, tokenizer: Any,
             example: tuple[torch.Tensor, torch.Tensor], sentences: Sequence[str], seq_len: int,
             say: Callable[[str], None]) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], bool]:
    """Capture ``encoder`` with a dynamic sequence dim and return it with length-bucketed calibration batches.

    The example is batch 2 at ``seq_len`` tokens (export specialises size-1 dims); MAC budgets are therefore
    counted at ``seq_len`` tokens, where latency is measured. Calibration batches are padded only to their
    longest sentence, so calibration costs the real token count. If export refuses a dynamic sequence length
    (some encoders), the graph is captured with a static length and calibration is padded to ``seq_len``
    (masked, same statistics, slower). The flag is whether the capture has a dynamic sequence length.
    """
    from ..errors import CaptureError

    max_pos = getattr(getattr(hf_model, "config", None), "max_position_embeddings", None)
    max_seq = max(seq_len, max_pos) if isinstance(max_pos, int) else seq_len
    pair = (example[0].repeat(2, 1), example[1].repeat(2, 1))
    try:
        captured = sparsecomp.capture(encoder, pair, dynamic_shapes=encoder_dynamic_shapes(max_seq=max_seq))
    except CaptureError as exc:
        say(f"dynamic sequence length refused ({str(exc).splitlines()[0]}); calibrating padded to {seq_len}")
        ids, mask = encode_batch(tokenizer, sentences, seq_len=seq_len)
        return sparsecomp.capture(encoder, example), [(ids[i : i + 32], mask[i : i + 32])
                                                      for i in range(0, len(ids), 32)], False
    return captured, length_batches(tokenizer, sentences, batch_size=32, max_len=seq_len), True


def format_table(rows: Sequence[DemoRow], threads: int = 1, seq_len: int = 128) -> str:
    """Render demo rows as a markdown table.

    Parameters
    ----------
    rows : sequence of DemoRow
        Rows from :func:`run_demo`.
    threads : int, default 1
        Thread count, shown in the latency header.
    seq_len : int, default 128
        Sequence length, shown in the latency header.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    thread_word = "thread" if threads == 1 else "threads"
    header = [
        "ratio",
        "params (M)",
        "MACs (G)",
        f"latency ms (torch, {threads} {thread_word}, batch 1, seq {seq_len})",
        "speedup vs dense",
        "MAC reduction",
        "cosine",
        "without reconstruction: speedup / cosine",
    ]
    backend_cols = [(name, attr) for name, attr in (("ORT", "ort_ms"), ("TVM", "tvm_ms"))
                    if any(getattr(r, attr) is not None for r in rows)]
    dense = next((r for r in rows if r.ratio == 0.0), None)
    header[5:5] = [f"{name} ms (speedup)" for name, _ in backend_cols]

    def backend_cell(r: DemoRow, attr: str) -> str:
        ms, base = getattr(r, attr), getattr(dense, attr) if dense is not None else None
        if ms is None:
            return "-"
        return f"{ms:.2f} ({base / ms:.2f}x)" if base else f"{ms:.2f}"
    body = [
        [
            f"{r.ratio:.2f}",
            f"{r.params / 1e6:.2f}",
            f"{r.macs / 1e9:.3f}",
            f"{r.latency_ms:.2f} (p10 {r.latency_p10_ms:.2f}, p90 {r.latency_p90_ms:.2f})",
            f"{r.speedup:.2f}x",
            *[backend_cell(r, attr) for _, attr in backend_cols],
            f"{r.mac_reduction:.2f}x",
            f"{r.cosine:.4f}",
            "-" if r.baseline_cosine is None else f"{r.baseline_speedup:.2f}x / {r.baseline_cosine:.4f}",
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def run_demo(
    ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    seq_len: int = 128,
    threads: int = 1,
    out: Callable[[str], Any] | None = print,
    *,
    criterion: str = "fluctuation",
    eval_sentences: Sequence[str] | None = None,
    calibration_sentences: Sequence[str] | None = None,
    rounds: int = 3,
    min_time: float = 0.5,
    progress: bool = True,
    loader: Callable[[], tuple[nn.Module, Any]] | None = None,
    reconstruct: bool = True,
    compare: bool = True,
    backends: Sequence[str] = ("ort", "tvm"),
) -> list[DemoRow]:
    """Compress all-MiniLM-L6-v2 at several pruning ratios and report the trade-off.

    For each ratio the encoder is captured and compressed with
    ``sparsecomp.compress(encoder, (input_ids, attention_mask),
    StructuredPruning(mac_ratio=r, criterion=criterion, allocation="sensitivity",
    reconstruct="all", residual=True, round_to=16))`` using a batch-1,
    ``seq_len``-token example: ``r`` is the fraction of the model's MACs
    removed, allocated across heads and MLP neurons by calibrated sensitivity,
    and every linear is then refit by least squares on the calibration data.
    With ``compare`` the same selection without reconstruction is measured too
    (``baseline_*`` fields, last table column). The dense baseline (ratio ``0.0``) is the
    *captured* dense graph, so dense and pruned models run through the same
    execution path and the speedup reflects only the smaller weights.
    Latencies are measured interleaved (see
    :func:`sparsecomp.app.metrics.measure_latencies`) with ``threads`` intra-op
    threads. Fidelity is the cosine similarity between each model's sentence
    embeddings (mean pooling + L2 normalisation) and the dense eager model's,
    over ``eval_sentences`` (by default the held-out sentences, which are never
    used for calibration). Data-aware criteria (``"activation"``,
    ``"taylor"``) are calibrated on ``calibration_sentences``.

    Parameters
    ----------
    ratios : sequence of float, default (0.0, 0.25, 0.5, 0.75)
        Global fractions of MACs to remove; ``0.0`` is the dense row. The dense model is
        always measured (as the reference) even if ``0.0`` is not listed.
    seq_len : int, default 128
        Tokens per input (padding to this length).
    threads : int, default 1
        Intra-op threads for the latency measurement.
    out : callable or None, default print
        Called with each line of the final table; ``None`` prints nothing.
    criterion : str, default "fluctuation"
        Criterion passed to ``StructuredPruning`` (one of ``"activation"``,
        ``"fluctuation"``, ``"reconstruction"``; others fall back to a uniform
        ratio per group without reconstruction).
    eval_sentences : sequence of str, optional
        Fidelity sentences; defaults to :data:`sparsecomp.app.models.HELDOUT_SENTENCES`.
    calibration_sentences : sequence of str, optional
        Calibration sentences; defaults to :func:`sparsecomp.app.models.calibration_corpus`
        (~300 sentences). The model is captured with a dynamic sequence length and
        calibrated on length-bucketed batches (:func:`sparsecomp.app.models.length_batches`),
        so calibration costs the real token count, not ``seq_len`` per sentence.
    rounds : int, default 3
        Interleaved latency rounds.
    min_time : float, default 0.5
        Minimum timed seconds per model and round.
    progress : bool, default True
        Print progress to stderr.
    loader : callable, optional
        Returns ``(hf_model, tokenizer)``; defaults to
        :func:`sparsecomp.app.models.load_minilm`. Tests pass a tiny model here.
    reconstruct : bool, default True
        Refit the pruned model by least squares (the reported rows).
    compare : bool, default True
        Also compress without reconstruction and report it alongside.
    backends : sequence of str, default ("ort", "tvm")
        Also lower every reported model with ``sparsecomp.lower(model, example, backend=b,
        num_threads=threads)`` and time it interleaved with the torch models. A backend whose optional
        dependency is missing is skipped with a note (install ``sparsecomp[onnx]`` / ``sparsecomp[tvm]``).

    Returns
    -------
    list of DemoRow
        One row per entry of ``ratios``, in order.
    """
    import sparsecomp  # the core API; imported lazily so that this module imports cheaply

    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("run_demo needs at least one ratio")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"pruning ratios must be in [0, 1), got {r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eval_sentences = list(HELDOUT_SENTENCES if eval_sentences is None else eval_sentences)
    calibration_sentences = list(
        calibration_corpus()[:DEMO_CALIBRATION] if calibration_sentences is None else calibration_sentences
    )
    if not eval_sentences:
        raise ValueError("run_demo needs at least one evaluation sentence")
    if not calibration_sentences:
        raise ValueError("run_demo needs at least one calibration sentence")
    def make_config(r: float, rec: bool) -> Any:
        if criterion not in ("activation", "fluctuation", "reconstruction"):
            return sparsecomp.StructuredPruning(ratio=r, criterion=criterion)
        return sparsecomp.StructuredPruning(mac_ratio=r, criterion=criterion, allocation="sensitivity",
                                            reconstruct="all" if rec else False, residual=rec, round_to=16)

    variants = [reconstruct] + ([not reconstruct] if compare and reconstruct else [])
    configs = {(r, rec): make_config(r, rec) for r in ratios if r > 0 for rec in variants}

    say = _progress(progress)
    pruned_ratios = list(configs)
    steps = 3 + len(pruned_ratios) + len(backends)
    step = 0

    def stage(message: str) -> None:
        nonlocal step
        step += 1
        say(f"[{step}/{steps}] {message}")

    stage("loading all-MiniLM-L6-v2 (offline)" if loader is None else "loading model")
    enc = load_encoder(loader)
    encoder, tokenizer, hf_model = enc.model, enc.tokenizer, enc.model.model
    example = encode_batch(tokenizer, calibration_sentences[0], seq_len=seq_len)

    stage("capturing the dense model with torch.export (dynamic batch and sequence length)")
    captured, calibration, dynamic = _capture(sparsecomp, encoder, hf_model, tokenizer, example,
                                              calibration_sentences, seq_len, say)
    # fidelity inputs padded only to the longest evaluation sentence when the graphs accept any length
    # (masked mean pooling: the same embeddings as at seq_len, at a fraction of the cost)
    longest = max(len(t) for t in tokenizer(eval_sentences, truncation=True, max_length=seq_len)["input_ids"])
    fid_ids, fid_mask = encode_batch(tokenizer, eval_sentences, seq_len=max(2, longest) if dynamic else seq_len)
    reference = embed(encoder, fid_ids, fid_mask, desc="dense eager embeddings", progress=progress)
    models: dict[Any, nn.Module] = {(0.0, reconstruct): captured.module}

    for key in pruned_ratios:
        config = configs[key]
        r, rec = key
        stage(f"compressing {r:g} of the MACs away ({criterion}, "
              f"{'with' if rec else 'without'} reconstruction)")
        needs_data = bool(getattr(config, "needs_calibration", False))
        models[key] = sparsecomp.compress(
            captured, example, config, calibration=calibration if needs_data else None
        )

    timed: dict[str, Any] = {str(k): m for k, m in models.items()}
    reported = [(r, (r, reconstruct) if r > 0 else (0.0, reconstruct)) for r in ratios]
    for backend in backends:
        stage(f"lowering the reported models to {backend}")
        try:
            for _, key in reported:
                # lowered at the timed shape (batch 1, seq_len): the torch graphs keep their dynamic dims
                fixed = sparsecomp.capture(models[key], example, dynamic_batch=False, dynamic_dims=False)
                timed[f"{backend}:{key}"] = sparsecomp.lower(fixed, backend=backend, num_threads=threads)
        except sparsecomp.MissingDependencyError as exc:
            say(f"skipping the {backend} column: {exc}")
            for k in [k for k in timed if k.startswith(f"{backend}:")]:
                del timed[k]

    stage(f"measuring latency ({threads} thread(s), batch 1, seq {seq_len}) and fidelity")
    latencies = measure_latencies(
        timed,
        example,
        threads=threads,
        rounds=rounds,
        min_time=min_time,
    )
    dense_key = (0.0, reconstruct)
    dense_macs = count_macs(models[dense_key], example)
    dense_ms = latencies[str(dense_key)].median_ms

    def fidelity(key: Any) -> torch.Tensor:
        embeddings = embed(models[key], fid_ids, fid_mask, desc=f"ratio {key[0]:g} embeddings", progress=progress)
        return (embeddings * reference).sum(dim=1)

    rows = []
    for r in ratios:
        key = (r, reconstruct) if r > 0 else dense_key
        module = models[key]
        cos = fidelity(key)
        base = (r, not reconstruct)
        base_cos = float(fidelity(base).mean()) if base in models else None
        base_speedup = dense_ms / latencies[str(base)].median_ms if base in models else None
        macs = count_macs(module, example)
        lat = latencies[str(key)]
        rows.append(
            DemoRow(
                ratio=r,
                params=count_params(module),
                macs=macs,
                latency_ms=lat.median_ms,
                latency_p10_ms=lat.p10_ms,
                latency_p90_ms=lat.p90_ms,
                speedup=dense_ms / lat.median_ms,
                mac_reduction=dense_macs / macs if macs else float("inf"),
                cosine=float(cos.mean()),
                min_cosine=float(cos.min()),
                reconstruct=reconstruct and r > 0,
                baseline_speedup=base_speedup,
                baseline_cosine=base_cos,
                ort_ms=latencies[f"ort:{key}"].median_ms if f"ort:{key}" in latencies else None,
                tvm_ms=latencies[f"tvm:{key}"].median_ms if f"tvm:{key}" in latencies else None,
            )
        )

    if out is not None:
        for line in format_table(rows, threads=threads, seq_len=seq_len).splitlines():
            out(line)
    return rows


if __name__ == "__main__":  # pragma: no cover - convenience entry point
    run_demo()
