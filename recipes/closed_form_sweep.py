"""Layer sweep of the closed-form editors: ROME or MEMIT edits at each block of a list, one table + plot.

    python recipes/closed_form_sweep.py                                  # ROME, single edits, every 3rd block
    python recipes/closed_form_sweep.py --editor memit --window 3        # MEMIT on 3 blocks centred on each
    python recipes/closed_form_sweep.py --layers [2,4,6,8] --data.limit 50 --model.statistics.n_samples 1000
    python recipes/closed_form_sweep.py --editor memit --data.batch_size 10 --anchor start   # batched MEMIT

At each block L of ``--layers`` the same sample of records is edited from the same unedited
weights: ROME edits block L; MEMIT edits ``--window`` consecutive blocks centred on L
(``--anchor center``) or starting at L (``--anchor start``), shifted inside the model when
they would leave it (the ``edit_layers`` column says which blocks were edited). Each edit batch
(``--data.batch_size``: 1 = *single* edits, more = *batched*, 0 = all records in one batch) is
scored right after its edit with the chosen protocols (default: probability ES/PS/NS/S and
generation exact match) and then undone (*immediate* evaluation timing; the editor's
``accumulate`` is off), so every batch starts from the unedited model; the figures of a layer
are request-weighted means over its batches and ``prob/S`` is the harmonic mean of those means
of ES, PS and NS. Any protocol of ``--eval.protocols`` is scored after every batch this way,
so ``perplexity`` or ``kl`` make a run proportionally slower.

The key statistics of every block the sweep edits are computed before the first edit, in one
pass over the statistics corpus (cached per block, so a rerun or another sweep reuses them).

The YAML's defaults are a quick look sized for a 2-core CPU: 10 blocks × 3 records, 10 v*/z
steps (the config hub's 25 for SmolLM2-135M), 2 context templates per group (ROME's 10 + 10)
and 200 statistics texts (the editors' 1000). A larger run restores the editors' own settings:

    python recipes/closed_form_sweep.py --data.limit 100 --model.values.steps null \
        --model.templates.max_per_group null --model.statistics.n_samples 1000

Writes ``layers.csv``, ``layers.md`` and ``layers.png`` under ``--out_dir``; every row and
both titles name the editor, the strategy (single / batched), the batch size, the evaluation
timing, the model and the records. Finished layers are appended to the CSV as they end, keyed by
editor, strategy, batch size, window, anchor, model, data and layer; rerunning the same command
resumes the sweep and recomputes nothing that is done. The unedited model's figures and
reference are kept in ``unedited/`` beside the table.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import lightning as L
import torch

from lit_edit.data.datamodule import EditDataModule
from lit_edit.editors import MEMIT, ROME
from lit_edit.editors.closed_form import ClosedFormEditor
from lit_edit.evaluation import EvaluationReference, Evaluator
from lit_edit.evaluation.metrics import harmonic_mean
from lit_edit.plots import line_plot
from lit_edit.progress import Progress
from lit_edit.study import Study, data_label

log = logging.getLogger("lit_edit.recipes.closed_form_sweep")
DEFAULTS = __file__.removesuffix(".py") + ".yaml"

EDITORS = {"rome": ROME, "memit": MEMIT}
ANCHORS = ("center", "start")
KEY = ("editor", "strategy", "batch_size", "window", "anchor", "model", "data", "layer")
#: The figures shown in the table and the plot, when their protocol ran.
SHOWN = ("prob/ES", "prob/PS", "prob/NS", "prob/S", "gen_em/reliability", "gen_em/generalization", "gen_em/locality_agreement")


def _arguments(parser) -> None:
    parser.add_argument("--editor", type=str, default="rome", help=f"Closed-form editor: {', '.join(EDITORS)}.")
    parser.add_argument("--layers", type=Optional[list[int]], default=None, help="Blocks to visit (default: every 3rd, from block 1).")
    parser.add_argument("--window", type=Optional[int], default=None, help="Blocks MEMIT edits at each visited block (default 3; ROME: 1).")
    parser.add_argument("--anchor", type=str, default="center", help="MEMIT window: centred on the visited block (center) or starting there (start).")
    parser.set_defaults(out_dir="results/closed_form_sweep")


def _check(parser, cfg) -> None:
    if cfg.editor not in EDITORS:
        parser.error(f"unknown --editor {cfg.editor!r}; choose from {list(EDITORS)}")
    if cfg.anchor not in ANCHORS:
        parser.error(f"unknown --anchor {cfg.anchor!r}; choose from {list(ANCHORS)}")
    if cfg.window is None:
        cfg.window = 1 if cfg.editor == "rome" else 3
    if cfg.window < 1:
        parser.error(f"--window must be >= 1, got {cfg.window}")
    if cfg.editor == "rome" and cfg.window != 1:
        parser.error(f"--window {cfg.window}: ROME edits one block; use --editor memit for a window")
    if cfg.model.layers is not None:
        parser.error("--model.layers is set by the sweep: use --layers (and --window)")
    if cfg.model.accumulate:
        parser.error("--model.accumulate must be false: the sweep undoes each edit batch after scoring it (single / batched editing)")
    if cfg.data.shuffle:
        parser.error("--data.shuffle must be false: every layer edits the records in the same batches")


def window_layers(layer: int, window: int, anchor: str, num_layers: int) -> list[int]:
    """The ``window`` consecutive blocks edited for the visited ``layer``, shifted inside ``0..num_layers-1``."""
    if window > num_layers:
        raise ValueError(f"--window {window} is wider than the model's {num_layers} blocks")
    start = layer - (window - 1) // 2 if anchor == "center" else layer
    start = max(0, min(start, num_layers - window))
    return list(range(start, start + window))


def _span(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


class ImmediateScores(L.Callback):
    """Score each edit batch's requests right after its edit, before the editor undoes it.

    Lightning calls this hook before the editor's own ``on_train_batch_end`` (where an editor with
    ``accumulate=False`` restores the weights), so the edited model is what is scored.
    """

    def __init__(self, evaluator: Evaluator, reference: EvaluationReference):
        self.evaluator, self.reference = evaluator, reference
        self.sums: dict[str, list[float]] = {}
        self.seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        started = time.perf_counter()
        figures = self.evaluator.evaluate(pl_module.model, pl_module.tokenizer, batch, self.reference, partial=True).figures
        self.seconds += time.perf_counter() - started
        for name, value in figures.items():
            total, count = self.sums.get(name, [0.0, 0.0])
            self.sums[name] = [total + value * len(batch), count + len(batch)]

    def figures(self) -> dict[str, float]:
        """Request-weighted means over the batches; ``prob/S`` from the mean ES, PS and NS."""
        out = {name: total / count for name, (total, count) in self.sums.items() if count}
        parts = [out[k] for k in ("prob/ES", "prob/PS", "prob/NS") if k in out]
        if parts:
            out["prob/S"] = harmonic_mean(parts)
        return out


def _prepare_statistics(study: Study, editor_class: type, layers: list[int]) -> None:
    """Key statistics of every block in ``layers``: the cached ones read, the rest computed in one pass."""
    if not layers:
        return
    from lit_edit.stats import second_moments

    probe = study.editor(editor_class, layers=[layers[0]], accumulate=False)
    opts = probe.settings.statistics
    if not opts.adjustment or opts.published is not None:
        return
    # the arguments ClosedFormEditor uses for its own statistics, so each editor finds them cached
    second_moments(
        study.model, study.tokenizer, layers, corpus=opts.corpus, n_samples=int(opts.n_samples), max_length=int(opts.max_length),
        dtype=opts.dtype, products="float32", batch_size=int(opts.batch_size), model_name=probe.base_model_name,
    )


def _touched_weights(editor: ClosedFormEditor, layers: list[int]) -> dict[str, torch.Tensor]:
    return {editor.weight_name(layer): editor.weight(layer).detach().clone() for layer in layers}


def main(args: Optional[list[str]] = None) -> list[dict]:
    study = Study.start(ClosedFormEditor, __doc__, DEFAULTS, args, table="layers.csv", key=KEY,
                        add_arguments=_arguments, check=_check)
    cfg, table = study.cfg, study.table
    editor_class = EDITORS[cfg.editor]
    n_layers = study.num_layers
    layers = cfg.layers if cfg.layers is not None else list(range(1, n_layers, 3))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        study.parser.error(f"--layers {bad} out of range: the model has blocks 0..{n_layers - 1}")
    if cfg.window > n_layers:
        study.parser.error(f"--window {cfg.window} is wider than the model's {n_layers} blocks")
    requests = study.datamodule.load()
    batch_size = cfg.data.batch_size or len(requests)
    strategy = "single" if batch_size == 1 else "batched"
    common = {"editor": cfg.editor, "strategy": strategy, "batch_size": batch_size, "window": cfg.window, "anchor": cfg.anchor,
              "model": study.model_name, "data": data_label(cfg.data, len(requests))}
    todo = [layer for layer in layers if not table.done(**common, layer=layer)]
    log.info("%s %s sweep: %d layer(s) to run, %d already done", cfg.editor, strategy, len(todo), len(layers) - len(todo))

    before = study.unedited(requests)  # cached: a pure redraw evaluates nothing
    windows = {layer: window_layers(layer, cfg.window, cfg.anchor, n_layers) for layer in layers}
    _prepare_statistics(study, editor_class, sorted({b for layer in todo for b in windows[layer]}))
    with Progress(len(todo), f"{cfg.editor} layers", logger=log) as progress:
        for layer in todo:
            edited = windows[layer]
            log.info("%s at block(s) %s: %d request(s) in batches of %d", cfg.editor, _span(edited), len(requests), batch_size)
            editor = study.editor(editor_class, layers=edited, accumulate=False)
            original = _touched_weights(editor, edited)
            scores = ImmediateScores(study.evaluator, before.reference)
            trainer = L.Trainer(**{
                "accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                **study.trainer_kwargs(max_epochs=1), "callbacks": [scores],
            })
            started = time.perf_counter()
            trainer.fit(editor, datamodule=EditDataModule(requests=requests, batch_size=batch_size, shuffle=False))
            seconds = time.perf_counter() - started
            editor.restore()
            changed = [name for name, w in _touched_weights(editor, edited).items() if not torch.equal(w, original[name])]
            if changed:
                raise RuntimeError(f"{changed} differ from the unedited weights after the layer-{layer} run: the sweep cannot go on")
            row = {**common, "timing": "immediate", "layer": layer, "edit_layers": _span(edited), "n_requests": len(requests),
                   **scores.figures(), "edit_seconds": seconds - scores.seconds, "eval_seconds": scores.seconds}
            table.add(row)
            progress.update(layer=layer, S=row.get("prob/S", math.nan))
            log.info("  block %s: %s", _span(edited), ", ".join(f"{k} {row[k]:.3f}" for k in SHOWN if k in row))

    rows = [r for r in table.rows if all(str(r.get(k)) == str(v) for k, v in common.items()) and int(r["layer"]) in layers]
    rows.sort(key=lambda r: int(r["layer"]))
    shown = [k for k in SHOWN if k in before.figures or any(r.get(k) not in (None, "") for r in rows)]
    title = (f"{cfg.editor.upper()} by layer on {study.model_name}: {strategy} edits (batch {batch_size}"
             f"{f', window {cfg.window} {cfg.anchor}' if cfg.editor != 'rome' else ''}), "
             f"{len(requests)} records {common['data']}, immediate evaluation")
    reference = {"layer": "(unedited)", "edit_layers": "-", **{k: before.figures.get(k, math.nan) for k in shown}}
    study.finish([reference, *rows], ["layer", "edit_layers", *shown, "edit_seconds", "eval_seconds"], title, "layers")
    if rows:
        plotted = [{**r, "series": cfg.editor} for r in rows]
        plotted += [{"series": "unedited", "layer": r["layer"], **{k: before.figures.get(k, math.nan) for k in shown}} for r in rows]
        line_plot(plotted, shown, study.out / "layers.png", x_key="layer", series_key="series", title=title,
                  reference_series="unedited")
    print(f"Wrote {study.out / 'layers.csv'}, {study.out / 'layers.md'}" + (f", {study.out / 'layers.png'}" if rows else ""))
    return rows


if __name__ == "__main__":
    main()
