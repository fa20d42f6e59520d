"""Closed-form editors with and without the stop-aware v*/z target, side by side.

    LIT_EDIT_DATA=<dir> python benchmarks/stop_target.py --n 20 --max_templates 0 --steps 10
    python benchmarks/stop_target.py --n 100 --editors rome,memit --stops eos,.
    python benchmarks/stop_target.py --n 25 --offset 25 --editors rome --out results/rome_25.json   # one range
    python benchmarks/stop_target.py --merge results/rome_0.json results/rome_25.json --out results/rome.json

For each editor the same records are edited once per ``values.stop`` setting (``off`` and each
of ``--stops``): ROME single edits (edit, evaluate immediately, restore; ``run_single`` of
``benchmarks/closed_form_editors.py``) and MEMIT / EMMET in one batch (``run_batched``). Every
protocol (probability ES/PS/NS/S, token accuracy, generation exact match, locality agreement,
perplexity) is printed in one table, the unedited model beside them, and written as JSON.

It also looks at why greedy generation fails where teacher forcing succeeds: right after each
edit, the edit prompt is continued greedily without stop strings and the benchmark counts how
often the first generated token is the target's first token, how often all target tokens come
out, and what follows a fully generated target (EOS, ".", newline, "," or other text).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from closed_form_editors import _table, run_batched, run_single  # noqa: E402

log = logging.getLogger("benchmarks.stop_target")


def _follow_class(text: str, eos: bool) -> str:
    if eos:
        return "eos"
    s = text.lstrip(" ")
    if not s:
        return "nothing"
    for mark, name in ((".", "period"), ("\n", "newline"), (",", "comma")):
        if s.startswith(mark):
            return name
    return "other text"


class AnalysingEvaluator:
    """Wraps an :class:`~lit_edit.evaluation.Evaluator`: after each evaluation of the edited
    model it also continues every edit prompt greedily (no stop strings) and records, per
    request, the first token, the target tokens and what follows them."""

    def __init__(self, evaluation: Any, extra_tokens: int = 4):
        self.evaluation = evaluation
        self.extra_tokens = extra_tokens
        self.rows: list[dict[str, Any]] = []

    def evaluate(self, model, tokenizer, requests, **kwargs):
        result = self.evaluation.evaluate(model, tokenizer, requests, **kwargs)
        self.rows.extend(self.analyse(model, tokenizer, requests))
        return result

    @torch.no_grad()
    def analyse(self, model, tokenizer, requests) -> list[dict[str, Any]]:
        from lit_edit.data.tokenize import encode_prompt, encode_target

        device = next(model.parameters()).device
        out = []
        was_training = model.training
        model.eval()
        try:
            for r in requests:
                target = encode_target(tokenizer, r.target_new)
                ids = torch.tensor([encode_prompt(tokenizer, r.prompt)], device=device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                     max_new_tokens=len(target) + self.extra_tokens, eos_token_id=None,
                                     pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
                head = gen[: len(target)]
                rest = gen[len(target):]
                full = head == target
                row = {
                    "case_id": r.case_id,
                    "target": r.target_new,
                    "generated": tokenizer.decode(gen),
                    "first_token": bool(gen[:1] == target[:1]),
                    "all_target_tokens": full,
                    "correct_prefix_tokens": next((i for i, (a, b) in enumerate(zip(head, target)) if a != b), len(head)),
                    "target_tokens": len(target),
                }
                if full:
                    eos = bool(rest) and rest[0] == tokenizer.eos_token_id
                    row["after_answer"] = tokenizer.decode(rest)
                    row["after_class"] = _follow_class(tokenizer.decode(rest[:1]), eos)
                out.append(row)
        finally:
            model.train(was_training)
        return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Fractions over the analysed reliability prompts."""
    if not rows:
        return {}
    n = len(rows)
    full = [r for r in rows if r["all_target_tokens"]]
    first = [r for r in rows if r["first_token"]]
    multi = [r for r in rows if r["target_tokens"] > 1 and r["first_token"]]
    s = {
        "diag/first_token": len(first) / n,
        "diag/all_target_tokens": len(full) / n,
        "diag/rest_given_first (multi-token)": (sum(r["all_target_tokens"] for r in multi) / len(multi)) if multi else float("nan"),
    }
    counts = Counter(r["after_class"] for r in full)
    for k in ("eos", "period", "newline", "comma", "other text"):
        s[f"diag/after_answer={k}"] = counts.get(k, 0) / n
    return s


