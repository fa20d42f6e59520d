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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_edit.closed_form.hooks import forward_until
from lit_edit.data.tokenize import pad_rows
from lit_edit.distributed import all_reduce_sum, gather_objects, rank_and_world_size
from lit_edit.io import atomic_write, cache_root
from lit_edit.models import arch_for, eval_mode, model_identity, resolve_dtype, weights_fingerprint

log = logging.getLogger(__name__)

__all__ = ["SecondMoment", "StatsKey", "accumulate_second_moment", "second_moment", "stats_path"]


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

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


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
        if not isinstance(stored, dict) or stored.get("key") != asdict(key):
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
        progress: show a progress bar over the text batches.

    Raises ``ValueError`` for bad options, and when the computed statistic is unusable (no
    tokens, NaN or inf keys, all keys zero): such a layer cannot be edited with key statistics.
    """
    from lit_edit.data.corpus import corpus_name, corpus_version, load_texts

    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples (the number of statistics texts) must be an integer >= 1, got {n_samples!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length (tokens per statistics text) must be an integer >= 2, got {max_length!r}")
    arch = arch_for(model)
    module = module or arch.mlp_out
    acc = resolve_dtype(dtype)
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"statistics accumulate in float32 or float64, not {dtype}")
    hooked = f"{arch.layer_name(layer)}.{module}"
    d_in = _input_dim(model.get_submodule(hooked))
    key = StatsKey(
        model=model_name or model_identity(model),
        revision=revision,
        weights=weights_fingerprint(model, int(layer), exclude=hooked),
        layer=int(layer),
        module=module,
        corpus=corpus_name(corpus) if not isinstance(corpus, str) else corpus,
        corpus_version=corpus_version(corpus, split),
        n_samples=int(n_samples),
        max_length=int(max_length),
        dtype=str(acc).replace("torch.", ""),
    )
    path = stats_path(key, cache_dir)
    sidecar = path.with_suffix(".json")
    if cache:
        data, why = _read_cache(path, key, d_in)
        if rank_and_world_size()[1] > 1 and not all(gather_objects(data is not None)):
            data, why = None, ""  # some process cannot read it: all compute together (a collective)
        if data is not None:
            log.info("reusing cached statistics %s (layer %d %s, %d tokens): %s", key.model, layer, module, int(data["count"]), path)
            return SecondMoment(mom2=data["mom2"], count=int(data["count"]), key=key, cached=True)
        if why:
            log.warning("statistics cache %s is unusable (%s); recomputing", path, why)

    texts = load_texts(corpus, split=split, limit=n_samples, text_field=text_field)
    if len(texts) < n_samples:
        log.warning("corpus %s has only %d texts (asked for %d)", key.corpus, len(texts), n_samples)
    rows = [r for r in (tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in texts) if r]
    log.info(
        "computing statistics for %s layer %d %s over %d texts (%d tokens) of %s",
        key.model, layer, module, len(rows), sum(map(len, rows)), key.corpus,
    )
    total, count = accumulate_second_moment(
        model, model.get_submodule(hooked), rows, tokenizer.pad_token_id, acc, batch_size, progress
    )
    mom2 = total / max(count, 1)
    why = _check_second_moment({"mom2": mom2, "count": count}, key, d_in)
    if why:
        raise ValueError(
            f"the key statistics of {key.model} layer {layer} {module} over {key.corpus} are unusable: {why} "
            f"({count} tokens); keys that are all zero or not finite cannot be edited with key statistics"
        )
    if cache and rank_and_world_size()[0] == 0:  # one process writes the cache for all
        atomic_write(path, lambda tmp: torch.save({"mom2": mom2, "count": count}, tmp))
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps({"key": asdict(key), "count": count, "file": path.name}, indent=1)))
        log.info("statistics cached in %s", path)
    return SecondMoment(mom2=mom2, count=count, key=key, cached=False)
