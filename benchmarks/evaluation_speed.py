"""Time one evaluation (all four default protocols) of the embedded model on edit requests.

    LIT_EDIT_DATA=/work/shared/data python benchmarks/evaluation_speed.py            # 200 CounterFact requests
    python benchmarks/evaluation_speed.py --n 20 --out results/eval_speed_small.json

Runs ``Evaluator(protocols).evaluate(model, tokenizer, requests)`` once, without the
unedited-evaluation disk cache, and prints the wall-clock seconds of the whole call and of each
phase (teacher forcing for ``probability`` + ``token_accuracy``, ``generation``,
``perplexity``), every figure, and the machine, threads and dtype. Writes the same as JSON
(figures at full precision, plus the locality reference: argmax ids and generations), so two
runs, e.g. of two commits on the same machine, can be compared figure by figure with
``--compare``:

    python benchmarks/evaluation_speed.py --compare results/eval_speed_base.json results/eval_speed_new.json

The script uses only the public evaluation API, so it runs unchanged on older versions of the
toolkit.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

PROTOCOLS = ("probability", "token_accuracy", "generation", "perplexity")


def _timed(table: dict, name: str, fn, cpu_table: dict = None):
    """``fn`` adding its wall seconds to ``table[name]`` (and its process CPU seconds to
    ``cpu_table[name]``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            table[name] = table.get(name, 0.0) + time.perf_counter() - t0
            if cpu_table is not None:
                cpu_table[name] = cpu_table.get(name, 0.0) + time.process_time() - c0

    return wrapper


def run(args) -> dict:
    import lit_edit
    from lit_edit.data import load_requests
    from lit_edit.evaluation import Evaluator
    from lit_edit.evaluation import evaluator as evaluator_module
    from lit_edit.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model, dtype=args.dtype)
    requests = load_requests(args.data, limit=args.n)
    evaluator = Evaluator(protocols=args.protocols.split(","))
    phases: dict[str, float] = {}
    phases_cpu: dict[str, float] = {}
    # phase timings: the evaluator's teacher-forced and generation steps (and, where the two share
    # one pass over each prompt, that pass) and its perplexity scorer
    if hasattr(Evaluator, "_prompt_pass"):
        Evaluator._prompt_pass = _timed(phases, "one pass per prompt (teacher forcing + generation)", Evaluator._prompt_pass,
                                        phases_cpu)
    Evaluator._teacher_forced = _timed(phases, "teacher_forced (probability + token_accuracy)", Evaluator._teacher_forced,
                                       phases_cpu)
    Evaluator._generation = _timed(phases, "generation", Evaluator._generation, phases_cpu)
    evaluator_module.text_nll = _timed(phases, "perplexity", evaluator_module.text_nll, phases_cpu)
    t0, c0 = time.perf_counter(), time.process_time()
    result = evaluator.evaluate(model, tokenizer, requests)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ref = result.reference
    record = {
        "lit_edit": str(Path(lit_edit.__file__).resolve().parent.parent),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "model": args.model,
        "data": args.data,
        "n": len(requests),
        "protocols": list(evaluator.protocols),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_average": os.getloadavg(),
        "phases": phases,
        "phases_cpu": phases_cpu,
        "figures": result.figures,
        "reference": {
            "locality_argmax": {f"{p} ||| {a}": ids.tolist() for (p, a), ids in ref.locality_argmax.items()},
            "locality_generations": dict(ref.locality_generations),
        },
    }
    print(f"lit_edit from {record['lit_edit']}; {record['machine']}, {record['threads']} threads, {args.dtype}")
    print(f"{len(requests)} requests, protocols {','.join(evaluator.protocols)}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU")
    for name, s in phases.items():
        print(f"  {name:<52} {s:8.1f} s wall {phases_cpu.get(name, float('nan')):8.1f} s CPU")
    for name, value in sorted(result.figures.items()):
        print(f"  {name:<28} {value!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False))
        print(f"written {args.out}")
    return record


def compare(a_path: str, b_path: str) -> dict:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    print(f"{'figure':<28} {'A':>22} {'B':>22} {'|B-A|':>10}")
    worst = 0.0
    for name in sorted(set(a["figures"]) | set(b["figures"])):
        x, y = a["figures"].get(name), b["figures"].get(name)
        diff = abs(x - y) if x is not None and y is not None else float("nan")
        worst = max(worst, diff) if diff == diff else worst
        print(f"{name:<28} {x!r:>22} {y!r:>22} {diff:10.2e}")
    ra, rb = a["reference"], b["reference"]
    gen_diff = [k for k in ra["locality_generations"] if ra["locality_generations"][k] != rb["locality_generations"].get(k)]
    arg_diff = [k for k in ra["locality_argmax"] if ra["locality_argmax"][k] != rb["locality_argmax"].get(k)]
    print(f"largest figure difference: {worst:.3e}")
    print(f"locality generations that differ: {len(gen_diff)} of {len(ra['locality_generations'])}")
    print(f"locality argmax rows that differ: {len(arg_diff)} of {len(ra['locality_argmax'])}")
    print(f"wall: A {a['seconds']:.1f} s, B {b['seconds']:.1f} s, A/B = {a['seconds'] / b['seconds']:.2f}x")
    if "cpu_seconds" in a and "cpu_seconds" in b:
        print(f"CPU: A {a['cpu_seconds']:.1f} s, B {b['cpu_seconds']:.1f} s, A/B = {a['cpu_seconds'] / b['cpu_seconds']:.2f}x")
    for key, label in (("phases", "wall"), ("phases_cpu", "CPU")):
        pa, pb = a.get(key) or {}, b.get(key) or {}
        if not pa or not pb:
            continue
        print(f"phases ({label} seconds; a phase nested in another is counted in both):")
        for name in dict.fromkeys([*pa, *pb]):
            x, y = pa.get(name), pb.get(name)
            ratio = f"A/B = {x / y:.2f}x" if x and y and y > 0.5 else ""
            print(f"  {name:<52} A {x if x is not None else float('nan'):8.1f}  B {y if y is not None else float('nan'):8.1f}  {ratio}")
    return {"max_figure_diff": worst, "generations_differ": len(gen_diff), "argmax_differ": len(arg_diff)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="counterfact")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--out", default="results/evaluation_speed.json")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two earlier runs and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.compare:
        return compare(*args.compare)
    return run(args)


if __name__ == "__main__":
    main()
