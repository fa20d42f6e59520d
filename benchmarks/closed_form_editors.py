"""ROME / MEMIT / EMMET on the embedded model and CounterFact records, evaluated immediately.

    python benchmarks/closed_form_editors.py                          # 100 records: ROME single, MEMIT/EMMET batch
    python benchmarks/closed_form_editors.py --n 20 --editors rome --no-generation
    python benchmarks/closed_form_editors.py --sweep rome:2,4,6,8 --n 20   # layer sweep (probability metrics)

Strategies (docs/methods.md §1): ROME *single* (edit one request, evaluate it immediately,
restore the original weights, next request); MEMIT and EMMET *batched* (one update for all
``--n`` requests, evaluate them, restore). The unedited model is evaluated once on the same
requests. Prints a ``metric | unedited | ...`` table and writes JSON under ``results/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lit_edit.evaluation.metrics import harmonic_mean

log = logging.getLogger("benchmarks.locate_editors")


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def _table(columns: dict[str, dict[str, float]]) -> str:
    names = sorted({k for c in columns.values() for k in c})
    head = ["metric"] + list(columns)
    lines = [" | ".join(f"{h:>18}" if i else f"{h:<24}" for i, h in enumerate(head))]
    lines.append("-" * len(lines[0]))
    for n in names:
        cells = [f"{n:<24}"]
        for c in columns.values():
            v = c.get(n)
            cells.append(f"{v:>18.4f}" if v is not None else f"{'-':>18}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def run_single(editor, evaluation, requests, reference) -> tuple[dict[str, float], dict[str, float]]:
    """Single-edit strategy: edit, evaluate that request immediately, restore."""
    rows, diags = [], []
    for i, r in enumerate(requests):
        diags.append(editor.edit([r]))
        rows.append(evaluation.evaluate(editor.model, editor.tokenizer, [r], reference=reference, partial=True).figures)
        editor.restore()
        if (i + 1) % 10 == 0:
            m = _mean(rows)
            log.info("%d/%d single edits: ES %.3f PS %.3f NS %.3f", i + 1, len(requests),
                     m.get("prob/ES", float("nan")), m.get("prob/PS", float("nan")), m.get("prob/NS", float("nan")))
    metrics = _mean(rows)
    parts = [metrics.get(k) for k in ("prob/ES", "prob/PS", "prob/NS")]
    if all(v is not None for v in parts):  # S is the harmonic mean of the averaged rates, not a mean of per-edit S
        metrics["prob/S"] = harmonic_mean(parts)
    return metrics, _mean(diags)


def run_batched(editor, evaluation, requests, reference, values=None) -> tuple[dict[str, float], dict[str, float]]:
    """Batched strategy: one update for all requests, evaluate them all, restore."""
    diag = editor.edit(list(requests), values=values)
    metrics = evaluation.evaluate(editor.model, editor.tokenizer, requests, reference=reference).figures
    editor.restore()
    return metrics, {k: v for k, v in diag.items() if "/" not in k}


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="counterfact")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--editors", default="rome,memit,emmet")
    p.add_argument("--no-generation", action="store_true", help="skip the generation exact-match protocol")
    p.add_argument("--sweep", default=None, help="EDITOR:L1,L2,... (MEMIT/EMMET: each entry is the last of 4 layers)")
    p.add_argument("--n_samples", type=int, default=1000, help="statistics.n_samples of the editors")
    p.add_argument("--max_templates", type=int, default=None, help="templates.max_per_group of the editors")
    p.add_argument("--steps", type=int, default=None, help="values.steps of the editors (default: config hub)")
    p.add_argument("--out", default="results/closed_form_editors.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)

    from lit_edit.data import load_requests
    from lit_edit.editors import EMMET, MEMIT, ROME
    from lit_edit.editors.closed_form import StatisticsOptions, TemplateOptions, ValueOptions
    from lit_edit.evaluation import Evaluator
    from lit_edit.models import load_causal_lm

    torch.manual_seed(0)
    model, tok = load_causal_lm(args.model)
    requests = load_requests(args.data, limit=args.n, offset=args.offset, require_subject=True)
    protocols = ["probability", "token_accuracy"] + ([] if args.no_generation or args.sweep else ["generation"])
    evaluation = Evaluator(protocols=protocols, batch_size=16)
    t0 = time.perf_counter()
    before = evaluation.evaluate(model, tok, requests)
    unedited, reference = before.figures, before.reference
    columns: dict[str, dict[str, float]] = {"unedited": unedited}
    diagnostics: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {"unedited_eval": round(time.perf_counter() - t0, 1)}
    classes = {"rome": ROME, "memit": MEMIT, "emmet": EMMET}
    common = {"model": model, "tokenizer": tok, "values": ValueOptions(steps=args.steps),
              "statistics": StatisticsOptions(n_samples=args.n_samples),
              "templates": TemplateOptions(max_per_group=args.max_templates)}
    shared_values: dict[tuple, list] = {}

    if args.sweep:
        name, _, layers = args.sweep.partition(":")
        for last in [int(x) for x in layers.split(",")]:
            layer_set = [last] if name == "rome" else list(range(max(0, last - 3), last + 1))
            editor = classes[name](layers=layer_set, **common)
            t0 = time.perf_counter()
            run = run_single if name == "rome" else run_batched
            metrics, diag = run(editor, evaluation, requests, reference)
            label = f"{name} L{layer_set[0]}" + (f"-{layer_set[-1]}" if len(layer_set) > 1 else "")
            columns[label], diagnostics[label] = metrics, diag
            seconds[label] = round(time.perf_counter() - t0, 1)
            print(label, {k: round(metrics[k], 3) for k in ("prob/ES", "prob/PS", "prob/NS", "prob/S") if k in metrics}, flush=True)
    else:
        for name in [e.strip() for e in args.editors.split(",") if e.strip()]:
            editor = classes[name](**common)
            editor.prepare_statistics()
            t0 = time.perf_counter()
            if name == "rome":
                label = f"ROME single x{len(requests)} (L{editor.edit_layers[0]})"
                metrics, diag = run_single(editor, evaluation, requests, reference)
            else:
                label = f"{name.upper()} batch {len(requests)} (L{editor.edit_layers[0]}-{editor.edit_layers[-1]})"
                # MEMIT and EMMET with the same layers, templates and settings share their z vectors
                key = (tuple(editor.edit_layers), str(editor.context_templates()), editor.value_settings())
                if key not in shared_values:
                    shared_values[key] = editor.target_values(requests)
                    seconds["z_" + name] = round(time.perf_counter() - t0, 1)
                metrics, diag = run_batched(editor, evaluation, requests, reference, shared_values[key])
            columns[label], diagnostics[label] = metrics, diag
            seconds[label] = round(time.perf_counter() - t0, 1)
            print(f"{label}: {seconds[label]} s; diagnostics " + ", ".join(f"{k} {v:.4g}" for k, v in diag.items()), flush=True)

    print(f"\nCounterFact, {len(requests)} records (offset {args.offset}) of {args.data}, model {args.model}; "
          f"evaluation immediate (ROME: single, MEMIT/EMMET: batched)")
    print(_table(columns))
    out = {"settings": {k: v for k, v in vars(args).items()}, "data": args.data, "n": len(requests), "offset": args.offset, "model": args.model,
           "protocols": protocols, "metrics": columns, "diagnostics": diagnostics, "seconds": seconds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
