"""Second-moment statistics ``C = E[k kᵀ]`` of the keys at a layer, with an on-disk cache.

Keys are the inputs of a block's MLP output projection (any module can be named) at every
non-padding token of a text corpus: the offline Wikipedia extracts (train split) by default, or
any source :func:`lit_edit.data.corpus.load_texts` reads (a local text/JSON file, a list of
strings, a ``datasets`` object). Sums accumulate in float64 (or float32) and the forward stops
right after the hooked module.

The computation is a plain loop on the model's device (a progress bar over the text batches),
so it can run anywhere, also inside a running ``fit``. Results are cached under
``cache_root()/stats/<sha>.pt`` with a JSON sidecar holding the full key: model (+ revision), a
fingerprint of the weights the keys depend on (:func:`lit_edit.models.weights_fingerprint`: the
embeddings and blocks up to the layer, without the hooked module itself), layer, module, corpus
(+ version), sample count, max length and dtype. Any change of a key field, or of one bit of
those weights, gives a different file, so a stale cache is never reused; files are written
atomically. A cached file is verified when read (its key, a ``d × d`` matrix of the module's
input size, finite, not all zero, a positive token count); anything else, including a file that
cannot be read at all, is recomputed with one log line saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_edit.closed_form.hooks import StopForward, forward_until
from lit_edit.data.tokenize import pad_rows
from lit_edit.distributed import all_reduce_sum, gather_objects, rank_and_world_size
from lit_edit.io import atomic_write, cache_root
from lit_edit.models import arch_for, eval_mode, model_identity, resolve_dtype, weights_fingerprint

log = logging.getLogger(__name__)

__all__ = [
    "SecondMoment",
    "StatsKey",
    "accumulate_second_moment",
    "accumulate_second_moments",
    "second_moment",
    "second_moments",
    "stats_path",
]


@dataclass(frozen=True)
class StatsKey:
    """Everything a cached statistic depends on."""

    model: str
    revision: Optional[str]
    weights: str
    """:func:`~lit_edit.models.weights_fingerprint` of what the keys depend on."""
    layer: int
    module: str
    corpus: str
    corpus_version: str
    n_samples: int
    max_length: int
    dtype: str
    """The accumulation dtype (and of the stored ``mom2``)."""
    products: Optional[str] = None
    """The dtype of each batch's ``kᵀk`` product when it differs from ``dtype`` (``float32``
    products summed in ``float64``: :func:`accumulate_second_moments`); ``None``: the products
    are computed in ``dtype`` itself (:func:`accumulate_second_moment`)."""

    def as_dict(self) -> dict[str, Any]:
        """The key's fields (``products`` left out when ``None``, so keys without it keep their digest)."""
        return _key_dict(asdict(self))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:24]


def _key_dict(fields: Any) -> Any:
    if isinstance(fields, dict) and fields.get("products", "") is None:
        fields = {k: v for k, v in fields.items() if k != "products"}
    return fields


@dataclass
class SecondMoment:
    mom2: torch.Tensor
    """``E[k kᵀ]`` (``d_in × d_in``) in the accumulation dtype."""
    count: int
    """Number of tokens averaged."""
    key: StatsKey
    cached: bool


def stats_path(key: StatsKey, root: Optional[Path] = None) -> Path:
    return (Path(root) if root is not None else cache_root() / "stats") / f"{key.digest()}.pt"


@torch.no_grad()
def accumulate_second_moment(
    model: nn.Module,
    module: nn.Module,
    rows: list[list[int]],
    pad_id: int,
    dtype: torch.dtype = torch.float64,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """``(Σ k kᵀ, number of keys)`` over the non-padding tokens of ``rows`` (token id lists), where
    ``k`` is the input of ``module``; each forward stops at ``module``. The model runs in eval mode
    on its own device; sums accumulate in ``dtype``.

    Inside a DDP run every process must call it: each accumulates its share of the rows (every
    N-th) and the sums are all-reduced, so every process returns the sums over all rows.
    """
    device = next(model.parameters()).device
    d_in = _input_dim(module)
    rank, world = rank_and_world_size()
    rows = rows[rank::world]
    total = torch.zeros(d_in, d_in, dtype=dtype, device=device)
    count = 0
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="key statistics", total=-(-len(rows) // batch_size), leave=False, disable=None)
    with eval_mode(model):
        for start in starts:
            ids, mask = pad_rows(rows[start : start + batch_size], pad_id)
            keys = forward_until(model, module, "input", ids.to(device), mask.to(device))
            k = keys[mask.to(device).bool()].to(dtype)
            total += k.T @ k
            count += k.shape[0]
    if world > 1:
        all_reduce_sum(total)
        count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64, device=device)).item())
    return total.cpu(), count


