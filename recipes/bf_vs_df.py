"""Breadth-first vs depth-first fine-tuning on the same N requests, for several N.

    python recipes/bf_vs_df.py
    python recipes/bf_vs_df.py --n_edits [50,100,200] --data.path counterfact
    python recipes/bf_vs_df.py --methods [bf_minibatch,df] --n_edits [20] --trainer.max_epochs 10

Methods (everything else fixed: the location, the loss, lr, Adam, EOS-terminated targets):

``bf_minibatch``  LocFT-BF: epochs over all N requests, mini-batches of ``--bf_batch_size`` (16 in the YAML; 100, the paper's, without it)
``bf_sample``     breadth-first with mini-batches of 1 (per-sample updates, same epochs)
``df``            depth-first: each request alone to convergence (≤ ``--df_steps`` steps), edits accumulate

Every run is evaluated *after all edits* (retention) on all N requests with generation exact
match (reliability, generalization, locality agreement with the unedited model) and held-out
perplexity. Writes ``bf_vs_df.csv``/``.md``/``.png`` under ``--out_dir``; finished runs are kept
in the CSV, so rerunning the same command resumes the study.
"""

from __future__ import annotations

import logging
from typing import Optional

from lit_edit.data.datamodule import EditDataModule
from lit_edit.editors.finetune import DepthFirstFT, LocFTBF
from lit_edit.plots import line_plot
from lit_edit.study import Study, protocol_label, study_row

METHODS = ("bf_minibatch", "bf_sample", "df")
log = logging.getLogger("lit_edit.recipes.bf_vs_df")
DEFAULTS = __file__.removesuffix(".py") + ".yaml"


def _arguments(parser) -> None:
    parser.add_argument("--n_edits", type=list[int], default=[50, 100, 200], help="Numbers of requests N to compare at.")
    parser.add_argument("--methods", type=list[str], default=list(METHODS), help=f"Pipelines to run: {METHODS}.")
    parser.add_argument("--bf_batch_size", type=int, default=100, help="Mini-batch size of bf_minibatch.")
    parser.add_argument("--df_steps", type=int, default=25, help="Most optimizer steps per request for df.")
    parser.set_defaults(out_dir="results/bf_vs_df")


def _check(parser, cfg) -> None:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")


def main(args: Optional[list[str]] = None) -> list[dict]:
    study = Study.start(LocFTBF, __doc__, DEFAULTS, args, table="bf_vs_df.csv", key=("method", "n_edits"),
                        add_arguments=_arguments, check=_check)
    cfg, table = study.cfg, study.table
    data_args = {k: v for k, v in vars(cfg.data).items() if k not in ("limit", "batch_size", "shuffle", "requests")}
    all_requests = EditDataModule(**data_args, limit=max(cfg.n_edits)).load()
    if len(all_requests) < max(cfg.n_edits):
        study.parser.error(f"the data has {len(all_requests)} requests, fewer than N = {max(cfg.n_edits)}")

    for n in sorted(cfg.n_edits):
        requests = all_requests[:n]
        if all(table.done(method=m, n_edits=n) for m in cfg.methods):
            continue
        log.info("N = %d: evaluating the unedited model", n)
        before = study.unedited(requests)
        if not table.done(method="unedited", n_edits=n):
            table.add(study_row(before.figures, method="unedited", n_edits=n))
        for method in cfg.methods:
            if table.done(method=method, n_edits=n):
                continue
            log.info("N = %d: %s", n, method)
            if method == "df":
                editor = study.editor(DepthFirstFT, steps=cfg.df_steps)
                dm = EditDataModule(requests=requests, batch_size=1, shuffle=False)
                figures = study.fit_and_score(editor, requests, dm, before.reference, max_epochs=1)
            else:
                editor = study.editor(LocFTBF)
                bs = cfg.bf_batch_size if method == "bf_minibatch" else 1
                dm = EditDataModule(requests=requests, batch_size=bs, shuffle=True, seed=cfg.seed_everything)
                figures = study.fit_and_score(editor, requests, dm, before.reference)
            table.add(study_row(figures, method=method, n_edits=n))

    rows = [r for r in table.rows if int(r["n_edits"]) in cfg.n_edits and r["method"] in (*cfg.methods, "unedited")]
    rows.sort(key=lambda r: (int(r["n_edits"]), r["method"]))
    columns = ["method", "n_edits", "reliability", "generalization", "locality", "perplexity", "edit_seconds", "epochs_run", "optimizer_steps"]
    title = f"Breadth-first vs depth-first on {study.model_name} (after-all, {protocol_label(study.evaluator)})"
    study.finish(rows, columns, title, "bf_vs_df")
    edited = [r for r in rows if r["method"] != "unedited"]
    if edited:
        metrics = ["reliability", "generalization", "locality", "perplexity"]
        line_plot(rows, metrics, study.out / "bf_vs_df.png", title=title, reference_series="unedited")
    print(f"Wrote {study.out / 'bf_vs_df.csv'}, {study.out / 'bf_vs_df.md'}" + (f", {study.out / 'bf_vs_df.png'}" if edited else ""))
    return rows


if __name__ == "__main__":
    main()
