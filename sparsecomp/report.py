"""``sparsecomp.report``: the per-pass, per-layer record of a compression as readable tables.

``sparsecomp.compress`` attaches ``result.sparsecomp_report``: a list with one dict per pass,
``{"pass": name, "config": cfg.to_dict(), "modified": bool, "layers": [row, ...]}``. Rows are plain dicts
whose keys depend on the pass (LowRank: rank, params; Sparsify: sparsity, format, MACs, bytes, error;
StructuredPruning: one row per pruned group). ``format_report`` renders any of them: known keys get a
fixed column order and formatting, unknown keys are appended as extra columns, so a new pass needs no
change here.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

# Column order and headers of the keys passes are known to emit; others follow in first-seen order.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "layer"),
    ("group", "group"),
    ("kind", "kind"),
    ("shape", "shape"),
    ("format", "format"),
    ("pattern", "pattern"),
    ("criterion", "criterion"),
    ("method", "method"),
    ("units", "units"),
    ("kept", "kept"),
    ("rank", "rank"),
    ("sparsity", "sparsity"),
    ("rows", "rows"),
    ("params_before", "params"),
    ("params_after", "params after"),
    ("macs_before", "MACs"),
    ("macs_after", "MACs after"),
    ("bytes_before", "bytes"),
    ("bytes_after", "bytes after"),
    ("relative_error", "rel. error"),
    ("params", "params"),
)
_HIDDEN = {"node", "reason", "skipped"}  # "node" is internal; reason/skipped go to the "note" column
_TEXT_KEYS = {"layer", "kind", "format", "pattern", "criterion", "method"}
_SUMMED = (("params", "params_before", "params_after"), ("MACs", "macs_before", "macs_after"),
           ("bytes", "bytes_before", "bytes_after"))


def _count(n: int) -> str:
    for unit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.2f}{suffix}"
    return str(n)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "shape" and isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if key == "relative_error":
            return f"{value:.3e}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return _count(value) if key.startswith(("params", "macs", "bytes")) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _note(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    return str(row.get("reason", ""))


def _table(header: Sequence[str], body: Sequence[Sequence[str]], text: Sequence[bool]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if t else c.rjust(w) for c, w, t in zip(cells, widths, text)) + " |"

    sep = "|" + "|".join("-" * (w + 2) if t else "-" * (w + 1) + ":" for w, t in zip(widths, text)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def format_layers(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown table of per-layer rows (any keys); a ``note`` column holds reasons and skips."""
    if not rows:
        return "(no layers)"
    present: list[str] = []
    for row in rows:
        for key in row:
            if key not in present and key not in _HIDDEN:
                present.append(key)
    known = [k for k, _ in _COLUMNS if k in present]
    keys = known + [k for k in present if k not in known]
    titles = dict(_COLUMNS)
    header = [titles.get(k, k) for k in keys]
    body = [[_cell(k, row.get(k)) for k in keys] for row in rows]
    text = [k in _TEXT_KEYS or any(not isinstance(r.get(k), (int, float, type(None))) for r in rows) for k in keys]
    if any(("skipped" in r) or ("reason" in r) for r in rows):
        header.append("note")
        body = [b + [_note(r)] for b, r in zip(body, rows)]
        text.append(True)
    return _table(header, body, text)


def _summary(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    formats: dict[str, int] = {}
    for r in rows:
        if "skipped" in r:
            formats["skipped"] = formats.get("skipped", 0) + 1
        elif "format" in r:
            formats[r["format"]] = formats.get(r["format"], 0) + 1
    if formats:
        parts.append("layers: " + ", ".join(f"{v} {k}" for k, v in formats.items()))
    for label, before, after in _SUMMED:
        done = [r for r in rows if before in r and after in r]
        if done:
            b = sum(int(r[before]) for r in done)
            a = sum(int(r[after]) for r in done)
            parts.append(f"{label} {_count(b)} -> {_count(a)}")
    return "; ".join(parts)


def format_report(reports: Iterable[dict[str, Any]]) -> str:
    """Render a ``sparsecomp_report`` list (one dict per pass) as text: a header and a table per pass."""
    out = []
    for i, rep in enumerate(reports, 1):
        if not isinstance(rep, dict):
            raise TypeError(f"report entry {i} must be a dict, got {type(rep).__name__}")
        name = rep.get("pass", "?")
        state = "modified" if rep.get("modified") else "unchanged"
        config = rep.get("config")
        out.append(f"## {i}. {name} ({state})")
        if config is not None:
            out.append(f"config: {json.dumps(config, sort_keys=True)}")
        resolved = rep.get("resolved")
        if resolved is not None and resolved != config:
            changed = {k: v for k, v in resolved.items() if config is None or config.get(k) != v}
            out.append(f"resolved ({'with' if rep.get('calibration') == 'given' else 'without'} calibration "
                       f"data): {json.dumps(changed, sort_keys=True)}")
        if rep.get("output_error") is not None:
            out.append(f"output error: {rep['output_error']:.4g} (relative L2 vs the original, on "
                       f"{'calibration data' if rep.get('calibration') == 'given' else 'the example inputs'})")
        for key, label in (("unknown_ops", "ops without a rule (their dims were fixed)"),
                           ("criterion_swaps", "criterion swaps"), ("over_memory_budget", "no statistics "
                           "(over memory_budget)"), ("refit_over_memory_budget", "not refit (over memory_budget)"),
                           ("capture", "capture")):
            if rep.get(key):
                out.append(f"{label}: {json.dumps(rep[key], sort_keys=True, default=str)}")
        rows = list(rep.get("layers", []))
        summary = _summary(rows)
        if summary:
            out.append(summary)
        out.append("")
        out.append(format_layers(rows))
        out.append("")
    return "\n".join(out).rstrip() + "\n" if out else "(no passes)\n"


def report(compressed: Any, *, show: bool = True, file: Any = None) -> str:
    """Print and return the per-pass, per-layer report of a compressed model.

    Parameters
    ----------
    compressed:
        A module returned by ``sparsecomp.compress`` (its ``sparsecomp_report``), or that list itself.
    show:
        Print the text (to ``file``, default ``sys.stdout``).

    Returns
    -------
    str
        The text: per pass, its name, config, a summary line (layer counts per format, params/MACs/bytes
        before -> after) and a markdown table with one row per layer.

    Examples
    --------
    >>> small = sparsecomp.compress(model, x, sparsecomp.Sparsify(sparsity=0.9))  # doctest: +SKIP
    >>> text = sparsecomp.report(small)                                          # doctest: +SKIP
    """
    reports = compressed if isinstance(compressed, list) else getattr(compressed, "sparsecomp_report", None)
    if reports is None:
        raise TypeError(
            f"{type(compressed).__name__} has no sparsecomp_report; pass the result of sparsecomp.compress"
        )
    text = format_report(reports)
    if show:
        print(text, end="", file=file or sys.stdout)
    return text


__all__ = ["format_layers", "format_report", "report"]