@torch.no_grad()
def accumulate_second_moments(
    model: nn.Module,
    modules: Sequence[nn.Module],
    rows: list[list[int]],
    pad_id: int,
    dtype: torch.dtype = torch.float64,
    products: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """``([Σ k kᵀ for each module], number of keys)`` over the non-padding tokens of ``rows``,
    where ``k`` is the input of each of ``modules``, all from one forward per batch.

    Every module is hooked at once and each forward stops as soon as the last of them has seen
    its input (the blocks above the highest one never run); the rows run sorted by length, so
    a batch holds little padding. Each batch's ``kᵀk`` is one GEMM in
    ``products`` (``float32``: the compute speed of a float32 model) and is added to a running
    total in ``dtype`` (``float64``), so rounding stays within one batch. Inside a DDP run every
    process must call it: each accumulates its share of the rows (every N-th) and the sums are
    all-reduced.
    """
    modules = list(modules)
    if not modules:
        raise ValueError("accumulate_second_moments needs at least one module")
    if len({id(m) for m in modules}) != len(modules):
        raise ValueError("accumulate_second_moments got the same module twice")
    device = next(model.parameters()).device
    rank, world = rank_and_world_size()
    rows = sorted(rows[rank::world], key=len)  # batches of similar lengths: little padding to compute
    totals = [torch.zeros(_input_dim(m), _input_dim(m), dtype=dtype, device=device) for m in modules]
    count = 0
    got: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            got[index] = args[0] if args else next(iter(kwargs.values()))
            if len(got) == len(modules):
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, m in enumerate(modules)]
    groups = range(0, len(rows), batch_size)
    if progress:
        from lit_edit.evaluation.scoring import with_progress

        groups = with_progress(groups, total=-(-len(rows) // batch_size), desc=f"key statistics ({len(modules)} modules)")
    try:
        with eval_mode(model):
            for start in groups:
                ids, mask = (t.to(device) for t in pad_rows(rows[start : start + batch_size], pad_id))
                got.clear()
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
                if len(got) != len(modules):
                    raise RuntimeError(f"the forward pass of {type(model).__name__} never reached {len(modules) - len(got)} of the hooked modules")
                keep = mask.bool()
                for i, total in enumerate(totals):
                    k = got[i][keep].to(products)
                    total += (k.T @ k).to(dtype)
                count += int(keep.sum())
                got.clear()
    finally:
        for handle in handles:
            handle.remove()
    if world > 1:
        for total in totals:
            all_reduce_sum(total)
        count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64, device=device)).item())
    return [t.cpu() for t in totals], count


def _check_second_moment(data: Any, key: StatsKey, d_in: int) -> str:
    """Why a cached (or just computed) statistic is unusable, or ``""`` when it is sound."""
    if not isinstance(data, dict) or not isinstance(data.get("mom2"), torch.Tensor):
        return "it holds no mom2 tensor"
    mom2, count = data["mom2"], data.get("count")
    if tuple(mom2.shape) != (d_in, d_in):
        return f"mom2 has shape {tuple(mom2.shape)}, the module's input needs ({d_in}, {d_in})"
    if str(mom2.dtype).replace("torch.", "") != key.dtype:
        return f"mom2 is {mom2.dtype}, the key says {key.dtype}"
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return f"its token count is {count!r}"
    if not bool(torch.isfinite(mom2).all()):
        return "mom2 has NaN or inf entries"
    if not bool(mom2.any()):
        return "mom2 is all zero"
    return ""


def _read_cache(path: Path, key: StatsKey, d_in: int) -> tuple[Optional[dict[str, Any]], str]:
    """``(data, "")`` from a sound cache file, else ``(None, why not)`` (``why`` empty: no file)."""
    sidecar = path.with_suffix(".json")
    if not path.exists() and not sidecar.exists():
        return None, ""
    try:
        stored = json.loads(sidecar.read_text())
        if not isinstance(stored, dict) or _key_dict(stored.get("key")) != key.as_dict():
            return None, "its sidecar does not match the key"
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any damage: truncated, missing half, unreadable, not a tensor file
        return None, f"it cannot be read ({type(exc).__name__}: {exc})"
    why = _check_second_moment(data, key, d_in)
    return (None, why) if why else (data, "")


