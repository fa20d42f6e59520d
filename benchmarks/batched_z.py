"""Batched vs one-by-one v*/z optimisation on the embedded model, in the same run.

    python benchmarks/batched_z.py                       # 32 CounterFact requests, MEMIT settings
    python benchmarks/batched_z.py --n 8 --layer 6 --site mlp_out
    python benchmarks/batched_z.py --steps 5 --max_templates 0   # a quick run on a loaded CPU

Optimises the z vectors of ``--n`` requests once as one batch (one forward per step, an
independent δ per request), once request by request with the same code, and once request by
request the plain way the ROME/MEMIT reference code does it (:func:`reference_values`: the whole
model and the log-softmax of the full-vocabulary logits at every position, every step), with
identical settings, and prints the speed ratios and the largest differences between the
resulting vectors.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def reference_values(model, tokenizer, request, layer: int, site: str, templates, settings):
    """One request's v*/z computed the plain way, as the ROME/MEMIT reference code does: every
    step runs the whole model on the request's rows with δ added by a hook at the fact token,
    takes the log-softmax of the full-vocabulary logits at every position and reads the target
    tokens and the KL prompt's fact token from it. Same rows, loss, Adam, clamp and stopping
    rule as :func:`lit_edit.closed_form.optimize_values`. Returns ``(z, steps)``."""
    from lit_edit.closed_form.hooks import first_tensor, replace_first
    from lit_edit.closed_form.keys import mlp_out_module
    from lit_edit.closed_form.values import _Rows
    from lit_edit.models import arch_for

    arch = arch_for(model)
    device = next(model.parameters()).device
    data = _Rows(tokenizer, [request], list(templates), settings.kl_prompt, settings.stop)
    ids, mask, fact = data.ids.to(device), data.mask.to(device), data.fact.to(device)
    module = model.get_submodule(arch.layers)[layer] if site == "block" else mlp_out_module(model, layer, arch)
    rows = torch.arange(ids.shape[0], device=device)
    state = {"delta": None, "h0": None}

    def hook(mod, args, output):
        h = first_tensor(output)
        if state["h0"] is None:
            state["h0"] = h[rows, fact].detach().float().clone()
        if state["delta"] is None:
            return output
        h = h.clone()
        h[rows, fact] = h[rows, fact] + state["delta"].to(h.dtype)
        return replace_first(output, h)

    handle = module.register_forward_hook(hook)
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        T, kl_row = data.n_templates, data.n_rewrite
        with torch.no_grad():
            ref_logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        ref_kl = ref_logp[kl_row, fact[kl_row]]
        h0 = state["h0"][0]
        delta = torch.zeros_like(h0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=settings.lr)
        steps = 0
        for it in range(settings.steps):
            state["delta"] = delta
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (rows, T, V)
            tok = logp[data.tgt_row.to(device), data.tgt_col.to(device), data.tgt_tok.to(device)]
            row_nll = torch.zeros(ids.shape[0], device=device).index_add(0, data.tgt_row.to(device), -tok)
            nll = (row_nll[:kl_row] / data.tgt_count[:kl_row].to(device).clamp_min(1)).sum() / T
            new_kl = logp[kl_row, fact[kl_row]]
            kl = (new_kl.exp() * (new_kl - ref_kl)).sum()
            loss = nll + settings.kl_factor * kl + settings.weight_decay * delta.norm() / h0.norm().pow(2)
            if float(loss.detach()) < settings.loss_tol or it == settings.steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = settings.clamp_norm_factor * h0.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
            steps += 1
    finally:
        handle.remove()
        for p, rg in zip(model.parameters(), requires):
            p.requires_grad_(rg)
    return (h0 + delta.detach())[None], steps


def compare(editor, requests, layer=None, site="block", steps=None, plain: bool = True, whole_rows: bool = True) -> dict:
    """Optimise the z vectors of ``requests`` batched and one by one with ``editor``'s settings
    (its model, templates and :meth:`value_settings`; ``steps`` overrides the step budget).
    ``whole_rows`` also times the batch with ``prefix_cache=False`` (every step over whole rows)."""
    from lit_edit.closed_form import optimize_values

    layer = layer if layer is not None else editor.edit_layers[-1]
    templates = [t for g in editor.context_templates() for t in g]
    settings = editor.value_settings()
    if steps is not None:
        settings = type(settings)(**{**settings.__dict__, "steps": steps})
    model, tok = editor.model, editor.tokenizer
    with torch.enable_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        batched = optimize_values(model, tok, requests, layer, site, templates, settings, progress=False)
        t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        singles = [optimize_values(model, tok, [r], layer, site, templates, settings, progress=False) for r in requests]
        t_single, c_single = time.perf_counter() - t0, time.process_time() - c0
    out_whole = {}
    if whole_rows:
        with torch.enable_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            whole = optimize_values(model, tok, requests, layer, site, templates, settings, progress=False, prefix_cache=False)
            t_whole, c_whole = time.perf_counter() - t0, time.process_time() - c0
        out_whole = {
            "seconds_whole_rows": round(t_whole, 2),
            "cpu_seconds_whole_rows": round(c_whole, 2),
            "prefix_cache_cpu_ratio": round(c_whole / c_batched, 2),
            "max_rel_diff_whole_rows": float(((batched.target - whole.target).norm(dim=1) / whole.target.norm(dim=1)).max()),
            "same_steps_whole_rows": bool(torch.equal(batched.steps, whole.steps)),
        }
    out_plain = {}
    if plain:
        with torch.enable_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            plain_rows = [reference_values(model, tok, r, layer, site, templates, settings) for r in requests]
            t_plain, c_plain = time.perf_counter() - t0, time.process_time() - c0
        z_plain = torch.cat([z for z, _ in plain_rows])
        rel_plain = (batched.target - z_plain).norm(dim=1) / z_plain.norm(dim=1)
        out_plain = {
            "seconds_plain": round(t_plain, 2),
            "cpu_seconds_plain": round(c_plain, 2),
            "plain_ratio": round(t_plain / t_batched, 2),
            "plain_cpu_ratio": round(c_plain / c_batched, 2),
            "max_rel_diff_plain": float(rel_plain.max()),
            "same_steps_plain": bool(torch.equal(batched.steps, torch.tensor([n for _, n in plain_rows]))),
        }
    z_single = torch.cat([s.target for s in singles])
    diff = (batched.target - z_single).abs()
    rel = (batched.target - z_single).norm(dim=1) / z_single.norm(dim=1)
    steps_single = torch.cat([s.steps for s in singles])
    return {
        "requests": len(requests),
        "layer": layer,
        "site": site,
        "templates": len(templates),
        "settings": settings.__dict__,
        "seconds_batched": round(t_batched, 2),
        "seconds_one_by_one": round(t_single, 2),
        "speed_ratio": round(t_single / t_batched, 2),
        "cpu_seconds_batched": round(c_batched, 2),
        "cpu_seconds_one_by_one": round(c_single, 2),
        "cpu_ratio": round(c_single / c_batched, 2),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(rel.max()),
        "max_abs_z": float(z_single.abs().max()),
        "same_steps": bool(torch.equal(batched.steps, steps_single)),
        "mean_steps": float(batched.steps.float().mean()),
        "mean_final_loss": float(batched.loss.mean()),
        **out_whole,
        **out_plain,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="counterfact")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=None, help="default: the MEMIT default's last layer")
    p.add_argument("--site", default="block", choices=["block", "mlp_out"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max_templates", type=int, default=None, help="keep at most this many sampled templates")
    p.add_argument("--out", default="results/batched_z.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from lit_edit.data import load_requests
    from lit_edit.editors import MEMIT
    from lit_edit.editors.closed_form import TemplateOptions

    torch.manual_seed(0)
    editor = MEMIT(model=args.model, templates=TemplateOptions(max_per_group=args.max_templates))
    requests = load_requests(args.data, limit=args.n, require_subject=True)
    out = {"model": args.model, **compare(editor, requests, args.layer, args.site, args.steps)}
    settings, layer, t_batched, t_single = out["settings"], out["layer"], out["seconds_batched"], out["seconds_one_by_one"]
    print(
        f"{len(requests)} requests, layer {layer} ({args.site}), {out['templates']} templates, "
        f"up to {settings['steps']} steps\n"
        f"batched:    {t_batched:8.1f} s\none by one: {t_single:8.1f} s\n"
        f"speed ratio (one-by-one / batched): {out['speed_ratio']:.2f}x\n"
        f"max |z_batched - z_single| = {out['max_abs_diff']:.3g} (max |z| {out['max_abs_z']:.3g}, "
        f"max relative {out['max_rel_diff']:.3g}); same step counts: {out['same_steps']}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
