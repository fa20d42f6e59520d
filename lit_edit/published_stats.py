"""Key statistics published by the ROME/MEMIT line of work, imported into lit_edit's cache.

Computing ``C = E[k kᵀ]`` for a 7-8B model over a large corpus takes hours on a GPU; the ROME and
MEMIT authors (and toolkits built on their code) publish the result per model and layer as a
NumPy ``.npz`` file laid out as

    <stats_dir>/<model>/<corpus>_stats/<module>_<precision>_<stats>[_t<tokens>][_<samples>].npz

e.g. ``gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz``: ``<model>``
is the model's hub id with ``/`` replaced by ``_``, ``<module>`` the full name of the hooked
module (the MLP output projection, whose *inputs* are the keys), ``<precision>`` the
accumulation dtype, ``<stats>`` the collected statistics joined by ``-`` (``mom2``, or e.g.
``mean-mom2``) and ``<samples>`` the number of corpus texts. The arrays are the state of a
running second-moment statistic, under the prefix of its name:

- ``mom2.mom2``: the **sum** ``Σ k kᵀ`` over every non-padding token (``d_in × d_in``), not the
  mean; the mean is ``mom2.mom2 / mom2.count``;
- ``mom2.count``: the number of tokens summed;
- ``mom2.constructor``: the class that wrote it (a ``SecondMoment``), optional;
- ``sample_size``: the number of corpus texts, optional.

:func:`read_published_stats` reads and verifies one file (readable without pickles, the arrays
present, a square floating matrix of the module's input size, finite, symmetric up to rounding,
a non-negative diagonal, not all zero, a positive integer count, the name's precision and sample
size agreeing with the arrays); anything else raises :class:`PublishedStatsError` naming the
file and what is wrong. :func:`import_published_stats` finds the file of one layer (a file, or
a directory searched for the layer's module name), checks it belongs to that layer, and stores
the mean under a :class:`~lit_edit.stats.StatsKey` of lit_edit's statistics cache (corpus
``published:<corpus>``, the file's sha256 as the corpus version, its sample count and
precision), with a JSON sidecar recording the provenance; a later import of the same file for
the same weights reads the verified cache. The closed-form editors use it through
``statistics.published``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from lit_edit.io import atomic_write
from lit_edit.models import arch_for, model_identity, weights_fingerprint
from lit_edit.stats import SecondMoment, StatsKey, _input_dim, _read_cache, stats_path

log = logging.getLogger(__name__)

__all__ = [
    "PublishedName",
    "PublishedStats",
    "PublishedStatsError",
    "find_published_stats",
    "import_published_stats",
    "parse_published_name",
    "read_published_stats",
]

#: Relative asymmetry ``max|M − Mᵀ| / max|M|`` above which a second moment is refused.
SYMMETRY_TOLERANCE = 1e-3

_PRECISIONS = ("float16", "float32", "float64", "bfloat16")
_NAME = re.compile(
    r"^(?P<module>.+?)_(?P<precision>" + "|".join(_PRECISIONS) + r")_(?P<stats>[a-z0-9_]+?(?:-[a-z0-9_]+?)*)"
    r"(?:_t(?P<tokens>\d+|\{batch_tokens\}))?(?:_(?P<samples>\d+))?\.npz$"
)
_PATTERN = "<module>_<precision>_<stats>[_t<tokens>][_<samples>].npz"


class PublishedStatsError(ValueError):
    """A published statistics file that cannot be used: damaged, or not the one for this layer."""


@dataclass(frozen=True)
class PublishedName:
    """What a published file's path says about it."""

    module: str
    """Full name of the hooked module, e.g. ``transformer.h.17.mlp.c_proj``."""
    precision: str
    stats: tuple[str, ...]
    """The statistics collected in the file (``("mom2",)``, ``("mean", "mom2")``, ...)."""
    samples: Optional[int]
    """Number of corpus texts (``None``: all of the corpus, or not in the name)."""
    tokens: Optional[int]
    """Tokens per text when the name records it (``_t<tokens>``)."""
    corpus: Optional[str]
    """From the parent directory ``<corpus>_stats`` (``None`` when it is named otherwise)."""
    model: Optional[str]
    """The directory above ``<corpus>_stats`` (the model's hub id, ``/`` written ``_``)."""


