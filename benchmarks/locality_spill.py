"""Where an edit's locality losses come from: the neighbourhood score by kind of locality prompt.

    python benchmarks/locality_spill.py --edit checkpoints/edits/locft_bf \\
        --data wikibigedit --offset 200 --limit 200

Reads the requests a saved edit was made on, scores every locality prompt's answer against the
request's new target on the unedited model and again with the edit applied (the probability
protocol's comparison: mean token negative log-likelihood, teacher forced), and splits the
prompts into four groups:

* **same template**: the locality prompt is the request's own prompt with another subject in
  the subject's place ("Who owns Banavie railway station?" / "Who owns Blanca railway station?");
* **shares a subject word**: a word of the request's subject (three characters or more) occurs in
  the locality prompt ("Lisa Kaltenegger" / "Ernest Kaltenegger").

For each group it prints the number of prompts, NS before → after (%: the answer's NLL below the
new target's), the mean drop of the margin (target NLL − answer NLL, nats per token) and the mean
rise of the new target's log-probability. An edit that learned the relation loses NS on the
same-template prompts; one that keys on a word of the name, on the prompts that share it; one
that only moves every answer's format moves both NLLs alike and keeps NS. Writes the figures as
JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

GROUPS = (
    "same template, shares a subject word",
    "same template, no shared word",
    "other template, shares a subject word",
    "other template, no shared word",
)


def _words(text: str) -> list[str]:
    return [w.strip("\"'()[],.:;!?").lower() for w in text.split()]


def classify(prompt: str, subject: str, locality_prompt: str) -> str:
    """The group of one locality prompt of a request (``prompt`` holding ``subject``)."""
    at = prompt.find(subject)
    same = False
    if at >= 0:
        before, after = prompt[:at], prompt[at + len(subject):]
        same = len(locality_prompt) > len(before) + len(after) and locality_prompt.startswith(before) and locality_prompt.endswith(after)
    shown = set(_words(locality_prompt))
    shares = any(len(w) >= 3 and w in shown for w in _words(subject))
    return f"{'same' if same else 'other'} template, {'shares a subject word' if shares else 'no shared word'}"


def summarize(groups: Sequence[str], answer_before, target_before, answer_after, target_after) -> dict[str, dict[str, float]]:
    """Per group (and ``all``): prompts, NS before and after (%), mean margin drop and mean target
    log-probability rise (nats per token), from the mean token NLLs of each prompt's answer and
    new target before and after the edit."""
    out: dict[str, dict[str, float]] = {}
    for name in (*GROUPS, "all"):
        idx = [i for i, g in enumerate(groups) if name in (g, "all")]
        if not idx:
            continue
        n = len(idx)
        out[name] = {
            "prompts": n,
            "NS_before": 100.0 * sum(float(answer_before[i] < target_before[i]) for i in idx) / n,
            "NS_after": 100.0 * sum(float(answer_after[i] < target_after[i]) for i in idx) / n,
            "margin_drop": sum(float((target_before[i] - answer_before[i]) - (target_after[i] - answer_after[i])) for i in idx) / n,
            "target_rise": sum(float(target_before[i] - target_after[i]) for i in idx) / n,
        }
    return out


def table(figures: dict[str, dict[str, float]]) -> str:
    lines = ["| locality prompts | n | NS before → after | margin drop (nats/token) | target log-prob rise |", "|---|---|---|---|---|"]
    for name, f in figures.items():
        lines.append(f"| {name} | {f['prompts']} | {f['NS_before']:.1f} → {f['NS_after']:.1f} | "
                     f"{f['margin_drop']:.2f} | {f['target_rise']:.2f} |")
    return "\n".join(lines)


def main(argv: Any = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edit", required=True, help="a saved edit's directory (written by a recipe or save_edit)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="wikibigedit")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default="results/locality_spill.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from lit_edit.data import load_requests
    from lit_edit.edits import apply_edit
    from lit_edit.evaluation.scoring import score_pairs
    from lit_edit.models import load_causal_lm

    requests = load_requests(args.data, limit=args.limit, offset=args.offset, require_subject=True)
    rows = [(r, loc) for r in requests for loc in r.locality]
    if not rows:
        p.error(f"--data {args.data}: no request has a locality prompt")
    prompts = [loc.prompt for _, loc in rows]
    groups = [classify(r.prompt, r.subject, loc.prompt) for r, loc in rows]
    model, tokenizer = load_causal_lm(args.model)
    model.eval()

    def nll() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            answers, _ = score_pairs(model, tokenizer, prompts, [loc.answer for _, loc in rows], args.batch_size, with_argmax=False)
            targets, _ = score_pairs(model, tokenizer, prompts, [r.target_new for r, _ in rows], args.batch_size, with_argmax=False)
        return answers, targets

    answer_before, target_before = nll()
    apply_edit(model, args.edit)
    answer_after, target_after = nll()
    figures = summarize(groups, answer_before, target_before, answer_after, target_after)
    print(table(figures))
    result = {"edit": args.edit, "model": args.model, "data": f"{args.data}[{args.offset}:{args.offset + len(requests)}]",
              "groups": figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
