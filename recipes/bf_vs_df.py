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
from pathlib import Path
from typing import Optional

import lightning as L

from lit_edit.analysis import (
    ResumableTable,
    fit_and_score,
    line_plot,
    protocol_label,
    study_row,
    write_markdown,
)
from lit_edit.cli import instantiate_study, study_parser
from lit_edit.data.datamodule import EditDataModule
from lit_edit.editors.finetune import DepthFirstFT, LocFTBF

log = logging.getLogger("lit_edit.recipes.bf_vs_df")

METHODS = ("bf_minibatch", "bf_sample", "df")
DEFAULTS = Path(__file__).with_suffix(".yaml")


def main(args: Optional[list[str]] = None) -> list[dict]:
    parser = study_parser(LocFTBF, __doc__, DEFAULTS)
    parser.add_argument("--n_edits", type=list[int], default=[50, 100, 200], help="Numbers of requests N to compare at.")
    parser.add_argument("--methods", type=list[str], default=list(METHODS), help=f"Pipelines to run: {METHODS}.")
    parser.add_argument("--bf_batch_size", type=int, default=100, help="Mini-batch size of bf_minibatch.")
    parser.add_argument("--df_steps", type=int, default=25, help="Most optimizer steps per request for df.")
    parser.add_argument("--out_dir", type=str, default="results/bf_vs_df", help="Where the table and plot go.")
    cfg = parser.parse_args(args)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    L.seed_everything(cfg.seed_everything)
    init = instantiate_study(parser, cfg)
    base: LocFTBF = init.model
    hf_model, tokenizer = base.model, base.tokenizer
    evaluator = init.eval
    data_args = {k: v for k, v in vars(cfg.data).items() if k not in ("limit", "batch_size", "shuffle", "requests")}
    all_requests = EditDataModule(**data_args, limit=max(cfg.n_edits)).load()
    if len(all_requests) < max(cfg.n_edits):
        parser.error(f"the data has {len(all_requests)} requests, fewer than N = {max(cfg.n_edits)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = ResumableTable(out / "bf_vs_df.csv", key=("method", "n_edits"))
    hparams = {k: v for k, v in vars(cfg.model).items() if k not in ("model", "tokenizer")}

    for n in sorted(cfg.n_edits):
        requests = all_requests[:n]
        if all(table.done(method=m, n_edits=n) for m in cfg.methods):
            continue
        log.info("N = %d: evaluating the unedited model", n)
        before = evaluator.evaluate(hf_model, tokenizer, requests)
        reference = evaluator.reference
        if not table.done(method="unedited", n_edits=n):
            table.add(study_row(before, method="unedited", n_edits=n))
        for method in cfg.methods:
            if table.done(method=method, n_edits=n):
                continue
            log.info("N = %d: %s", n, method)
            if method == "df":
                editor = DepthFirstFT(model=hf_model, tokenizer=tokenizer, steps=cfg.df_steps, **hparams)
                dm = EditDataModule(requests=requests, batch_size=1, shuffle=False)
                trainer_kwargs = {**vars(cfg.trainer), "max_epochs": 1}
            else:
                editor = LocFTBF(model=hf_model, tokenizer=tokenizer, **hparams)
                bs = cfg.bf_batch_size if method == "bf_minibatch" else 1
                dm = EditDataModule(requests=requests, batch_size=bs, shuffle=True, seed=cfg.seed_everything)
                trainer_kwargs = vars(cfg.trainer)
            figures = fit_and_score(editor, requests, dm, evaluator, reference, trainer_kwargs)
            table.add(study_row(figures, method=method, n_edits=n))

    rows = [r for r in table.rows if int(r["n_edits"]) in cfg.n_edits and r["method"] in (*cfg.methods, "unedited")]
    rows.sort(key=lambda r: (int(r["n_edits"]), r["method"]))
    columns = ["method", "n_edits", "reliability", "generalization", "locality", "perplexity", "edit_seconds", "epochs_run", "optimizer_steps"]
    title = f"Breadth-first vs depth-first on {base.base_model_name} (after-all, {protocol_label(evaluator)})"
    text = write_markdown(rows, columns, out / "bf_vs_df.md", title)
    edited = [r for r in rows if r["method"] != "unedited"]
    if edited:
        metrics = ["reliability", "generalization", "locality", "perplexity"]
        line_plot(rows, metrics, out / "bf_vs_df.png", title=title, reference_series="unedited")
    print(text)
    print(f"Wrote {out / 'bf_vs_df.csv'}, {out / 'bf_vs_df.md'}" + (f", {out / 'bf_vs_df.png'}" if edited else ""))
    return rows


if __name__ == "__main__":
    main()
