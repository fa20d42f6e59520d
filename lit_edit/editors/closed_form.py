"""Closed-form locate-and-edit editors (ROME, MEMIT, EMMET): the shared LightningModule shape.

One dataloader batch is one edit batch. ``training_step`` computes the keys, the target values
(v*/z optimisation) and the closed-form update, applies it in place (after recording the
originals with :meth:`Editor.touch`) and logs diagnostics; there is no optimizer
(``automatic_optimization = False``, ``configure_optimizers`` returns ``None``) and the Trainer
runs one epoch.

``accumulate`` chooses the strategy: ``True`` (sequential / sequential-batched) keeps every
batch's update; ``False`` (single / batched) restores the original weights in
:meth:`on_train_batch_end`, which Lightning calls after the callbacks' hooks, so an immediate
evaluation callback sees each edit before it is undone. With ``accumulate=True`` the requests
of each applied batch are recorded (by case id, in Lightning checkpoints) and announced to the
callbacks (:meth:`~lit_edit.editors.base.Editor.commit_edits`) at the end of ``training_step``:
a fit resumed with ``trainer.fit(..., ckpt_path=...)`` skips a request it already applied, even
if Lightning hands its batch over again, and a checkpoint saved at the end of a batch holds what
the callbacks made of it. Each applied batch counts as a training step (``trainer.global_step``),
so ``ModelCheckpoint(every_n_train_steps=1)`` saves after every edit batch; checkpoints hold only
the tensors an edit changed (and their originals). :attr:`ClosedFormEditor.last_diagnostics`
keeps the diagnostics of the last batch (logged as ``edit/<name>``).

Settings come in three groups, each a dataclass that the command line nests
(``--model.values.steps 10``): :class:`ValueOptions` (the v*/z optimisation),
:class:`StatisticsOptions` (the key statistics C) and :class:`TemplateOptions` (the context
templates). Per-model fields (``layers``, the value learning rate, steps, weight decay and
clamp, the statistics' ``update_weight``) default to ``None``, which means "from the config
hub": the model's file ``lit_edit/config_hub/<model>/<editor>.yaml`` if the loaded model is in
the hub, else ``lit_edit/config_hub/defaults/<editor>.yaml``. An explicit value always wins;
:attr:`ClosedFormEditor.settings` holds the resolved values. Everything computational lives in
:mod:`lit_edit.closed_form` and :mod:`lit_edit.stats`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import torch
from typing_extensions import override

from lit_edit.closed_form import ContextTemplates, TemplateSpec, ValueSettings, apply_update, mlp_out_module, projection_weight
from lit_edit.config_hub import hub_settings, identify
from lit_edit.data.request import EditRequest
from lit_edit.distributed import broadcast_tensors, rank_and_world_size
from lit_edit.editors.base import Editor
from lit_edit.guards import DEFAULT_MAX_UPDATE_RATIO, UpdateGuard, UpdateSize
from lit_edit.masks import check_layers
from lit_edit.options import check_bool, check_int, check_real

log = logging.getLogger(__name__)

__all__ = ["ClosedFormEditor", "ClosedFormSettings", "StatisticsOptions", "TemplateOptions", "ValueOptions"]


def _check(ok: bool, option: str, requirement: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{option} must be {requirement}, got {value!r}")


@dataclass(frozen=True)
class ValueOptions:
    """The v*/z optimisation: Adam on δ added to the edited site's output at the fact token.

    Args:
        lr: Adam learning rate (``None`` = config hub).
        steps: at most this many optimisation steps per request (``None`` = config hub).
        loss_tol: a request stops optimising once its loss is below this.
        kl_factor: weight of the KL term on ``"{subject} is a"``.
        weight_decay: weight of ‖δ‖ / ‖h₀‖² (``None`` = config hub).
        clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor · ‖h₀‖ after every step (``None`` = config hub).
        batch_size: requests optimised together in one forward (MEMIT, EMMET).
        partial_forward: run only the blocks from the edit layer up while optimising.
        prefix_cache: with ``partial_forward``, record the keys and values of the positions
            before the subject's last token once and run every step from there on (same vectors
            up to float rounding; Llama-style blocks with ``sdpa``/``eager`` attention, whole
            rows otherwise). ``None``: on when the model is on a CPU, off on an accelerator.
        stop: stop-aware target (docs/methods.md §2): ``None`` optimises the target tokens only;
            ``"eos"`` optimises target + the tokenizer's EOS token; any other string (e.g.
            ``"."`` or ``"\\n"``) is tokenized after the target as the model would continue and
            optimised with it. The NLL covers the stop token(s) in every context-template row.
    """

    lr: Optional[float] = None
    steps: Optional[int] = None
    loss_tol: float = 5e-2
    kl_factor: float = 0.0625
    weight_decay: Optional[float] = None
    clamp_norm_factor: Optional[float] = None
    batch_size: int = 16
    partial_forward: bool = True
    prefix_cache: Optional[bool] = None
    stop: Optional[str] = None

    def __post_init__(self) -> None:
        # TypeError for a value of the wrong kind, ValueError out of range (NaN and ±inf included), naming the option
        check_real("values.lr", self.lr, minimum=0, exclusive=True, allow_none=True)
        check_int("values.steps", self.steps, minimum=1, allow_none=True)
        check_real("values.loss_tol", self.loss_tol, minimum=0)
        check_real("values.kl_factor", self.kl_factor, minimum=0)
        check_real("values.weight_decay", self.weight_decay, minimum=0, allow_none=True)
        check_real("values.clamp_norm_factor", self.clamp_norm_factor, minimum=0, exclusive=True, allow_none=True)
        check_int("values.batch_size", self.batch_size, minimum=1)
        check_bool("values.partial_forward", self.partial_forward)
        check_bool("values.prefix_cache", self.prefix_cache, allow_none=True)
        if self.stop is not None and (not isinstance(self.stop, str) or not self.stop):
            bad = TypeError if not isinstance(self.stop, str) else ValueError
            raise bad(f"values.stop must be null, 'eos' or a non-empty stop string, got {self.stop!r}")


@dataclass(frozen=True)
class StatisticsOptions:
    """The key statistics ``C = E[k kᵀ]`` of each edited layer (computed once, cached on disk).

    Args:
        adjustment: use C (``False``: C = I).
        update_weight: λ (MEMIT) / the scale of C (EMMET); ``None`` = config hub. ROME has no λ.
        n_samples: texts of the statistics corpus.
        max_length: tokens per text.
        dtype: accumulation dtype, ``float64`` or ``float32``.
        corpus: text source (``wiki:train`` = offline Wikipedia, train split; a file; ...).
        batch_size: texts per forward.
        published: use published statistics instead of computing them: a second-moment ``.npz``
            file of the ROME/MEMIT statistics collector named for the edited layer's module, or a
            directory of such files (searched per layer); see :mod:`lit_edit.published_stats`.
            ``None`` (default): compute from ``corpus``. A damaged file or one of another layer,
            module or width is refused before any weight changes.
    """

    adjustment: bool = True
    update_weight: Optional[float] = None
    n_samples: int = 1000
    max_length: int = 256
    dtype: str = "float64"
    corpus: str = "wiki:train"
    batch_size: int = 8
    published: Optional[str] = None

    def __post_init__(self) -> None:
        check_bool("statistics.adjustment", self.adjustment)
        check_real("statistics.update_weight", self.update_weight, minimum=0, exclusive=True, allow_none=True)
        check_int("statistics.n_samples", self.n_samples, minimum=1)
        # a text of one token has no key after its first position; two is the shortest that says anything
        check_int("statistics.max_length", self.max_length, minimum=2)
        _check(self.dtype in ("float32", "float64"), "statistics.dtype", "'float32' or 'float64'", self.dtype)
        _check(isinstance(self.corpus, str) and bool(self.corpus.strip()), "statistics.corpus", "a non-empty text source",
               self.corpus)
        check_int("statistics.batch_size", self.batch_size, minimum=1)
        if self.published is not None:
            if not isinstance(self.published, str):
                raise TypeError(f"statistics.published must be null or the path of a published statistics file or directory, "
                                f"got {self.published!r}")
            _check(bool(self.published.strip()), "statistics.published", "null or a published statistics file or directory",
                   self.published)
            _check(self.adjustment, "statistics.published", "null when statistics.adjustment is false (C = I uses no statistics)",
                   self.published)


@dataclass(frozen=True)
class TemplateOptions:
    """The context templates (sampled prefixes) that keys and values are averaged over.

    Args:
        seed: seed of the template sampling.
        max_per_group: keep at most this many sampled templates per group (``None`` = all:
            ROME 10 + 10, MEMIT 5); fewer templates make the v*/z optimisation cheaper.
    """

    seed: int = 0
    max_per_group: Optional[int] = None

    def __post_init__(self) -> None:
        check_int("templates.seed", self.seed)
        check_int("templates.max_per_group", self.max_per_group, minimum=0, allow_none=True)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


#: Settings group name -> its dataclass.
OPTION_GROUPS: dict[str, type] = {"values": ValueOptions, "statistics": StatisticsOptions, "templates": TemplateOptions}


def _options(cls: type, value: Any, group: str) -> Any:
    """``value`` (an instance, a mapping of its fields or ``None``) as an instance of ``cls``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown {group} option(s) {unknown}; {cls.__name__} has {sorted(names)}")
        return cls(**value)
    raise TypeError(f"{group} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


@dataclass(frozen=True)
class ClosedFormSettings:
    """The resolved settings of a closed-form editor (explicit > hub model file > hub defaults)."""

    layers: list[int]
    values: ValueOptions
    statistics: StatisticsOptions
    templates: TemplateOptions
    hub_model: Optional[str]
    """The config hub entry of the model (``None``: generic defaults only)."""


class ClosedFormEditor(Editor):
    """Base of the closed-form editors: location, v*/z settings, statistics and templates.

    Args:
        model: embedded name (``smollm2-135m``), hub id, local path, or a loaded ``PreTrainedModel``.
        tokenizer: tokenizer (object, name or path); defaults to the model's own.
        dtype: weights dtype (``float32`` default; ``bfloat16``/``float16``/``auto``).
        layers: edited blocks (``None`` = config hub). ROME uses one.
        values: the v*/z optimisation (:class:`ValueOptions`).
        statistics: the key statistics (:class:`StatisticsOptions`).
        templates: the context templates (:class:`TemplateOptions`).
        accumulate: keep each batch's edit (sequential) or undo it after the batch (single/batched).
        max_update_ratio: refuse (or warn about) an update ΔW larger than this relative to W: the
            larger of ‖ΔW‖_F/‖W‖_F and max|ΔW|/max|W| (:mod:`lit_edit.guards`); ``None`` checks
            only that it is finite. Non-finite updates are always refused.
        on_bad_update: ``refuse`` (raise, naming the batch's case ids, the tensor and the ratio,
            and put back every tensor the batch changed, bit for bit) or ``warn`` (write it).
        chat_template: ``never`` (raw prompts, default), ``auto`` or ``always`` (the tokenizer's chat
            template: keys, v*/z rows and evaluation read the prompt as the user turn, the target
            as the assistant's answer); see :class:`~lit_edit.editors.base.Editor`.

    Each group also accepts a mapping of its fields (``values={"steps": 10}``); ``self.hparams``
    holds the groups as plain mappings, as given (``None`` where the config hub decides).
    """

    family: ClassVar[str] = ""
    template_spec: ClassVar[TemplateSpec] = TemplateSpec()
    value_site: ClassVar[str] = "block"
    trainer_defaults = {**Editor.trainer_defaults, "max_epochs": 1, "use_distributed_sampler": False}
    requires_subject = True
    replicated_batches = True

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        layers: Union[list[int], int, None] = None,
        values: ValueOptions = ValueOptions(),
        statistics: StatisticsOptions = StatisticsOptions(),
        templates: TemplateOptions = TemplateOptions(),
        accumulate: bool = True,
        max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO,
        on_bad_update: Literal["refuse", "warn"] = "refuse",
        chat_template: Literal["auto", "never", "always"] = "never",
    ):
        guard = UpdateGuard(max_update_ratio, on_bad_update)
        groups = {
            "values": _options(ValueOptions, values, "values"),
            "statistics": _options(StatisticsOptions, statistics, "statistics"),
            "templates": _options(TemplateOptions, templates, "templates"),
        }
        check_layers(layers, None, "layers")  # before the model is loaded; its range once it is
        check_bool("accumulate", accumulate)
        super().__init__(model, tokenizer, dtype, chat_template=chat_template)
        if layers is not None:
            edited = check_layers(layers, self.num_layers, "layers")
            if self.family == "rome" and len(edited) != 1:
                raise ValueError(f"layers must name exactly one block for ROME, got {layers!r}")
        # hparams: exactly this editor's init arguments, settings groups as plain mappings.
        params = inspect.signature(type(self).__init__).parameters
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
            for name in [k for k in self.hparams if k not in params or k == "self"]:
                del self.hparams[name]
        self._record_hparams(**{name: dataclasses.asdict(g) for name, g in groups.items()})
        self.automatic_optimization = False
        #: The check every update passes before it is written (:mod:`lit_edit.guards`).
        self.guard = guard
        self._batch_saved: Optional[dict[str, torch.Tensor]] = None
        self._templates = ContextTemplates()
        self._stats: dict[int, Optional[torch.Tensor]] = {}
        self._hub: Optional[dict[str, Any]] = None
        #: Requests whose edit a sequential fit has applied (by case id), kept in checkpoints.
        self._done: set = set()
        self.last_diagnostics: dict[str, float] = {}

    def _record_hparams(self, **values: Any) -> None:
        """Set hyperparameters (also in ``hparams_initial``, which loggers record)."""
        self.hparams.update(values)
        self._hparams_initial = copy.deepcopy(self._hparams)

    # ------------------------------------------------------------------ settings

    def hub_settings(self) -> dict[str, Any]:
        """This editor's config hub settings for the loaded model (generic defaults merged with its file)."""
        if self._hub is None:
            self._hub = hub_settings(self.model, self.family)
        return self._hub

    def _resolve(self, group: str) -> Any:
        cls = OPTION_GROUPS[group]
        explicit = dict(self.hparams.get(group) or {})
        hub = self.hub_settings().get(group) or {}
        for f in dataclasses.fields(cls):
            if explicit.get(f.name) is None and hub.get(f.name) is not None:
                explicit[f.name] = hub[f.name]
        return _options(cls, explicit, group)

    @property
    def settings(self) -> ClosedFormSettings:
        """The resolved settings: explicit arguments, else the config hub's model file, else its defaults."""
        return ClosedFormSettings(
            layers=self.edit_layers,
            values=self._resolve("values"),
            statistics=self._resolve("statistics"),
            templates=self._resolve("templates"),
            hub_model=identify(self.model),
        )

    @property
    def edit_layers(self) -> list[int]:
        layers = self.hparams.get("layers")
        if layers is None:
            layers = self.hub_settings().get("layers")
        if layers is None:
            mid = max(1, self.num_layers // 6)
            layers = [mid] if self.family == "rome" else list(range(max(0, mid - 2), mid + 2))
            if not getattr(self, "_warned_layers", False):
                self._warned_layers = True
                log.warning("no default layers for %s with %d blocks in the config hub; using %s "
                            "(pass layers, or add lit_edit/config_hub/<model>/%s.yaml)",
                            self.model.config.model_type, self.num_layers, layers, self.family)
        return sorted(check_layers(layers, self.num_layers, "layers", allow_none=False))

    def default_location(self) -> dict[str, Any]:
        return {"target_modules": [self.arch.mlp_out], "layers_to_transform": self.edit_layers}

    def value_settings(self) -> ValueSettings:
        """The resolved :class:`ValueOptions` as the maths module's :class:`ValueSettings`."""
        v = self._resolve("values")
        missing = [f for f in ("lr", "steps", "weight_decay", "clamp_norm_factor") if getattr(v, f) is None]
        if missing:
            raise ValueError(f"values.{missing[0]} is not set and the config hub has no value for it")
        return ValueSettings(
            lr=float(v.lr),
            steps=int(v.steps),
            kl_factor=float(v.kl_factor),
            weight_decay=float(v.weight_decay),
            clamp_norm_factor=float(v.clamp_norm_factor),
            loss_tol=float(v.loss_tol),
            stop=v.stop,
        )

    def update_weight(self) -> float:
        """The resolved ``statistics.update_weight`` (λ of MEMIT, the scale of C of EMMET)."""
        w = self._resolve("statistics").update_weight
        if w is None:
            raise ValueError("statistics.update_weight is not set and the config hub has no value for it")
        return float(w)

    # ------------------------------------------------------------------ shared resources

    def context_templates(self) -> list[list[str]]:
        """Template groups for this editor (cached per model, seed and spec); group 0 is ``["{}"]``."""
        opts = self._resolve("templates")
        groups = self._templates.get(self.model, self.tokenizer, self.template_spec, int(opts.seed))
        cap = opts.max_per_group
        if cap is not None:
            groups = [groups[0]] + [g[: int(cap)] for g in groups[1:] if int(cap) > 0]
        return groups

    def key_statistics(self, layer: int) -> Optional[torch.Tensor]:
        """``E[k kᵀ]`` at ``layer`` (``None`` when ``statistics.adjustment`` is off); cached on disk."""
        opts = self._resolve("statistics")
        if not opts.adjustment:
            return None
        if layer not in self._stats and opts.published is not None:
            from lit_edit.published_stats import import_published_stats

            self._stats[layer] = import_published_stats(self.model, layer, opts.published, model_name=self.base_model_name).mom2
        if layer not in self._stats:
            self._compute_statistics([layer])
        return self._stats[layer]

    def _compute_statistics(self, layers: list[int]) -> None:
        """Statistics of ``layers`` from the corpus: cached layers are read, the others computed
        together in one pass (float32 products per batch, summed in ``statistics.dtype``)."""
        from lit_edit.stats import second_moments

        opts = self._resolve("statistics")
        got = second_moments(
            self.model,
            self.tokenizer,
            layers,
            corpus=opts.corpus,
            n_samples=int(opts.n_samples),
            max_length=int(opts.max_length),
            dtype=opts.dtype,
            products="float32",
            batch_size=int(opts.batch_size),
            model_name=self.base_model_name,
        )
        self._stats.update({layer: sm.mom2 for layer, sm in got.items()})

    def prepare_statistics(self) -> None:
        """Compute (or load) the statistics of every edited layer now (the missing ones in one pass)."""
        opts = self._resolve("statistics")
        missing = [layer for layer in self.edit_layers if layer not in self._stats]
        if opts.adjustment and opts.published is None and missing:
            self._compute_statistics(missing)
        for layer in self.edit_layers:
            self.key_statistics(layer)

    def save_edit(self, directory: Union[str, Path], extra: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
        """Save the edit (:meth:`Editor.save_edit`), also recording the resolved settings.

        ``edit.json`` then holds both the init arguments as given (``None`` where the config hub
        decided) and ``resolved_settings``, the values the edit was actually made with.
        """
        resolved = {"resolved_settings": dataclasses.asdict(self.settings)}
        return super().save_edit(directory, extra={**resolved, **(extra or {})}, overwrite=overwrite)

    def weight_name(self, layer: int) -> str:
        return f"{self.arch.mlp_out_name(layer)}.weight"

    def weight(self, layer: int) -> torch.Tensor:
        """``W`` of ``layer`` as ``(d_out, d_in)``."""
        return projection_weight(self.model, layer, self.arch)

    # ------------------------------------------------------------------ writing updates

    @contextmanager
    def edit_batch(self) -> Iterator[None]:
        """Make one edit batch all-or-nothing: if anything fails inside (a refused update, an
        error, an interrupt), every tensor the batch changed gets its pre-batch value back, bit
        for bit, and tensors first touched by the batch leave the undo record."""
        if self._batch_saved is not None:  # nested: the outer batch is the unit
            yield
            return
        recorded = set(self._originals)
        self._batch_saved = saved = {}
        try:
            yield
        except BaseException:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value.to(params[name].device))
            for name in set(self._originals) - recorded:
                del self._originals[name]
            if saved:
                log.warning("edit batch failed: restored %d tensor(s) to their values before the batch", len(saved))
            raise
        finally:
            self._batch_saved = None

    @torch.no_grad()
    def write_update(self, layer: int, delta: torch.Tensor, requests: list[EditRequest]) -> UpdateSize:
        """Check ``Δ`` (``d_out × d_in``) with :attr:`guard`, then add it to W of ``layer``.

        Raises :class:`~lit_edit.guards.UnsafeUpdateError` (nothing written) for a non-finite
        update or, with ``on_bad_update="refuse"``, one above ``max_update_ratio``.
        """
        name = self.weight_name(layer)
        weight = mlp_out_module(self.model, layer, self.arch).weight
        size = self.guard.check(
            name, weight, delta.T if self.arch.conv1d else delta, [r.case_id for r in requests],
            hint=f"Check the key statistics and statistics.update_weight of {type(self).__name__} "
                 "(docs/methods.md §5.1)",
        )
        first = name not in self._originals
        self.touch(name)
        if self._batch_saved is not None and name not in self._batch_saved:
            # its pre-batch value: the undo record's copy when this batch touches it first, else a copy now
            self._batch_saved[name] = self._originals[name] if first else weight.detach().cpu().clone()
        apply_update(weight, delta, self.arch.conv1d)
        return size

    # ------------------------------------------------------------------ Lightning

    @override
    def configure_optimizers(self):
        return None

    @override
    def on_fit_start(self) -> None:
        self.match_originals_dtype()
        # Statistics and context templates describe the base model. A fit resumed from a
        # checkpoint starts with the checkpoint's edits in the weights: both are computed (or
        # found in their caches, keyed by the weights) with the originals put back meanwhile, so
        # the resumed run edits with what the uninterrupted one used.
        with self.unedited():
            self.prepare_statistics()
            self.context_templates()

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """The base model's values in every touched tensor for the duration (bit for bit), the
        edited values back afterwards, also on error."""
        if not self._originals:
            yield
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            edited = {name: params[name].detach().clone() for name in self._originals}
            for name, value in self._originals.items():
                params[name].copy_(value.to(params[name].device))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in edited.items():
                    params[name].copy_(value)

    def edit(self, requests: list[EditRequest]) -> dict[str, float]:
        """Apply one edit batch in place; returns diagnostics."""
        raise NotImplementedError

    def shared_values(self, requests: list[EditRequest]) -> Optional[list]:
        """Under DDP: the target values of ``requests``, each process optimising its share, gathered
        in request order (every process then solves the same system). ``None``: every process
        computes them all (ROME, whose values depend on the edits applied before them)."""
        return None

    @staticmethod
    def _request_key(r: EditRequest) -> Any:
        return r.case_id if r.case_id is not None else (r.prompt, r.target_new)

    @override
    def training_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        requests = [r.validate(require_subject=True) for r in batch]
        accumulate = self.hparams["accumulate"]
        if accumulate:  # a batch Lightning replays after a resume: its edits are in the weights already
            todo = [r for r in requests if self._request_key(r) not in self._done]
            if len(todo) < len(requests):
                log.info("skipping %d request(s) of batch %d already applied (resumed run)", len(requests) - len(todo), batch_idx)
            requests = todo
        if not requests:
            return None
        # A true-precision plugin (bf16-true, 64-true, ...) sets torch's default dtype while the
        # step runs; keys, values and solves stay float32/float64 whatever the model's dtype.
        distributed = rank_and_world_size()[1] > 1
        with _default_dtype(torch.float32):
            values = self.shared_values(requests) if distributed else None
            diag = self.edit(requests) if values is None else self.edit(requests, values=values)
        if distributed:  # every process ends the batch with process 0's tensors, bit for bit
            params = dict(self.model.named_parameters())
            broadcast_tensors(params[name] for name in self.touched)
        #: The diagnostics of the last edit batch (what is logged as ``edit/<name>``).
        self.last_diagnostics = {name: float(value) for name, value in diag.items()}
        for name, value in diag.items():
            self.log(f"edit/{name}", float(value), prog_bar=name in ("v_loss", "update_norm"), on_step=True, batch_size=len(requests))
        self._count_edit_batch()
        if accumulate:
            # The batch is part of the model for good: record it (checkpointed), then announce it
            # here rather than in on_train_batch_end, so that a checkpoint saved at the end of this
            # batch (ModelCheckpoint runs before the module's on_train_batch_end) already holds
            # what the callbacks did with it.
            self._done.update(self._request_key(r) for r in requests)
            self.commit_edits(requests)
        return None

    def _count_edit_batch(self) -> None:
        """Count an applied edit batch as a training step (``trainer.global_step``): there is no
        optimizer to count it, and step-based settings (``ModelCheckpoint(every_n_train_steps=...)``,
        ``max_steps``) then count edit batches. The count is part of the checkpointed loop state."""
        trainer = self._trainer
        if trainer is None:
            return
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.hparams["accumulate"]:
            self.restore()

    @override
    def _kept_state_keys(self) -> set[str]:
        # Only the tensors an edit changed: nothing is trained, so the rest of the model (whose
        # parameters keep requires_grad) is the base model's and stays out of checkpoints.
        return {f"model.{n}" for n in self._originals}

    @override
    def restore(self, forget: bool = True) -> None:
        super().restore(forget)
        if forget:
            self._done.clear()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_edit_done"] = sorted(self._done, key=repr)
        if not self.hparams["accumulate"]:
            # single / batched: each batch's edit is undone at the end of the batch, after a
            # ModelCheckpoint saved there; the checkpoint holds the weights as they are after it
            state = checkpoint["state_dict"]
            for name, value in self._originals.items():
                if f"model.{name}" in state:
                    state[f"model.{name}"] = value.clone().to(state[f"model.{name}"].dtype)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._done = {tuple(k) if isinstance(k, list) else k for k in checkpoint.get("lit_edit_done", [])}
