"""Reporting of a before/after evaluation: flat metrics for loggers, the summary JSON, the printed table.

Figures are plain ``{name: value}`` dicts (from :class:`~lit_edit.evaluation.Evaluator`); every
figure keeps its protocol's description in the summary.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from lit_edit.evaluation.protocols import TIMING, figure_description, protocol_of
from lit_edit.io import atomic_write
from lit_edit.models import model_name

log = logging.getLogger(__name__)

__all__ = ["figure_names", "flat_metrics", "header", "model_label", "summary", "table", "write_summary"]

Figures = Optional[dict[str, float]]


def figure_names(before: Figures, after: Figures) -> list[str]:
    """Figures present before or after, in protocol order."""
    names = list(before or {})
    names += [n for n in (after or {}) if n not in names]
    return names


def flat_metrics(before: Figures, after: Figures) -> dict[str, float]:
    """``<figure>/before``, ``<figure>/after`` and ``<figure>/delta`` for the loggers."""
    out: dict[str, float] = {}
    for name in figure_names(before, after):
        b, a = (before or {}).get(name), (after or {}).get(name)
        if b is not None:
            out[f"{name}/before"] = b
        if a is not None:
            out[f"{name}/after"] = a
        if a is not None and b is not None:
            out[f"{name}/delta"] = a - b
    return out


def model_label(module: Any) -> Optional[str]:
    """The name of the causal LM an editor (or the model itself) holds."""
    inner = getattr(module, "model", module)
    return None if inner is None else model_name(inner)


def summary(
    before: Figures,
    after: Figures,
    *,
    protocols: dict[str, str],
    timing: str,
    num_requests: int,
    model: Any = None,
    seconds: Optional[dict[str, float]] = None,
    extra: Optional[dict[str, Any]] = None,
    chat_template: Optional[dict[str, Any]] = None,
    run: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON-serializable record of an evaluation.

    Args:
        protocols: ``{protocol: description}`` of the protocols that ran.
        timing: the evaluation timing (a key of :data:`~lit_edit.evaluation.protocols.TIMING`).
        model: the editor (or model) evaluated, for its name and class.
        extra: further top-level entries (e.g. the perplexity corpus version).
        chat_template: how prompts were fed (:meth:`lit_edit.data.chat.PromptFormat.describe`);
            default: raw text (``{"mode": "never", "applied": False}``).
        run: the fit's record (:func:`lit_edit.strategy.run_record`): its ``strategy`` (name,
            batch size, accumulate, batches, declared) and ``data`` (source, offset, limit,
            ...) become the summary's ``strategy`` and ``data`` entries (``None`` when unknown).
    """
    figures = {}
    for name in figure_names(before, after):
        protocol = protocol_of(name)
        b, a = (before or {}).get(name), (after or {}).get(name)
        figures[name] = {
            "protocol": protocol,
            "protocol_description": protocols.get(protocol, ""),
            "description": figure_description(name),
            "before": b,
            "after": a,
            "delta": a - b if a is not None and b is not None else None,
        }
    run = run or {}
    strategy = dict(run["strategy"]) if run.get("strategy") else None
    if strategy is not None:
        strategy["evaluation_timing"] = timing
    return {
        "evaluation_timing": timing,
        "evaluation_timing_description": TIMING[timing],
        "model": model_label(model) if model is not None else run.get("model"),
        "editor": type(model).__name__ if model is not None else run.get("editor"),
        "strategy": strategy,
        "data": dict(run["data"]) if run.get("data") else None,
        "num_requests": num_requests,
        "chat_template": dict(chat_template or {"mode": "never", "applied": False}),
        "protocols": dict(protocols),
        "seconds": dict(seconds or {}),
        "figures": figures,
        "before": dict(before or {}),
        "after": dict(after or {}),
        **(extra or {}),
    }


def write_summary(directory: Union[str, os.PathLike], record: dict[str, Any]) -> Path:
    """Write ``summary.json`` into ``directory`` atomically; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    path = atomic_write(directory / "summary.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    log.info("wrote evaluation summary to %s", path)
    return path


def header(num_requests: int, timing: str, chat_mode: str, run: Optional[dict[str, Any]] = None) -> str:
    """The table's title line: editor, strategy and batch size, timing, model, data, requests, chat template."""
    run = run or {}
    parts = []
    if run.get("editor"):
        parts.append(str(run["editor"]))
    s = run.get("strategy") or {}
    if s.get("name"):
        text = f"strategy: {s['name']}"
        if s["name"] not in ("single", "sequential"):
            text += f", batch size {s.get('batch_size')}"
        if s.get("declared") is False:
            text += " (from accumulate and the batch size)"
        parts.append(text)
    parts.append(f"timing: {timing}")
    if run.get("model"):
        parts.append(f"model: {run['model']}")
    data = run.get("data") or {}
    parts.append(f"data: {data['source']} ({num_requests} requests)" if data.get("source") else f"{num_requests} requests")
    parts.append(f"chat_template: {chat_mode}")
    return f"edit evaluation ({', '.join(parts)})"


def table(before: Figures, after: Figures, header: str = "") -> str:
    """The ``metric | before | after | delta`` table as text."""
    rows = [("metric", "before", "after", "delta")]
    for name in figure_names(before, after):
        b, a = (before or {}).get(name), (after or {}).get(name)
        d = a - b if a is not None and b is not None else None
        rows.append((name, _fmt(b), _fmt(a), _fmt(d, sign=True)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join([header, *lines]) if header else "\n".join(lines)


def _fmt(value: Optional[float], sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if sign else f"{value:.4f}"