def _input_dim(module: nn.Module) -> int:
    w = module.weight
    if type(module).__name__ == "Conv1D":  # GPT-2: weight stored (in, out)
        return w.shape[0]
    return w.shape[1]


def second_moment(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    module: Optional[str] = None,
    corpus: Any = "wiki:train",
    n_samples: int = 1000,
    max_length: int = 256,
    dtype: Union[str, torch.dtype] = "float64",
    batch_size: int = 8,
    split: str = "train",
    text_field: str = "text",
    cache: bool = True,
    cache_dir: Optional[Path] = None,
    model_name: Optional[str] = None,
    revision: Optional[str] = None,
    progress: bool = True,
    products: Union[str, torch.dtype, None] = None,
) -> SecondMoment:
    """``E[k kᵀ]`` of the inputs of ``module`` in block ``layer`` over a text corpus (cached).

    Args:
        module: module path inside the block (default: the architecture's MLP output projection).
        corpus: ``"wiki:train"`` (default), a file path, a list of strings or a ``datasets`` object.
        n_samples: number of texts (each truncated to ``max_length`` tokens), >= 1.
        max_length: tokens per text, >= 2.
        dtype: accumulation dtype, ``float64`` (default) or ``float32``.
        model_name: the model name in the cache key (default :func:`lit_edit.models.model_identity`);
            the key also holds a fingerprint of the weights, so a name is never trusted alone.
        progress: show progress over the text batches.
        products: dtype of each batch's ``kᵀk`` (see :func:`second_moments`); ``None``
            (default): ``dtype`` itself, the plain per-layer computation.

    Raises ``ValueError`` for bad options, and when the computed statistic is unusable (no
    tokens, NaN or inf keys, all keys zero): such a layer cannot be edited with key statistics.
    """
    return second_moments(
        model, tokenizer, [layer], module, corpus, n_samples, max_length, dtype, products, batch_size, split, text_field,
        cache, cache_dir, model_name, revision, progress,
    )[int(layer)]


