"""Batched vs one-by-one v*/z optimisation on the embedded model, in the same run.

    python benchmarks/batched_z.py                       # 32 CounterFact requests, MEMIT settings
    python benchmarks/batched_z.py --n 8 --layer 6 --site mlp_out
    python benchmarks/batched_z.py --steps 5 --max_templates 0   # a quick run on a loaded CPU

Optimises the z vectors of ``--n`` requests once as one batch (one forward per step, an
independent δ per request) and once request by request, with identical settings, and prints
the wall-clock speed ratio and the largest difference between the resulting vectors.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def compare(editor, requests, layer=None, site="block", steps=None) -> dict:
    """Optimise the z vectors of ``requests`` batched and one by one with ``editor``'s settings
    (its model, templates and :meth:`value_settings`; ``steps`` overrides the step budget)."""
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
