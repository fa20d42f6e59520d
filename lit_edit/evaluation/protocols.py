"""The evaluation protocols, the figures each one produces and the evaluation timings.

Every figure name carries its protocol as a prefix (``prob/``, ``tok_acc/``, ``gen_em/``,
``ppl/``, ``kl/``, ``fluency/``, ``harness/<task>/<metric>``); the descriptions here are the ones recorded in every summary.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "FIGURES",
    "FLUENCY_TOKENS",
    "PER_BATCH",
    "PROTOCOLS",
    "TIMING",
    "check_protocols",
    "check_timing",
    "figure_description",
    "protocol_of",
]

PROTOCOLS: dict[str, str] = {
    "probability": "probability comparison: P(o|x) = exp(-mean token NLL of ' o' after x), teacher forced; ×100",
    "token_accuracy": "token accuracy: teacher forced, fraction of target tokens that are the argmax, mean over examples",
    "generation": "generation exact match: greedy, ≤{max_new_tokens} new tokens, stop at '.', newline or EOS, normalized",
    "perplexity": "perplexity: exp(token-weighted mean NLL) over {ppl_texts} texts from {ppl_corpus}, ≤{ppl_max_length} tokens each",
    "fluency": "fluency: n-gram entropy (2/3·H2 + 4/3·H3)/2 in bits ×100 of {fluency_tokens}-token greedy generations from the edit prompts",
    "kl": (
        "next-token KL(P_unedited ‖ P_edited) in nats at every predicted position of {kl_texts} texts from {ppl_corpus}, "
        "≤{ppl_max_length} tokens each; mean over tokens and 95th percentile; the unedited distribution is kept as its "
        "top-{kl_top_k} tokens + the tail's mass and the KL is that of the partition {{top-{kl_top_k} tokens, tail}}: "
        "a lower bound on the full KL, exact when {kl_top_k} covers the vocabulary; 0 for the unedited model by definition"
    ),
    "harness": "lm-evaluation-harness capability tasks on the in-memory model (HFLM, raw-text prompts), metrics as lm-eval reports them: {harness}",
}
"""The evaluation protocols, with the description recorded for each of their figures."""

FIGURES: dict[str, str] = {
    "prob/ES": "edit success: mean 1[P(target_new) > P(ground_truth)] on the edit prompt",
    "prob/EM": "edit magnitude: mean P(target_new) - P(ground_truth) on the edit prompt",
    "prob/PS": "paraphrase success: mean 1[P(target_new) > P(ground_truth)] on paraphrases",
    "prob/PM": "paraphrase magnitude: mean P(target_new) - P(ground_truth) on paraphrases",
    "prob/NS": "neighborhood success: mean 1[P(locality answer) > P(target_new)] on locality prompts",
    "prob/NM": "neighborhood magnitude: mean P(locality answer) - P(target_new) on locality prompts",
    "prob/S": "score: harmonic mean of ES, PS and NS",
    "tok_acc/reliability": "target_new after the edit prompt",
    "tok_acc/generalization": "target_new after each paraphrase",
    "tok_acc/locality": "argmax tokens on the locality answer agree with the reference (unedited) model's",
    "tok_acc/portability": "portability answer after its prompt",
    "gen_em/reliability": "generation from the edit prompt equals target_new",
    "gen_em/generalization": "generation from each paraphrase equals target_new",
    "gen_em/locality": "generation from each locality prompt equals its answer",
    "gen_em/locality_agreement": "generation from each locality prompt equals the reference (unedited) model's",
    "gen_em/portability": "generation from each portability prompt equals its answer",
    "fluency/ngram_entropy": "mean over the edit prompts",
}
"""What each figure measures (perplexity figures are named ``ppl/<corpus>``, KL figures
``kl/<corpus>`` and ``kl/<corpus>/p95``)."""

TIMING: dict[str, str] = {
    "after-all": "every request evaluated on the final model, after all edits (retention)",
    "immediate": (
        "each edit batch's requests evaluated right after that batch is applied (before any restore); "
        "figures are request-weighted means over the batches of the last epoch; perplexity, KL and "
        "fluency are measured once, on the final model"
    ),
}
"""The evaluation timings: when the requests are scored relative to the edits."""

PER_BATCH: tuple[str, ...] = ("probability", "token_accuracy", "generation")
"""Protocols scored per edit batch under ``immediate`` timing (the others run once, at the end)."""

FLUENCY_TOKENS = 64
"""Length of the free-running generations the fluency protocol scores."""

_PREFIXES = {
    "prob": "probability", "tok_acc": "token_accuracy", "gen_em": "generation", "ppl": "perplexity", "fluency": "fluency",
    "harness": "harness", "kl": "kl",
}


def protocol_of(figure: str) -> str:
    """The protocol that produced a figure (``prob/ES`` → ``probability``)."""
    prefix = figure.split("/", 1)[0]
    try:
        return _PREFIXES[prefix]
    except KeyError:
        raise ValueError(f"figure {figure!r} belongs to no protocol; prefixes: {sorted(_PREFIXES)}") from None


def figure_description(figure: str) -> str:
    """What ``figure`` measures."""
    if figure.startswith("harness/"):
        task, _, metric = figure[len("harness/"):].partition("/")
        return f"lm-evaluation-harness task {task}: {metric}"
    if figure.startswith("kl/"):
        corpus, _, stat = figure[len("kl/"):].partition("/")
        which = f"{stat[1:]}th percentile" if stat.startswith("p") else "mean"
        return f"{which} over the predicted tokens of {corpus} texts of KL(P_unedited ‖ P_edited) of the next token (nats)"
    return FIGURES.get(figure, "perplexity of the model on the corpus")


def check_protocols(protocols: Sequence[str] | str) -> tuple[str, ...]:
    """The protocols as a tuple without repeats (a comma-separated string is split); a clear
    error naming the valid ones for an unknown or empty selection."""
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"unknown evaluation protocol(s) {unknown or list(protocols)}; valid: {list(PROTOCOLS)}")
    return tuple(dict.fromkeys(protocols))


def check_timing(timing: str) -> str:
    if timing not in TIMING:
        raise ValueError(f"unknown evaluation timing {timing!r}; valid: {list(TIMING)}")
    return timing