def second_moments(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int],
    module: Optional[str] = None,
    corpus: Any = "wiki:train",
    n_samples: int = 1000,
    max_length: int = 256,
    dtype: Union[str, torch.dtype] = "float64",
    products: Union[str, torch.dtype, None] = "float32",
    batch_size: int = 8,
    split: str = "train",
    text_field: str = "text",
    cache: bool = True,
    cache_dir: Optional[Path] = None,
    model_name: Optional[str] = None,
    revision: Optional[str] = None,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """``{layer: E[k kᵀ]}`` of the inputs of ``module`` in each of ``layers`` (cached per layer).

    Layers whose cache file is sound are read from disk; the others are computed together, in
    one pass over the corpus (:func:`accumulate_second_moments`: one forward per batch feeds
    every layer and stops after the highest), and each is written to its own cache file.

    Args:
        dtype: accumulation dtype (and of the result), ``float64`` (default) or ``float32``.
        products: dtype of each batch's ``kᵀk`` GEMM, ``float32`` (default) or ``float64``, not
            wider than ``dtype``. When it differs from ``dtype`` the cache key records it
            (``products``), so these statistics never share a file with ones whose products
            were computed in ``dtype``. ``None``: ``dtype`` itself, computed layer by layer with
            :func:`accumulate_second_moment` (the plain reference path).

    The other arguments are those of :func:`second_moment`. Raises ``ValueError`` for bad
    options and for an unusable statistic, as :func:`second_moment` does.
    """
    from lit_edit.data.corpus import corpus_name, corpus_version, load_texts

    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples (the number of statistics texts) must be an integer >= 1, got {n_samples!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length (tokens per statistics text) must be an integer >= 2, got {max_length!r}")
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    if not layers:
        raise ValueError("second_moments needs at least one layer")
    arch = arch_for(model)
    module = module or arch.mlp_out
    acc = resolve_dtype(dtype)
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"statistics accumulate in float32 or float64, not {dtype}")
    prod = acc if products is None else resolve_dtype(products)
    if prod not in (torch.float32, torch.float64) or prod.itemsize > acc.itemsize:
        raise ValueError(f"statistics products are float32 or float64 and not wider than the accumulation ({dtype}), not {products}")
    hooked = {layer: f"{arch.layer_name(layer)}.{module}" for layer in layers}
    dims = {layer: _input_dim(model.get_submodule(hooked[layer])) for layer in layers}
    name = model_name or model_identity(model)
    common = dict(
        model=name,
        revision=revision,
        module=module,
        corpus=corpus_name(corpus) if not isinstance(corpus, str) else corpus,
        corpus_version=corpus_version(corpus, split),
        n_samples=int(n_samples),
        max_length=int(max_length),
        dtype=str(acc).replace("torch.", ""),
        products=None if prod == acc else str(prod).replace("torch.", ""),
    )
    keys = {
        layer: StatsKey(weights=weights_fingerprint(model, layer, exclude=hooked[layer]), layer=layer, **common)
        for layer in layers
    }
    out: dict[int, SecondMoment] = {}
    if cache:
        found: dict[int, dict[str, Any]] = {}
        for layer in layers:
            data, why = _read_cache(stats_path(keys[layer], cache_dir), keys[layer], dims[layer])
            if data is not None:
                found[layer] = data
            elif why:
                log.warning("statistics cache %s is unusable (%s); recomputing", stats_path(keys[layer], cache_dir), why)
        if rank_and_world_size()[1] > 1:  # a layer some process cannot read is computed by all (a collective)
            readable = gather_objects(sorted(found))
            found = {layer: data for layer, data in found.items() if all(layer in r for r in readable)}
        for layer, data in found.items():
            path = stats_path(keys[layer], cache_dir)
            log.info("reusing cached statistics %s (layer %d %s, %d tokens): %s", name, layer, module, int(data["count"]), path)
            out[layer] = SecondMoment(mom2=data["mom2"], count=int(data["count"]), key=keys[layer], cached=True)
    missing = [layer for layer in layers if layer not in out]
    if not missing:
        return {layer: out[layer] for layer in layers}

    texts = load_texts(corpus, split=split, limit=n_samples, text_field=text_field)
    if len(texts) < n_samples:
        log.warning("corpus %s has only %d texts (asked for %d)", common["corpus"], len(texts), n_samples)
    rows = [r for r in (tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in texts) if r]
    log.info(
        "computing statistics for %s layer%s %s %s over %d texts (%d tokens) of %s",
        name, "s" if len(missing) > 1 else "", ", ".join(map(str, missing)), module, len(rows), sum(map(len, rows)), common["corpus"],
    )
    if common["products"] is None:  # the plain path: one pass per layer, products in the accumulation dtype
        sums = {}
        for layer in missing:
            sums[layer], count = accumulate_second_moment(
                model, model.get_submodule(hooked[layer]), rows, tokenizer.pad_token_id, acc, batch_size, progress
            )
    else:
        totals, count = accumulate_second_moments(
            model, [model.get_submodule(hooked[layer]) for layer in missing], rows, tokenizer.pad_token_id, acc, prod,
            batch_size, progress,
        )
        sums = dict(zip(missing, totals))
    for layer in missing:
        key, path = keys[layer], stats_path(keys[layer], cache_dir)
        mom2 = sums[layer] / max(count, 1)
        why = _check_second_moment({"mom2": mom2, "count": count}, key, dims[layer])
        if why:
            raise ValueError(
                f"the key statistics of {key.model} layer {layer} {module} over {key.corpus} are unusable: {why} "
                f"({count} tokens); keys that are all zero or not finite cannot be edited with key statistics"
            )
        if cache and rank_and_world_size()[0] == 0:  # one process writes the cache for all
            atomic_write(path, lambda tmp, mom2=mom2: torch.save({"mom2": mom2, "count": count}, tmp))
            sidecar = {"key": key.as_dict(), "count": count, "file": path.name}
            atomic_write(path.with_suffix(".json"), lambda tmp, sidecar=sidecar: Path(tmp).write_text(json.dumps(sidecar, indent=1)))
            log.info("statistics cached in %s", path)
        out[layer] = SecondMoment(mom2=mom2, count=count, key=key, cached=False)
    return {layer: out[layer] for layer in layers}
