"""Speed of lit_edit's fast paths against plain references, measured side by side in one run.

    python benchmarks/speed.py                                         # every section (LocFT-BF at the published settings)
    python benchmarks/speed.py --sections locft                        # LocFT-BF only: 100 edits, 25 epochs, block 20
    python benchmarks/speed.py --sections locft --epochs 3 --n 20      # a quick look
    python benchmarks/speed.py --sections closed_form --closed_n 100 --closed_n_large 1000
    python benchmarks/speed.py --sections stats,values,evaluation --stats_texts 64 --eval_n 10
    python benchmarks/speed.py --dtype bfloat16 --device cuda          # on a GPU
    python benchmarks/speed.py --table results/speed.json              # print the table of an earlier run

One model (the embedded SmolLM2-135M by default) and the same CounterFact records serve every
section; each fast path is timed against a plain reference a few seconds apart, so every speed
figure is a ratio taken under the same machine load:

* ``locft``: LocFT-BF as lit_edit fits it (block-input cache, length groups, LM head at target
  positions, the Lightning loop) against the published LocFT-BF loop re-expressed in plain torch
  (Adam on the tuned tensor; at every step the whole model on the mini-batch padded to its
  longest row, full-vocabulary logits copied and scored by cross-entropy at every position, the
  prompt and padding masked afterwards; loss = mean target NLL), at the published settings: ``--n`` CounterFact edits in one mini-batch, ``--epochs``,
  lr 5e-4, block 20 ``mlp.down_proj``, ``min_loss`` 0 so both take every step. Both loss
  trajectories are recorded and compared. Also: depth-first FT per request at the hub location.
* ``stats``: key statistics of MEMIT's layers from ``--stats_texts`` Wikipedia texts: every layer
  from one forward with float32 products and float64 sums
  (:func:`lit_edit.stats.accumulate_second_moments`) against one float64 pass per layer
  (:func:`lit_edit.stats.accumulate_second_moment`); tokens/s per layer and the largest
  relative difference.
* ``values``: MEMIT's v*/z optimisation of ``--values_n`` requests batched against one by one
  with the same code, and against the plain per-request computation of the ROME/MEMIT
  reference code (whole model, full-vocabulary log-softmax at every position, every step;
  ``benchmarks/batched_z.py``).
* ``closed_form``: ROME per edit (``--rome_n`` requests) and MEMIT/EMMET per batch
  (``--closed_n``, and ``--closed_n_large`` if given) at the config hub's settings, with a table
  of phases (statistics, context templates, keys, v*/z, solve, apply; exclusive times).
  EMMET reuses MEMIT's v*/z of the same batch (same layers and settings).
* ``evaluation``: :class:`lit_edit.evaluation.Evaluator` with one protocol at a time on
  ``--eval_n`` CounterFact requests: seconds per request (per text for perplexity).

Every measurement records its peak resident memory (the process's, sampled; on CUDA the peak
allocated). Prints a table and writes JSON (``--out``, default ``results/speed.json``) stating
the CPU, threads, dtype, device and the load average at the start and end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("benchmarks.speed")

SECTIONS = ("locft", "stats", "values", "closed_form", "evaluation")
PROTOCOLS = ("probability", "token_accuracy", "generation", "perplexity")


# --------------------------------------------------------------------------- measuring


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


class Peak:
    """Peak memory while a block runs: CUDA's peak allocated, else the process's resident set
    (sampled every 20 ms). ``mb`` after the block."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, 0.0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self._stop = threading.Event()
        self._peak = proc.memory_info().rss

        def sample():
            while not self._stop.wait(0.02):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        import psutil

        self.mb = max(self._peak, psutil.Process().memory_info().rss) / 2**20


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """``(result, seconds, peak MB, CPU seconds)`` of ``fn()``: wall-clock seconds and this
    process's CPU seconds (all its threads; steadier than wall time on a shared machine)."""
    with Peak(device) as peak:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return result, seconds, peak.mb, cpu


