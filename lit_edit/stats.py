"""Second-moment statistics ``C = E[k kᵀ]`` of the keys at a layer, with an on-disk cache.

Keys are the inputs of a block's MLP output projection (any module can be named) at every
non-padding token of a text corpus: the offline Wikipedia extracts (train split) by default, or
any source :func:`lit_edit.data.corpus.load_texts` reads (a local text/JSON file, a list of
strings, a ``datasets`` object). Sums accumulate in float64 (or float32) and the forward stops
right after the hooked module.

The computation is a small LightningModule run with ``Trainer.predict`` (progress bar, any
accelerator, several devices: the sums are reduced across processes). Results are cached under
``cache_root()/stats/<sha>.pt`` with a JSON sidecar holding the full key: model (+ revision),
layer, module, corpus (+ version), sample count, max length and dtype. Any change of a key field
gives a different file, so a stale cache is never reused; files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_edit.closed_form.hooks import StopForward
from lit_edit.io import atomic_write, cache_root
from lit_edit.models import arch_for, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["StatsKey", "SecondMoment", "SecondMomentModule", "second_moment", "stats_path"]


@dataclass(frozen=True)
class StatsKey:
    """Everything a cached statistic depends on."""

    model: str
    revision: Optional[str]
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


class _Texts(torch.utils.data.Dataset):
    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.rows[i]


def _collate(pad_id: int):
    def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    return collate


class SecondMomentModule(L.LightningModule):
    """Accumulates ``Σ k kᵀ`` and the token count of a module's input over predict batches."""

    def __init__(self, model: nn.Module, module_name: str, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.model = model
        self.module_name = module_name
        self.acc_dtype = dtype
        d_in = _input_dim(model.get_submodule(module_name))
        self.register_buffer("total", torch.zeros(d_in, d_in, dtype=dtype), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64), persistent=False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        got: dict[str, torch.Tensor] = {}

        def hook(mod, args):
            got["k"] = args[0]
            raise StopForward

        handle = self.model.get_submodule(self.module_name).register_forward_pre_hook(hook)
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        k = got["k"][batch["attention_mask"].bool()].to(self.acc_dtype)
        self.total += k.T @ k
        self.count += k.shape[0]
        return None

    def on_predict_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1:
            self.total = strategy.reduce(self.total, reduce_op="sum")
            self.count = strategy.reduce(self.count, reduce_op="sum")


def _input_dim(module: nn.Module) -> int:
    w = module.weight
    if type(module).__name__ == "Conv1D":  # GPT-2: weight stored (in, out)
        return w.shape[0]
    return w.shape[1]


def _model_name(model: nn.Module) -> tuple[str, Optional[str]]:
    cfg = model.config
    return str(getattr(cfg, "name_or_path", "") or type(model).__name__), getattr(cfg, "_commit_hash", None)


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
    trainer_kwargs: Optional[dict[str, Any]] = None,
) -> SecondMoment:
    """``E[k kᵀ]`` of the inputs of ``module`` in block ``layer`` over a text corpus (cached).

    Args:
        module: module path inside the block (default: the architecture's MLP output projection).
        corpus: ``"wiki:train"`` (default), a file path, a list of strings or a ``datasets`` object.
        n_samples: number of texts (each truncated to ``max_length`` tokens).
        dtype: accumulation dtype, ``float64`` (default) or ``float32``.
        trainer_kwargs: extra ``lightning.Trainer`` arguments (e.g. ``devices=4``).
    """
    from lit_edit.data.corpus import corpus_name, corpus_version, load_texts

    arch = arch_for(model)
    module = module or arch.mlp_out
    acc = resolve_dtype(dtype)
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"statistics accumulate in float32 or float64, not {dtype}")
    name, rev = _model_name(model)
    key = StatsKey(
        model=model_name or name,
        revision=revision if revision is not None else rev,
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
    if cache and path.exists() and sidecar.exists():
        stored = json.loads(sidecar.read_text())
        if stored.get("key") == asdict(key):
            data = torch.load(path, map_location="cpu", weights_only=True)
            log.info("reusing cached statistics %s (layer %d %s, %d tokens): %s", key.model, layer, module, int(data["count"]), path)
            return SecondMoment(mom2=data["mom2"], count=int(data["count"]), key=key, cached=True)
        log.warning("statistics file %s does not match its key; recomputing", path)

    texts = load_texts(corpus, split=split, limit=n_samples, text_field=text_field)
    if len(texts) < n_samples:
        log.warning("corpus %s has only %d texts (asked for %d)", key.corpus, len(texts), n_samples)
    rows = [r for r in (tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in texts) if r]
    log.info(
        "computing statistics for %s layer %d %s over %d texts (%d tokens) of %s",
        key.model, layer, module, len(rows), sum(map(len, rows)), key.corpus,
    )
    loader = DataLoader(_Texts(rows), batch_size=batch_size, shuffle=False, collate_fn=_collate(tokenizer.pad_token_id))
    stats_module = SecondMomentModule(model, f"{arch.layer_name(layer)}.{module}", acc)
    kwargs = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    kwargs.update(trainer_kwargs or {})
    was_training = model.training
    device = next(model.parameters()).device
    trainer = L.Trainer(**kwargs)
    trainer.predict(stats_module, dataloaders=loader, return_predictions=False)
    model.train(was_training)
    model.to(device)
    count = int(stats_module.count.item())
    mom2 = (stats_module.total / max(count, 1)).cpu()
    if cache and trainer.is_global_zero:
        atomic_write(path, lambda tmp: torch.save({"mom2": mom2, "count": count}, tmp))
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps({"key": asdict(key), "count": count, "file": path.name}, indent=1)))
        log.info("statistics cached in %s", path)
    return SecondMoment(mom2=mom2, count=count, key=key, cached=False)
