"""Tuning-location analysis: LocFT-BF at every (module, layer) of a grid, one table + heatmap.

    python recipes/location_sweep.py --data.limit 100
    python recipes/location_sweep.py --data.path counterfact --data.limit 100 \\
        --layers [1,5,9,13,17,21,25,29] --modules [attn_out,mlp_up,mlp_gate,mlp_down,block]
    python recipes/location_sweep.py --model.model path/or/hub-id --layers [0,4,8] --modules [mlp_down]

Every location fits the same requests from the same unedited weights (restored bit-exactly in
between) and is scored after all edits with generation exact match (reliability,
generalization, locality agreement with the unedited model) and held-out perplexity. Writes
``locations.csv``, ``locations.md`` and ``locations.png`` under ``--out_dir`` and prints the
recommended location: the best harmonic mean of reliability, generalization and locality among
locations whose perplexity rose by at most ``--ppl_tolerance``. The locality in that score is
``--score_locality``: teacher-forced token agreement with the unedited model
(``token_accuracy``, the default when that protocol runs), 32-token greedy-continuation
agreement (``generation``), which small models rarely keep exactly after any edit and so ranks
poorly, or the share of the unedited model's neighbourhood score kept (``neighborhood``: the
probability protocol's NS after the edits over NS before, at most 1; the figure to rank by
where the locality prompts ask the edited relation about neighbouring subjects, which
token agreement with the unedited model does not see as sharply). Finished locations are appended to the CSV as they end; rerunning the same command
resumes the sweep. The unedited model's figures and reference are kept in ``unedited/`` beside
the table (keyed by the model's weights, the requests and the evaluation settings), so rerunning a finished
sweep to redraw it, or to rank it under another ``--ppl_tolerance``, evaluates nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from lit_edit.editors.finetune import LocFTBF
from lit_edit.masks import LOCATION_KINDS, location_mask
from lit_edit.plots import heatmap
from lit_edit.study import Study, edit_score, protocol_label, reference_row, study_column, study_row

log = logging.getLogger("lit_edit.recipes.location_sweep")
DEFAULTS = __file__.removesuffix(".py") + ".yaml"

#: --score_locality choices: the evaluation protocol they need and the figure the score reads as locality.
SCORE_LOCALITY = {
    "token_accuracy": ("token_accuracy", "tok_acc/locality"),
    "generation": ("generation", "gen_em/locality_agreement"),
    "neighborhood": ("probability", "prob/NS"),
}
#: The column of ``--score_locality neighborhood``: NS after the edits over NS before, at most 1.
NS_KEPT = "ns_kept"


def ns_kept(ns_after: object, ns_before: float) -> float:
    """The share of the unedited neighbourhood score an edited model keeps, at most 1 (``nan`` if unknown)."""
    try:
        after = float(ns_after)
    except (TypeError, ValueError):
        return math.nan
    if math.isnan(after) or not ns_before > 0:
        return math.nan
    return min(1.0, after / ns_before)


def _arguments(parser) -> None:
    parser.add_argument("--layers", type=Optional[list[int]], default=None, help="Blocks to visit (default: 8 evenly spaced).")
    parser.add_argument("--modules", type=list[str], default=list(LOCATION_KINDS), help=f"Locations inside a block: {LOCATION_KINDS}.")
    parser.add_argument("--ppl_tolerance", type=float, default=0.10, help="Largest relative perplexity rise a recommended location may cause.")
    parser.add_argument(
        "--score_locality",
        type=str,
        default="auto",
        help="Locality figure of the recommendation score: token_accuracy, generation, neighborhood "
        "(share of the unedited NS kept; needs the probability protocol), or auto (token_accuracy when that protocol runs).",
    )
    parser.set_defaults(out_dir="results/location_sweep")


def _check(parser, cfg) -> None:
    unknown = [m for m in cfg.modules if m not in LOCATION_KINDS]
    if unknown:
        parser.error(f"unknown --modules {unknown}; choose from {list(LOCATION_KINDS)}")
    protocols = cfg.eval.protocols
    choice = cfg.score_locality
    if choice == "auto":
        choice = "token_accuracy" if "token_accuracy" in protocols else "generation"
    if choice not in SCORE_LOCALITY:
        parser.error(f"--score_locality {choice!r}: choose {', '.join(SCORE_LOCALITY)} or auto")
    needed = SCORE_LOCALITY[choice][0]
    if needed not in protocols:
        parser.error(f"--score_locality {choice} needs the {needed!r} evaluation protocol; --eval.protocols is {list(protocols)}")
    cfg.score_locality = choice


def main(args: Optional[list[str]] = None) -> list[dict]:
    study = Study.start(LocFTBF, __doc__, DEFAULTS, args, table="locations.csv", key=("module", "layer"),
                        add_arguments=_arguments, check=_check)
    cfg, table = study.cfg, study.table
    n_layers = study.num_layers
    layers = cfg.layers if cfg.layers is not None else sorted({round(i * (n_layers - 1) / 7) for i in range(8)})
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        study.parser.error(f"--layers {bad} out of range: the model has blocks 0..{n_layers - 1}")
    requests = study.datamodule.load()
    todo = [(m, layer) for m in cfg.modules for layer in layers if not table.done(module=m, layer=layer)]
    log.info("%d location(s) to run, %d already done", len(todo), len(table.rows))
    before = study.unedited(requests)  # cached: a pure redraw evaluates nothing
    locality_figure = SCORE_LOCALITY[cfg.score_locality][1]
    ref = reference_row(before.figures)
    if cfg.score_locality == "neighborhood":
        ns_before = before.figures[locality_figure]
        locality_key = NS_KEPT
        ref[locality_figure] = ns_before
        ref[NS_KEPT] = ns_kept(ns_before, ns_before)
    else:
        locality_key = study_column(before.figures, locality_figure)  # its column in the table
        ref[locality_key] = before.figures[locality_figure]
    for i, (module, layer) in enumerate(todo, 1):
        log.info("[%d/%d] LocFT-BF at %s of block %d", i, len(todo), module, layer)
        editor = study.editor(**location_mask(study.arch, module, layer))
        figures = study.fit_and_score(editor, requests, study.datamodule, before.reference)
        row = study_row(figures, module=module, layer=layer)
        if locality_key == NS_KEPT:
            row[NS_KEPT] = ns_kept(row.get(locality_figure), ns_before)
        row["score"] = edit_score(row, ref["perplexity"], cfg.ppl_tolerance, locality_key)
        table.add(row)
        log.info("  reliability %.3f generalization %.3f locality %.3f perplexity %.2f",
                       row["reliability"], row["generalization"], row["locality"], row["perplexity"])

    rows = [r for r in table.rows if r["module"] in cfg.modules and int(r["layer"]) in layers]
    for r in rows:
        if locality_key == NS_KEPT:
            r[NS_KEPT] = ns_kept(r.get(locality_figure), ns_before)
        r["score"] = edit_score(r, ref["perplexity"], cfg.ppl_tolerance, locality_key)
    columns = ["module", "layer", "reliability", "generalization", "locality", "perplexity", "score", "edit_seconds", "optimizer_steps"]
    if locality_key == NS_KEPT:
        columns[columns.index("locality") + 1:columns.index("locality") + 1] = [locality_figure, NS_KEPT]
    elif locality_key != "locality":
        columns.insert(columns.index("locality") + 1, locality_key)
    title = (f"LocFT-BF tuning locations on {study.model_name}, {len(requests)} requests "
             f"(after-all, {protocol_label(study.evaluator)})")
    study.finish([{"module": "(unedited)", "layer": "-", **ref}] + rows, columns, title, "locations")
    shown = list(dict.fromkeys(["reliability", "generalization", "locality", locality_key, "perplexity"]))
    heatmap(rows, shown, study.out / "locations.png", reference=ref, title=title)
    unranked = [f"{r['module']}@{r['layer']}" for r in rows if math.isnan(r["score"])]
    if unranked:
        print(f"Not ranked (no {locality_key!r} figure; rerun them with --out_dir elsewhere): {', '.join(unranked)}")
    ranked = [r for r in rows if not math.isnan(r["score"])]
    best = max(ranked, key=lambda r: (float(r["score"]), -float(r["perplexity"])), default=None)
    if best is None or float(best["score"]) <= 0:
        print(f"No location met the perplexity tolerance with every score term > 0 (locality = {locality_key}); see the table.")
    else:
        print(
            f"Recommended location: {best['module']} of block {best['layer']} "
            f"(reliability {float(best['reliability']):.3f}, generalization {float(best['generalization']):.3f}, "
            f"{locality_key} {float(best[locality_key]):.3f}, perplexity {float(best['perplexity']):.2f} vs {ref['perplexity']:.2f})"
        )
    print(f"Wrote {study.out / 'locations.csv'}, {study.out / 'locations.md'}, {study.out / 'locations.png'}")
    return rows


if __name__ == "__main__":
    main()