class Phases:
    """Exclusive wall time per phase: wrapped functions charge their time to their phase, minus
    the time of wrapped functions they call."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any):
            self._stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - t0
                inner = self._stack.pop()[0]
                self.seconds[phase] = self.seconds.get(phase, 0.0) + total - inner
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if self._stack:
                    self._stack[-1][0] += total

        return wrapper

    @contextmanager
    def patch(self, target: Any, name: str, phase: str):
        original = getattr(target, name)
        setattr(target, name, self.wrap(phase, original))
        try:
            yield
        finally:
            if isinstance(target, type) or not hasattr(type(target), name):
                setattr(target, name, original)
            else:
                delattr(target, name)  # an instance attribute shadowing the method


# --------------------------------------------------------------------------- LocFT-BF


def reference_locft(model, tokenizer, requests, weight_name: str, epochs: int, batch_size: int, lr: float, seed: int):
    """The published LocFT-BF loop, re-expressed: Adam on one tensor; at every step the whole
    model runs on the mini-batch padded to its longest row, the logits of every position are
    shifted into a contiguous copy and scored by a full-vocabulary cross-entropy at every
    position, and the prompt and padding positions are masked out afterwards; loss = mean over
    requests of the mean NLL of each request's target tokens (EOS appended). Returns (per-step
    losses, per-epoch seconds); the tensor is left tuned."""
    from lit_edit.data.tokenize import IGNORE_INDEX, encode_pairs

    device = next(model.parameters()).device
    weight = dict(model.named_parameters())[weight_name]
    model.requires_grad_(False)
    weight.requires_grad_(True)
    model.train()
    opt = torch.optim.Adam([weight], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses, epoch_seconds, epoch_cpu = [], [], []
    for _ in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        order = torch.randperm(len(requests), generator=g).tolist()
        for s in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[s : s + batch_size]]
            enc = encode_pairs(tokenizer, [r.prompt for r in batch], [r.target_new for r in batch], append_eos=True)
            ids = enc["input_ids"].to(device)
            logits = model(input_ids=ids, attention_mask=enc["attention_mask"].to(device)).logits
            shift_logits = logits[:, :-1, :].contiguous()
            nll = torch.nn.functional.cross_entropy(
                shift_logits.view(-1, shift_logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), -1)
            label_mask = (enc["labels"][:, 1:] != IGNORE_INDEX).to(device)
            loss = ((nll * label_mask).sum(1) / label_mask.sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        epoch_seconds.append(time.perf_counter() - t0)
        epoch_cpu.append(time.process_time() - c0)
    weight.requires_grad_(False)
    model.eval()
    return losses, epoch_seconds, epoch_cpu


def run_locft(model, tokenizer, args, device) -> dict[str, Any]:
    import lightning as L

    from lit_edit.data import EditDataModule, load_requests
    from lit_edit.editors import DepthFirstFT, LocFTBF

    requests = load_requests(args.data, limit=args.n)
    layer = args.locft_layer
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    original = dict(model.named_parameters())[name].detach().clone()

    class Epochs(L.Callback):
        def __init__(self):
            self.seconds, self.cpu, self.losses, self._t, self._c = [], [], [], 0.0, 0.0

        def on_train_epoch_start(self, trainer, pl_module):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(trainer.callback_metrics["train/loss"]))

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)

    def lit_edit_fit(cache: bool) -> dict[str, Any]:
        editor = LocFTBF(
            model=model, tokenizer=tokenizer, target_modules=["mlp.down_proj"], layers_to_transform=[layer],
            lr=args.lr, min_loss=0.0, cache_block_inputs=cache,
        )
        record = Epochs()
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record],
        )
        data = EditDataModule(requests=list(requests), batch_size=args.n, shuffle=True, seed=args.seed)
        cache_mb = {}
        stop = editor.stop_block_input_cache

        def keep_size():
            if editor.block_inputs is not None:
                cache_mb["mb"] = editor.block_inputs.nbytes / 2**20
            stop()

        editor.stop_block_input_cache = keep_size
        _, seconds, peak, cpu = timed(device, lambda: trainer.fit(editor, datamodule=data))
        model.to(device)  # the Trainer hands the module back on the CPU at the end of fit
        editor.restore()
        return {"seconds": seconds, "cpu_seconds": cpu, "epoch_seconds": record.seconds, "epoch_cpu_seconds": record.cpu,
                "losses": record.losses, "peak_mb": peak,
                "cache_mb": cache_mb.get("mb")}

    out: dict[str, Any] = {"requests": len(requests), "epochs": args.epochs, "mini_batch": args.n, "lr": args.lr,
                           "tensor": name}
    log.info("LocFT-BF (lit_edit): %d requests, %d epochs, %s", len(requests), args.epochs, name)
    out["fast"] = lit_edit_fit(cache=True)
    if args.locft_no_cache:
        log.info("LocFT-BF (lit_edit, cache_block_inputs=False)")
        out["no_cache"] = lit_edit_fit(cache=False)
    log.info("LocFT-BF (published loop, plain torch)")
    (losses, epoch_seconds, epoch_cpu), seconds, peak, cpu = timed(
        device, lambda: reference_locft(model, tokenizer, requests, name, args.epochs, args.n, args.lr, args.seed)
    )
    with torch.no_grad():
        dict(model.named_parameters())[name].copy_(original)
    out["reference"] = {"seconds": seconds, "cpu_seconds": cpu, "epoch_seconds": epoch_seconds,
                        "epoch_cpu_seconds": epoch_cpu, "losses": losses, "peak_mb": peak}
    fast = out["fast"]
    out["speed_ratio"] = seconds / fast["seconds"]
    out["cpu_ratio"] = cpu / fast["cpu_seconds"]
    n = len(losses)
    out["max_loss_diff"] = max(abs(a - b) for a, b in zip(fast["losses"][:n], losses)) if n else None
    out["final_loss"] = {"fast": fast["losses"][-1], "reference": losses[-1]}

    # depth-first FT at the config hub's location (per request)
    df_requests = requests[: args.df_n]
    editor = DepthFirstFT(model=model, tokenizer=tokenizer, steps=args.df_steps, min_loss=0.0)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    data = EditDataModule(requests=list(df_requests), batch_size=1, shuffle=False)
    _, seconds, peak, cpu = timed(device, lambda: trainer.fit(editor, datamodule=data))
    model.to(device)
    location = editor.parameter_mask()
    editor.restore()
    out["depth_first"] = {"requests": len(df_requests), "steps": args.df_steps, "seconds": seconds,
                          "seconds_per_request": seconds / max(len(df_requests), 1), "peak_mb": peak,
                          "location": f"{location.target_modules} blocks {location.layers_to_transform}"}
    return out


# --------------------------------------------------------------------------- statistics


def run_stats(model, tokenizer, args, device) -> dict[str, Any]:
    import lit_edit.stats as stats
    from lit_edit.data.corpus import load_texts
    from lit_edit.editors import MEMIT

    layers = MEMIT(model=model, tokenizer=tokenizer).edit_layers
    texts = load_texts("wiki:train", split="train", limit=args.stats_texts)
    rows = [r for r in (tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in texts) if r]
    modules = [model.get_submodule(f"model.layers.{layer}.mlp.down_proj") for layer in layers]
    pad = tokenizer.pad_token_id
    out: dict[str, Any] = {"layers": layers, "texts": len(rows), "tokens": sum(map(len, rows))}

    def reference():
        return [stats.accumulate_second_moment(model, m, rows, pad, torch.float64, 8, False) for m in modules]

    ref, seconds, peak, cpu = timed(device, reference)
    count = ref[0][1]
    out["reference"] = {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak,
                        "tokens_per_s_per_layer": count * len(layers) / seconds}
    new_fn = getattr(stats, "accumulate_second_moments", None)
    if new_fn is None:
        out["new"] = None
        out["note"] = "lit_edit.stats.accumulate_second_moments is not available in this tree"
        return out
    (totals, new_count), seconds, peak, cpu = timed(
        device, lambda: new_fn(model, modules, rows, pad, torch.float64, torch.float32, 8, False)
    )
    out["new"] = {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak,
                  "tokens_per_s_per_layer": new_count * len(layers) / seconds}
    out["speed_ratio"] = out["reference"]["seconds"] / seconds
    out["cpu_ratio"] = out["reference"]["cpu_seconds"] / cpu
    out["max_rel_diff"] = max(float((t - r[0]).abs().max() / r[0].abs().max()) for t, r in zip(totals, ref))
    out["same_count"] = new_count == count
    return out


# --------------------------------------------------------------------------- v*/z


def run_values(model, tokenizer, args, device) -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from batched_z import compare

    from lit_edit.data import load_requests
    from lit_edit.editors import MEMIT
    from lit_edit.editors.closed_form import TemplateOptions

    editor = MEMIT(model=model, tokenizer=tokenizer, templates=TemplateOptions(max_per_group=args.values_templates))
    requests = load_requests(args.data, limit=args.values_n, require_subject=True)
    (result), seconds, peak, cpu = timed(device, lambda: compare(editor, requests, steps=args.values_steps))
    result["peak_mb"] = peak
    return result


# --------------------------------------------------------------------------- closed form


def _closed_form_phases(editor, editor_module, requests, device, values=None) -> dict[str, Any]:
    """Time one ``editor.edit(requests)`` (after the statistics and templates are ready), by phase."""
    phases = Phases()
    patches = [
        (editor, "key_statistics", "statistics"),
        (editor, "prepare_statistics", "statistics"),
        (editor, "context_templates", "context templates"),
        (editor, "write_update", "apply"),
    ]
    for fn in ("keys_at", "block_outputs_at", "optimize_values"):
        if hasattr(editor_module, fn):
            patches.append((editor_module, fn, "v*/z" if fn == "optimize_values" else "keys"))
    for fn in ("rome_solve",):
        if hasattr(editor_module, fn):
            patches.append((editor_module, fn, "solve"))
    if hasattr(type(editor), "solve"):
        patches.append((editor, "solve", "solve"))
    if hasattr(type(editor), "target_values"):
        patches.append((editor, "target_values", "v*/z"))
    from contextlib import ExitStack

    with ExitStack() as stack:
        for target, name, phase in patches:
            stack.enter_context(phases.patch(target, name, phase))
        t0 = time.perf_counter()
        editor.prepare_statistics()
        editor.context_templates()
        setup = time.perf_counter() - t0
        with Peak(device) as peak:
            t0 = time.perf_counter()
            diag = editor.edit(requests) if values is None else editor.edit(requests, values=values)
            seconds = time.perf_counter() - t0
    editor.restore()
    accounted = sum(phases.seconds.values())
    return {
        "requests": len(requests),
        "seconds_setup": setup,
        "seconds_edit": seconds,
        "seconds_per_request": seconds / len(requests),
        "phases": {k: round(v, 3) for k, v in sorted(phases.seconds.items(), key=lambda kv: -kv[1])},
        "other": round(setup + seconds - accounted, 3),
        "peak_mb": peak.mb,
        "v_loss": diag.get("v_loss"),
    }


def run_closed_form(model, tokenizer, args, device) -> dict[str, Any]:
    import lit_edit.editors.memit as memit_mod
    import lit_edit.editors.rome as rome_mod
    from lit_edit.data import load_requests
    from lit_edit.editors import EMMET, MEMIT, ROME

    out: dict[str, Any] = {}
    sizes = [args.closed_n] + ([args.closed_n_large] if args.closed_n_large else [])
    requests = load_requests(args.data, limit=max(sizes + [args.rome_n]), require_subject=True)
    rome = ROME(model=model, tokenizer=tokenizer)
    log.info("ROME: %d single edits", args.rome_n)
    rows = [_closed_form_phases(rome, rome_mod, [r], device) for r in requests[: args.rome_n]]
    phases: dict[str, float] = {}
    for r in rows:
        for k, v in r["phases"].items():
            phases[k] = phases.get(k, 0.0) + v
    out["rome"] = {
        "requests": len(rows), "layers": rome.edit_layers,
        "seconds_per_request": sum(r["seconds_edit"] for r in rows) / len(rows),
        "seconds_setup_first": rows[0]["seconds_setup"],
        "phases_per_request": {k: round(v / len(rows), 3) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "peak_mb": max(r["peak_mb"] for r in rows),
    }
    memit = MEMIT(model=model, tokenizer=tokenizer)
    emmet = EMMET(model=model, tokenizer=tokenizer)
    for size in sizes:
        batch = requests[:size]
        log.info("MEMIT: one batch of %d", size)
        got: dict[str, Any] = {}
        original_target_values = memit.target_values

        def keep(reqs, _orig=original_target_values, got=got):
            got["values"] = _orig(reqs)
            return got["values"]

        memit.target_values = keep
        try:
            out[f"memit_{size}"] = {"layers": memit.edit_layers, **_closed_form_phases(memit, memit_mod, batch, device)}
        finally:
            memit.__dict__.pop("target_values", None)
        log.info("EMMET: one batch of %d (v*/z of the MEMIT run)", size)
        out[f"emmet_{size}"] = {"layers": emmet.edit_layers, "values": "shared with MEMIT",
                                **_closed_form_phases(emmet, memit_mod, batch, device, values=got["values"])}
    return out


# --------------------------------------------------------------------------- evaluation


def run_evaluation(model, tokenizer, args, device) -> dict[str, Any]:
    from lit_edit.data import load_requests
    from lit_edit.evaluation import Evaluator

    requests = load_requests(args.data, limit=args.eval_n, require_subject=True)
    out: dict[str, Any] = {"requests": len(requests)}
    for protocol in args.protocols:
        evaluator = Evaluator(protocols=[protocol], ppl_texts=args.ppl_texts)  # perplexity: reading the texts included
        _, seconds, peak, cpu = timed(device, lambda ev=evaluator: ev.evaluate(model, tokenizer, requests))
        per = args.ppl_texts if protocol == "perplexity" else len(requests)
        out[protocol] = {"seconds": seconds, "cpu_seconds": cpu, "per": "text" if protocol == "perplexity" else "request", "count": per,
                         "seconds_each": seconds / per, "peak_mb": peak}
    return out


# --------------------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"machine: {m['cpu']} ({m['cpu_count']} CPUs), {m['threads']} threads, torch {m['torch']}; "
                 f"model {result['model']} {result['dtype']} on {result['device']}; "
                 f"load average {m['load_average_start'][0]:.1f} -> {m.get('load_average_end', [float('nan')])[0]:.1f}")
    head = f"{'measurement':<46} {'fast':>10} {'reference':>10} {'ratio':>7} {'peak MB':>15}"
    lines += [head, "-" * len(head)]

    def row(name, fast, ref=None, ratio=None, peak=""):
        f = f"{fast:10.2f}" if isinstance(fast, (int, float)) else f"{fast or '-':>10}"
        r = f"{ref:10.2f}" if isinstance(ref, (int, float)) else f"{ref or '':>10}"
        q = f"{ratio:6.2f}x" if isinstance(ratio, (int, float)) else f"{ratio or '':>7}"
        lines.append(f"{name:<46} {f} {r} {q} {peak:>15}")

    s = result["sections"]
    if "locft" in s:
        a = s["locft"]
        fast, ref = a["fast"], a["reference"]
        row(f"LocFT-BF fit, s ({a['requests']} edits, {a['epochs']} ep, block "
            f"{a['tensor'].split('.')[2]})", fast["seconds"], ref["seconds"], a["speed_ratio"],
            f"{fast['peak_mb']:.0f}/{ref['peak_mb']:.0f}")
        later_fast = fast["epoch_seconds"][1:] or fast["epoch_seconds"]
        later_ref = ref["epoch_seconds"][1:] or ref["epoch_seconds"]
        mf, mr = sum(later_fast) / len(later_fast), sum(later_ref) / len(later_ref)
        row("  s per epoch (first)", fast["epoch_seconds"][0], ref["epoch_seconds"][0],
            ref["epoch_seconds"][0] / fast["epoch_seconds"][0])
        row("  s per epoch (later, mean)", mf, mr, mr / mf)
        if "cpu_seconds" in fast:
            row("  CPU s (process, all threads)", fast["cpu_seconds"], ref["cpu_seconds"], a["cpu_ratio"])
            later_fast = fast["epoch_cpu_seconds"][1:] or fast["epoch_cpu_seconds"]
            later_ref = ref["epoch_cpu_seconds"][1:] or ref["epoch_cpu_seconds"]
            mf, mr = sum(later_fast) / len(later_fast), sum(later_ref) / len(later_ref)
            row("  CPU s per epoch (later, mean)", mf, mr, mr / mf)
        row("  final loss / max |loss difference|", f"{a['final_loss']['fast']:.4f}", f"{a['final_loss']['reference']:.4f}",
            f"{a['max_loss_diff']:.1e}")
        if fast.get("cache_mb") is not None:
            row("  block-input cache, MB", fast["cache_mb"])
        if "no_cache" in a:
            nc = a["no_cache"]
            row("  lit_edit without the cache, s", nc["seconds"], ref["seconds"], ref["seconds"] / nc["seconds"],
                f"{nc['peak_mb']:.0f}")
        d = a["depth_first"]
        row(f"depth-first FT, s per request ({d['steps']} steps)", d["seconds_per_request"], peak=f"{d['peak_mb']:.0f}")
    if "stats" in s:
        b = s["stats"]
        label = f"statistics, layers {b['layers']} ({b['tokens']} tokens), s"
        if b.get("new"):
            row(label, b["new"]["seconds"], b["reference"]["seconds"], b["speed_ratio"],
                f"{b['new']['peak_mb']:.0f}/{b['reference']['peak_mb']:.0f}")
            if "cpu_seconds" in b["new"]:
                row("  CPU s (process, all threads)", b["new"]["cpu_seconds"], b["reference"]["cpu_seconds"], b["cpu_ratio"])
            row("  tokens/s per layer", b["new"]["tokens_per_s_per_layer"], b["reference"]["tokens_per_s_per_layer"])
            row("  max relative difference", f"{b['max_rel_diff']:.1e}")
        else:
            row(label, "n/a", b["reference"]["seconds"], None, f"{b['reference']['peak_mb']:.0f}")
    if "values" in s:
        c = s["values"]
        row(f"v*/z, {c['requests']} requests ({c['templates']} templates), s", c["seconds_batched"],
            c["seconds_one_by_one"], c["speed_ratio"], f"{c['peak_mb']:.0f}")
        if "cpu_ratio" in c:
            row("  CPU s (process, all threads)", c["cpu_seconds_batched"], c["cpu_seconds_one_by_one"], c["cpu_ratio"])
        if "plain_ratio" in c:
            row("  vs plain per-request (whole model, full logits), s", c["seconds_batched"], c["seconds_plain"],
                c["plain_ratio"])
            row("  vs plain per-request, CPU s", c["cpu_seconds_batched"], c["cpu_seconds_plain"], c["plain_cpu_ratio"])
            row("  max relative z difference (plain)", f"{c['max_rel_diff_plain']:.1e}")
        if "seconds_whole_rows" in c:
            row("  vs the same batch over whole rows (no prefix cache), s", c["seconds_batched"], c["seconds_whole_rows"],
                round(c["seconds_whole_rows"] / c["seconds_batched"], 2))
            row("  vs whole rows, CPU s", c["cpu_seconds_batched"], c["cpu_seconds_whole_rows"], c["prefix_cache_cpu_ratio"])
        row("  max relative z difference", f"{c['max_rel_diff']:.1e}")
    if "closed_form" in s:
        d = s["closed_form"]
        for key, v in d.items():
            if not isinstance(v, dict):
                continue
            if key == "rome":
                row(f"ROME, s per edit (block {v['layers']})", v["seconds_per_request"], peak=f"{v['peak_mb']:.0f}")
                phases = v["phases_per_request"]
            else:
                name = key.replace("_", ", batch of ").upper().replace("BATCH OF", "batch of")
                row(f"{name}, s per batch", v["seconds_edit"], peak=f"{v['peak_mb']:.0f}")
                row("  s per edit", v["seconds_per_request"])
                phases = v["phases"]
            total = sum(phases.values()) or 1.0
            for phase, sec in phases.items():
                row(f"  {phase}", sec, None, f"{100 * sec / total:5.1f}%")
    if "evaluation" in s:
        e = s["evaluation"]
        for protocol in PROTOCOLS:
            if protocol in e:
                v = e[protocol]
                row(f"evaluation {protocol}, s per {v['per']} ({v['count']})", v["seconds_each"], peak=f"{v['peak_mb']:.0f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, any of {', '.join(SECTIONS)}")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="counterfact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=100, help="LocFT-BF edits (one mini-batch)")
    p.add_argument("--epochs", type=int, default=25, help="LocFT-BF epochs (published: 25)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--locft_layer", type=int, default=20)
    p.add_argument("--locft_no_cache", action="store_true", help="also time lit_edit with cache_block_inputs=False")
    p.add_argument("--df_n", type=int, default=3, help="depth-first FT requests")
    p.add_argument("--df_steps", type=int, default=25)
    p.add_argument("--stats_texts", type=int, default=64)
    p.add_argument("--values_n", type=int, default=16, help="v*/z requests (the MEMIT recipe optimises 16 at a time)")
    p.add_argument("--values_steps", type=int, default=5)
    p.add_argument("--values_templates", type=int, default=None, help="keep at most this many sampled templates per group")
    p.add_argument("--rome_n", type=int, default=1)
    p.add_argument("--closed_n", type=int, default=2, help="MEMIT/EMMET batch size (e.g. 100)")
    p.add_argument("--closed_n_large", type=int, default=None, help="a second, larger batch (e.g. 1000)")
    p.add_argument("--eval_n", type=int, default=10)
    p.add_argument("--ppl_texts", type=int, default=10)
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--out", default="results/speed.json")
    p.add_argument("--table", default=None, help="print the table of a JSON this command wrote, and exit")
    args = p.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(table(result))
        return result
    args.protocols = [x for x in args.protocols.split(",") if x]
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from lit_edit.models import load_causal_lm

    device = torch.device(args.device)
    model, tokenizer = load_causal_lm(args.model, None, args.dtype)
    model.to(device).eval()
    result: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "device": str(device), "machine": machine(),
                              "settings": vars(args), "sections": {}}
    runners = {"locft": run_locft, "stats": run_stats, "values": run_values, "closed_form": run_closed_form,
               "evaluation": run_evaluation}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in sections:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model.to(device)  # every section starts with the model on the measured device
        result["sections"][name] = runners[name](model, tokenizer, args, device)
        result["sections"][name]["section_seconds"] = time.perf_counter() - t0
        log.info("section %s done in %.0f s", name, time.perf_counter() - t0)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