def merge(paths: list[str]) -> dict[str, Any]:
    """One result from runs on disjoint record ranges (``--offset``) with the same columns: every
    figure is the record-weighted mean, prob/S the harmonic mean of the merged ES, PS and NS, and
    the ``diag/*`` fractions are recomputed from the pooled per-record rows."""
    from lit_edit.evaluation.metrics import harmonic_mean

    runs = [json.loads(Path(x).read_text()) for x in paths]
    labels = list(runs[0]["metrics"])
    if any(list(r["metrics"]) != labels for r in runs):
        raise ValueError(f"runs with different columns cannot be merged: {[list(r['metrics']) for r in runs]}")
    total = sum(int(r["n"]) for r in runs)
    columns: dict[str, dict[str, float]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for label in labels:
        names = [k for k in runs[0]["metrics"][label] if not k.startswith("diag/")]
        col = {k: sum(float(r["metrics"][label][k]) * int(r["n"]) for r in runs) / total for k in names if k != "prob/S"}
        if all(k in col for k in ("prob/ES", "prob/PS", "prob/NS")):
            col["prob/S"] = float(harmonic_mean([col["prob/ES"], col["prob/PS"], col["prob/NS"]]))
        examples[label] = [row for r in runs for row in r["examples"][label]]
        columns[label] = {**col, **summarise(examples[label])}
    seconds = {k: round(sum(float(r["seconds"].get(k, 0.0)) for r in runs), 1) for k in runs[0]["seconds"]}
    settings = [r.get("settings", {}) for r in runs]
    return {"settings": settings, "merged": list(paths), "n": total, "metrics": columns, "seconds": seconds, "examples": examples}


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge the result files of runs on disjoint record ranges into --out and print the table")
    p.add_argument("--data", default="counterfact", help="data set name (resolved through $LIT_EDIT_DATA) or path")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--editors", default="rome,memit", help="comma list of rome, memit, emmet")
    p.add_argument("--stops", default="eos", help="comma list of values.stop settings compared with off ('eos', '.', '\\n')")
    p.add_argument("--max_templates", type=int, default=None, help="templates.max_per_group (default: config hub)")
    p.add_argument("--steps", type=int, default=None, help="values.steps (default: config hub)")
    p.add_argument("--n_samples", type=int, default=1000, help="statistics.n_samples of the editors")
    p.add_argument("--ppl_texts", type=int, default=20, help="perplexity texts (ROME evaluates them after every edit)")
    p.add_argument("--out", default="results/stop_target.json")
    args = p.parse_args(argv)
    if args.merge:
        out = merge(args.merge)
        print(f"{out['n']} records from {len(args.merge)} runs")
        print(_table(out["metrics"]))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
        return out
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)

    from lit_edit.data import load_requests
    from lit_edit.editors import EMMET, MEMIT, ROME
    from lit_edit.editors.closed_form import StatisticsOptions, TemplateOptions, ValueOptions
    from lit_edit.evaluation import Evaluator
    from lit_edit.models import load_causal_lm

    stops: list[Any] = [None] + [s.encode().decode("unicode_escape") for s in args.stops.split(",") if s]
    torch.manual_seed(0)
    model, tok = load_causal_lm(args.model)
    requests = load_requests(args.data, limit=args.n, offset=args.offset, require_subject=True)
    evaluation = Evaluator(protocols=["probability", "token_accuracy", "generation", "perplexity"], batch_size=16,
                           ppl_texts=args.ppl_texts)
    t0 = time.perf_counter()
    base = AnalysingEvaluator(evaluation)
    before = base.evaluate(model, tok, requests)
    columns: dict[str, dict[str, float]] = {"unedited": {**before.figures, **summarise(base.rows)}}
    reference = before.reference
    seconds: dict[str, float] = {"unedited_eval": round(time.perf_counter() - t0, 1)}
    examples: dict[str, list[dict[str, Any]]] = {"unedited": base.rows}
    classes = {"rome": ROME, "memit": MEMIT, "emmet": EMMET}
    for name in [e.strip() for e in args.editors.split(",") if e.strip()]:
        for stop in stops:
            label = f"{name.upper()} {'single' if name == 'rome' else 'batch'} stop={'off' if stop is None else repr(stop)}"
            editor = classes[name](model=model, tokenizer=tok, values=ValueOptions(steps=args.steps, stop=stop),
                                   statistics=StatisticsOptions(n_samples=args.n_samples),
                                   templates=TemplateOptions(max_per_group=args.max_templates))
            editor.prepare_statistics()
            wrapped = AnalysingEvaluator(evaluation)
            t0 = time.perf_counter()
            run = run_single if name == "rome" else run_batched
            metrics, diag = run(editor, wrapped, requests, reference)
            columns[label] = {**metrics, **summarise(wrapped.rows)}
            examples[label] = wrapped.rows
            seconds[label] = round(time.perf_counter() - t0, 1)
            print(f"{label}: {seconds[label]} s; layers {editor.edit_layers}; diagnostics "
                  + ", ".join(f"{k} {v:.4g}" for k, v in diag.items()), flush=True)
            del editor

    print(f"\n{args.data}: {len(requests)} records (offset {args.offset}), model {args.model}; evaluation immediate "
          f"(ROME single edits, restored after each; MEMIT/EMMET one batch); max_templates {args.max_templates}, "
          f"steps {args.steps}; perplexity on {args.ppl_texts} texts")
    print(_table(columns))
    out = {"settings": vars(args), "n": len(requests), "metrics": columns, "seconds": seconds, "examples": examples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    return out


if __name__ == "__main__":
    main()