def parse_published_name(path: Union[str, Path]) -> Optional[PublishedName]:
    """The fields of a published statistics file's path, or ``None`` when its name does not follow
    ``<module>_<precision>_<stats>[_t<tokens>][_<samples>].npz``."""
    path = Path(path)
    m = _NAME.match(path.name)
    if m is None:
        return None
    parent = path.parent.name
    corpus = parent[: -len("_stats")] if parent.endswith("_stats") and len(parent) > len("_stats") else None
    tokens = m["tokens"]
    return PublishedName(
        module=m["module"],
        precision=m["precision"],
        stats=tuple(m["stats"].split("-")),
        samples=int(m["samples"]) if m["samples"] else None,
        tokens=int(tokens) if tokens and tokens.isdigit() else None,
        corpus=corpus,
        model=(path.parent.parent.name or None) if corpus is not None else None,
    )


@dataclass
class PublishedStats:
    """One verified published statistics file."""

    path: Path
    mom2: torch.Tensor
    """The mean ``E[k kᵀ] = mom2.mom2 / mom2.count`` (``d_in × d_in``, float64)."""
    count: int
    """Number of tokens the file summed over."""
    precision: str
    """The dtype the file stores (its accumulation precision)."""
    sample_size: Optional[int]
    """Number of corpus texts (from the file, else its name; ``None``: not recorded)."""
    name: Optional[PublishedName]
    sha256: str

    def provenance(self) -> dict[str, Any]:
        """Where the statistics come from, as recorded in the cache sidecar."""
        return {
            "source": str(self.path.resolve()),
            "sha256": self.sha256,
            "corpus": (self.name.corpus if self.name else None) or "unknown",
            "model_directory": self.name.model if self.name else None,
            "module": self.name.module if self.name else None,
            "sample_size": self.sample_size,
            "tokens": self.count,
            "dtype": self.precision,
        }


