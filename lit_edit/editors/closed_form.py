"""Closed-form locate-and-edit editors (ROME, MEMIT, EMMET): the shared LightningModule shape.

One dataloader batch is one edit batch. ``training_step`` computes the keys, the target values
(v*/z optimisation) and the closed-form update, applies it in place (after recording the
originals with :meth:`Editor.touch`) and logs diagnostics; there is no optimizer
(``automatic_optimization = False``, ``configure_optimizers`` returns ``None``) and the Trainer
runs one epoch.

``accumulate`` chooses the strategy: ``True`` (sequential / sequential-batched) keeps every
batch's update; ``False`` (single / batched) restores the original weights in
:meth:`on_train_batch_end`, which Lightning calls after the callbacks' hooks, so an immediate
evaluation callback sees each edit before it is undone.

Hyperparameters left as ``None`` come from :data:`LOCATE_DEFAULTS` (published configurations per
architecture) and otherwise from the editor's generic defaults. Everything computational lives in
:mod:`lit_edit.closed_form` and :mod:`lit_edit.stats`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Optional, Union

import torch

from lit_edit.data.request import EditRequest
from lit_edit.editors.base import Editor
from lit_edit.closed_form import ContextTemplates, TemplateSpec, ValueSettings, projection_weight

log = logging.getLogger(__name__)

__all__ = ["ClosedFormEditor", "LOCATE_DEFAULTS"]

#: Published hyperparameters per (model_type, number of blocks) and editor family.
#: GPT-2 XL and GPT-J: the ROME/MEMIT papers' configs; Llama-3-8B: the EasyEdit Llama-3 configs
#: (the Llama-3 batch-size study, arXiv 2405.00664, found layer 1 best for single-layer edits).
#: SmolLM2-135M (llama, 30 blocks): the Llama-3-8B settings scaled to depth (ROME block 4, MEMIT
#: blocks 3-5; layers not yet swept: ``benchmarks/closed_form_editors.py --sweep rome:2,4,6,8``). λ was
#: measured on CounterFact records 100-119 (batch of 20, same z): 15000 leaves 73% of the z
#: residual and ES 55; 5000: 50%, ES 80; 2000: 30%, ES 95; 500: 9%, ES 100, NS unchanged.
LOCATE_DEFAULTS: dict[tuple[str, int], dict[str, dict[str, Any]]] = {
    ("gpt2", 48): {
        "rome": {"layers": [17], "v_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0},
        "memit": {"layers": [13, 14, 15, 16, 17], "v_steps": 20, "v_weight_decay": 0.5,
                  "clamp_norm_factor": 0.75, "mom2_update_weight": 20000.0},
    },
    ("gptj", 28): {
        "rome": {"layers": [5], "v_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0},
        "memit": {"layers": [3, 4, 5, 6, 7, 8], "v_steps": 25, "v_weight_decay": 0.5,
                  "clamp_norm_factor": 0.75, "mom2_update_weight": 15000.0},
    },
    ("llama", 32): {
        "rome": {"layers": [5], "v_steps": 25, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0},
        "memit": {"layers": [4, 5, 6, 7, 8], "v_steps": 25, "v_weight_decay": 1e-3,
                  "clamp_norm_factor": 4.0, "mom2_update_weight": 15000.0},
    },
    ("llama", 30): {
        "rome": {"layers": [4], "v_steps": 25, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0},
        "memit": {"layers": [3, 4, 5], "v_steps": 25, "v_weight_decay": 1e-3,
                  "clamp_norm_factor": 4.0, "mom2_update_weight": 500.0},
    },
}


class ClosedFormEditor(Editor):
    """Base of the closed-form editors: location, v*/z settings, statistics and templates.

    Args:
        layers: edited blocks (``None`` = per-architecture default). ROME uses one.
        v_lr: Adam learning rate of the v*/z optimisation (0.5).
        v_steps: at most this many optimisation steps per request.
        v_loss_tol: a request stops optimising once its loss is below this.
        kl_factor: weight of the KL term on ``"{subject} is a"``.
        v_weight_decay: weight of ‖δ‖ / ‖h₀‖².
        clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor · ‖h₀‖ after every step.
        mom2_adjustment: use the key second moment C (``False``: C = I).
        mom2_update_weight: λ (MEMIT) / the scale of C (EMMET).
        mom2_n_samples: texts of the statistics corpus.
        mom2_max_length: tokens per statistics text.
        mom2_dtype: statistics accumulation dtype (``float64`` or ``float32``).
        stats_corpus: text source for the statistics (``wiki:train``, a file, ...).
        stats_batch_size: texts per statistics batch.
        template_seed: seed of the context-template sampling.
        max_templates_per_group: keep at most this many sampled templates per group (``None`` =
            all: ROME 10 + 10, MEMIT 5); fewer templates make the v*/z optimisation cheaper.
        accumulate: keep each batch's edit (sequential) or undo it after the batch (single/batched).
        partial_forward: run only the blocks from the edit layer up while optimising values.
        z_batch_size: requests optimised together in one forward.
    """

    family: ClassVar[str] = ""
    template_spec: ClassVar[TemplateSpec] = TemplateSpec()
    value_site: ClassVar[str] = "block"
    generic_defaults: ClassVar[dict[str, Any]] = {
        "v_lr": 0.5,
        "v_steps": 25,
        "v_weight_decay": 1e-3,
        "clamp_norm_factor": 4.0,
        "mom2_update_weight": 15000.0,
    }
    trainer_defaults = {**Editor.trainer_defaults, "max_epochs": 1}
    requires_subject = True

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        layers: Union[list[int], int, None] = None,
        v_lr: Optional[float] = None,
        v_steps: Optional[int] = None,
        v_loss_tol: float = 5e-2,
        kl_factor: float = 0.0625,
        v_weight_decay: Optional[float] = None,
        clamp_norm_factor: Optional[float] = None,
        mom2_adjustment: bool = True,
        mom2_update_weight: Optional[float] = None,
        mom2_n_samples: int = 1000,
        mom2_max_length: int = 256,
        mom2_dtype: str = "float64",
        stats_corpus: str = "wiki:train",
        stats_batch_size: int = 8,
        template_seed: int = 0,
        max_templates_per_group: Optional[int] = None,
        accumulate: bool = True,
        partial_forward: bool = True,
        z_batch_size: int = 16,
    ):
        super().__init__(model, tokenizer, dtype)
        self.automatic_optimization = False
        self._templates = ContextTemplates()
        self._stats: dict[int, Optional[torch.Tensor]] = {}

    # ------------------------------------------------------------------ settings

    def _table(self) -> dict[str, Any]:
        entry = LOCATE_DEFAULTS.get((self.model.config.model_type, self.num_layers), {})
        return entry.get(self.family) or entry.get("memit", {})

    def setting(self, name: str) -> Any:
        """A hyperparameter: the explicit argument, else the architecture table, else the generic default."""
        value = self.hparams.get(name)
        if value is not None:
            return value
        table = self._table()
        if name in table:
            return table[name]
        return self.generic_defaults.get(name)

    @property
    def edit_layers(self) -> list[int]:
        layers = self.hparams.get("layers")
        if layers is None:
            layers = self._table().get("layers")
        if layers is None:
            mid = max(1, self.num_layers // 6)
            layers = [mid] if self.family == "rome" else list(range(max(0, mid - 2), mid + 2))
            log.warning("no default layers for %s with %d blocks; using %s", self.model.config.model_type, self.num_layers, layers)
        layers = [layers] if isinstance(layers, int) else list(layers)
        bad = [l for l in layers if not 0 <= l < self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {self.num_layers} blocks")
        return sorted(layers)

    def default_location(self) -> dict[str, Any]:
        return {"target_modules": [self.arch.mlp_out], "layers_to_transform": self.edit_layers}

    def value_settings(self) -> ValueSettings:
        return ValueSettings(
            lr=float(self.setting("v_lr")),
            steps=int(self.setting("v_steps")),
            kl_factor=float(self.hparams["kl_factor"]),
            weight_decay=float(self.setting("v_weight_decay")),
            clamp_norm_factor=float(self.setting("clamp_norm_factor")),
            loss_tol=float(self.hparams["v_loss_tol"]),
        )

    # ------------------------------------------------------------------ shared resources

    def context_templates(self) -> list[list[str]]:
        """Template groups for this editor (cached per model, seed and spec); group 0 is ``["{}"]``."""
        groups = self._templates.get(self.model, self.tokenizer, self.template_spec, int(self.hparams["template_seed"]))
        cap = self.hparams.get("max_templates_per_group")
        if cap is not None:
            groups = [groups[0]] + [g[: int(cap)] for g in groups[1:] if int(cap) > 0]
        return groups

    def key_statistics(self, layer: int) -> Optional[torch.Tensor]:
        """``E[k kᵀ]`` at ``layer`` (``None`` when ``mom2_adjustment`` is off); cached on disk."""
        if not self.hparams["mom2_adjustment"]:
            return None
        if layer not in self._stats:
            from lit_edit.stats import second_moment

            sm = second_moment(
                self.model,
                self.tokenizer,
                layer,
                corpus=self.hparams["stats_corpus"],
                n_samples=int(self.hparams["mom2_n_samples"]),
                max_length=int(self.hparams["mom2_max_length"]),
                dtype=self.hparams["mom2_dtype"],
                batch_size=int(self.hparams["stats_batch_size"]),
                model_name=self.base_model_name,
            )
            self._stats[layer] = sm.mom2
        return self._stats[layer]

    def prepare_statistics(self) -> None:
        """Compute (or load) the statistics of every edited layer now."""
        for layer in self.edit_layers:
            self.key_statistics(layer)

    def weight_name(self, layer: int) -> str:
        return f"{self.arch.mlp_out_name(layer)}.weight"

    def weight(self, layer: int) -> torch.Tensor:
        """``W`` of ``layer`` as ``(d_out, d_in)``."""
        return projection_weight(self.model, layer, self.arch)

    # ------------------------------------------------------------------ Lightning

    def configure_optimizers(self):
        return None

    def on_fit_start(self) -> None:
        self.prepare_statistics()

    def edit(self, requests: list[EditRequest]) -> dict[str, float]:
        """Apply one edit batch in place; returns diagnostics."""
        raise NotImplementedError

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        requests = [r.validate(require_subject=True) for r in batch]
        diag = self.edit(requests)
        for name, value in diag.items():
            self.log(f"edit/{name}", float(value), prog_bar=name in ("v_loss", "update_norm"), on_step=True, batch_size=len(batch))
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.hparams["accumulate"]:
            self.restore()