def _refuse(path: Path, why: str) -> PublishedStatsError:
    return PublishedStatsError(f"published statistics file {path} is unusable: {why}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _integer(value: Any) -> Optional[int]:
    """A 0-d or one-element integral array (or number) as an int, else ``None``."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iuf":
        return None
    x = arr.reshape(()).item()
    if isinstance(x, float) and (not np.isfinite(x) or x != int(x)):
        return None
    return int(x)


def read_published_stats(path: Union[str, Path], d_in: Optional[int] = None, sha256: Optional[str] = None) -> PublishedStats:
    """Read and verify one published second-moment file (see the module docstring).

    Args:
        path: the ``.npz`` file.
        d_in: the input size of the module it is meant for (checked when given).
        sha256: the file's sha256 when the caller has it already (else computed).

    Raises :class:`PublishedStatsError`, naming the file and what is wrong, for a file that is
    missing, unreadable, holds no second moment, has the wrong shape, non-finite or asymmetric
    entries, a negative diagonal, an all-zero matrix, a count that is not a positive integer, or a
    name whose precision or sample size disagrees with the arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "no such file")
    name = parse_published_name(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "mom2.mom2" not in keys or "mom2.count" not in keys:
                raise _refuse(path, f"it holds no second moment (needs arrays 'mom2.mom2' and 'mom2.count', has {sorted(keys)})")
            raw = npz["mom2.mom2"]
            count = npz["mom2.count"]
            constructor = str(npz["mom2.constructor"]) if "mom2.constructor" in keys else None
            sample_size = npz["sample_size"] if "sample_size" in keys else None
    except PublishedStatsError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:  # truncated, not an npz, pickled objects
        raise _refuse(path, f"it cannot be read as an .npz file ({type(exc).__name__}: {exc})") from exc
    if constructor is not None and not constructor.rstrip("()").endswith("SecondMoment"):
        raise _refuse(path, f"'mom2' was written by {constructor}, not a SecondMoment")
    if raw.ndim != 2 or raw.shape[0] != raw.shape[1]:
        raise _refuse(path, f"mom2.mom2 has shape {raw.shape}, a second moment is a square matrix")
    if d_in is not None and raw.shape[0] != d_in:
        raise _refuse(path, f"mom2.mom2 is {raw.shape[0]} × {raw.shape[1]}, the module's input needs {d_in} × {d_in} (another model?)")
    if raw.dtype.kind != "f":
        raise _refuse(path, f"mom2.mom2 is {raw.dtype}, not a floating-point array")
    precision = str(raw.dtype)
    if name is not None and name.precision != precision:
        raise _refuse(path, f"its name says {name.precision} but mom2.mom2 is {precision}")
    n = _integer(count)
    if n is None or n <= 0:
        raise _refuse(path, f"its token count mom2.count is {count!r}, not a positive integer")
    size = _integer(sample_size) if sample_size is not None else None  # a null sample size is stored as a NaN
    if name is not None and name.samples is not None:
        if size is not None and size != name.samples:
            raise _refuse(path, f"its name says {name.samples} samples but its sample_size array says {size}")
        size = name.samples
    m = torch.from_numpy(np.asarray(raw, dtype=np.float64))
    if not bool(torch.isfinite(m).all()):
        raise _refuse(path, "mom2.mom2 has NaN or inf entries")
    scale = float(m.abs().max())
    if scale == 0.0:
        raise _refuse(path, "mom2.mom2 is all zero")
    asym = float((m - m.T).abs().max()) / scale
    if asym > SYMMETRY_TOLERANCE:
        raise _refuse(path, f"mom2.mom2 is not symmetric (max |M − Mᵀ| / max |M| = {asym:.3g}), so it is no second moment")
    if float(m.diagonal().min()) < -SYMMETRY_TOLERANCE * scale:
        raise _refuse(path, "mom2.mom2 has a negative diagonal entry, so it is no second moment")
    return PublishedStats(
        path=path, mom2=m / n, count=n, precision=precision, sample_size=size, name=name, sha256=sha256 or _sha256(path)
    )


def find_published_stats(source: Union[str, Path], module: str, model_dir: Optional[str] = None) -> Path:
    """The published file of the full module name ``module`` in ``source`` (a file or a directory).

    A file must be named for ``module``; a directory is searched (recursively) for files named
    ``<module>_<precision>_<stats>...npz`` that hold ``mom2``, preferring those under a directory
    called ``model_dir`` (the model's name, ``/`` written ``_``) when several match. Raises
    :class:`PublishedStatsError` when there is none, several, or the file is for another module.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        found = []
        for p in sorted(source.rglob("*.npz")):
            n = parse_published_name(p)
            if n is not None and n.module == module and "mom2" in n.stats:
                found.append(p)
        if len(found) > 1 and model_dir:
            preferred = [p for p in found if model_dir.lower() in (q.name.lower() for q in p.parents)]
            found = preferred or found
        if not found:
            raise PublishedStatsError(
                f"no published statistics for {module} under {source} (statistics.published): looked for files named "
                f"{module}_<precision>_mom2[_<samples>].npz, as in <model>/<corpus>_stats/{module}_float32_mom2_100000.npz"
            )
        if len(found) > 1:
            raise PublishedStatsError(
                f"several published statistics files for {module} under {source}: {[str(p) for p in found]}; "
                "set statistics.published to the one to use"
            )
        return found[0]
    if not source.exists():
        raise PublishedStatsError(f"statistics.published: {source} does not exist (give a published .npz file or a directory of them)")
    name = parse_published_name(source)
    if name is None:
        raise _refuse(
            source, f"its name does not follow the published pattern {_PATTERN}, so the layer it belongs to cannot be checked "
            f"(this layer needs {module}_<precision>_mom2[_<samples>].npz)",
        )
    if name.module != module:
        raise _refuse(source, f"it holds the statistics of {name.module}, but this edit needs those of {module} (another layer or model)")
    if "mom2" not in name.stats:
        raise _refuse(source, f"its name says it holds {'-'.join(name.stats)}, not mom2")
    return source


def import_published_stats(
    model: nn.Module,
    layer: int,
    source: Union[str, Path],
    module: Optional[str] = None,
    cache: bool = True,
    cache_dir: Optional[Path] = None,
    model_name: Optional[str] = None,
    revision: Optional[str] = None,
) -> SecondMoment:
    """``E[k kᵀ]`` at ``layer`` from a published file instead of computing it.

    Args:
        source: a published ``.npz`` file named for this layer's module, or a directory of them.
        module: module path inside the block (default: the architecture's MLP output projection).
        cache: keep the imported mean in lit_edit's statistics cache (and read it from there).
        model_name: the model name in the cache key (default :func:`lit_edit.models.model_identity`).

    The cache key has the corpus ``published:<corpus>``, the file's sha256 as corpus version, its
    sample count (0 when not recorded), its ``_t<tokens>`` length (0 when not recorded) and
    ``float64`` (the mean is computed in float64 from the file); the sidecar records the
    provenance (file, corpus, samples, tokens, dtype). Raises :class:`PublishedStatsError` for a
    damaged file or one that belongs to another layer, module or model size.
    """
    arch = arch_for(model)
    module = module or arch.mlp_out
    hooked = f"{arch.layer_name(layer)}.{module}"
    d_in = _input_dim(model.get_submodule(hooked))
    ident = model_name or model_identity(model)
    path = find_published_stats(source, hooked, model_dir=str(getattr(model.config, "name_or_path", "") or "").replace("/", "_") or None)
    name = parse_published_name(path)
    sha = _sha256(path)
    key = StatsKey(
        model=ident,
        revision=revision,
        weights=weights_fingerprint(model, int(layer), exclude=hooked),
        layer=int(layer),
        module=module,
        corpus=f"published:{(name.corpus if name else None) or 'unknown'}",
        corpus_version=f"sha256:{sha[:24]}",
        n_samples=int(name.samples or 0) if name else 0,
        max_length=int(name.tokens or 0) if name else 0,
        dtype="float64",
    )
    target = stats_path(key, cache_dir)
    if cache:
        data, why = _read_cache(target, key, d_in)
        if data is not None:
            log.info(
                "using published statistics for %s layer %d %s instead of computing them: %s (%d tokens; imported earlier, %s)",
                ident, layer, module, path, int(data["count"]), target,
            )
            return SecondMoment(mom2=data["mom2"], count=int(data["count"]), key=key, cached=True)
        if why:
            log.warning("statistics cache %s is unusable (%s); importing %s again", target, why, path)
    stats = read_published_stats(path, d_in, sha256=sha)
    if name is not None and name.model and name.model.lower() not in ident.replace("/", "_").lower():
        log.warning("published statistics %s were computed for %s; using them for %s (same shape)", path, name.model, ident)
    log.info(
        "using published statistics for %s layer %d %s instead of computing them: %s (%d tokens of %s, %s samples, %s)",
        ident, layer, module, path, stats.count, stats.provenance()["corpus"], stats.sample_size or "?", stats.precision,
    )
    if cache:
        mom2, count = stats.mom2, stats.count
        atomic_write(target, lambda tmp: torch.save({"mom2": mom2, "count": count}, tmp))
        sidecar = {"key": asdict(key), "count": count, "file": target.name, "provenance": stats.provenance()}
        atomic_write(target.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))
        log.info("published statistics cached in %s", target)
    return SecondMoment(mom2=stats.mom2, count=stats.count, key=key, cached=False)
