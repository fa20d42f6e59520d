"""Fine-tuning editors over localized parameter masks.

* :class:`LocFTBF` — breadth-first, epoch-based mini-batch fine-tuning ("Fine-tuning Done Right
  in Model Editing"): all requests form the training set; each epoch reshuffles them into
  mini-batches (``EditDataModule.batch_size``, 100 by default); Adam (no weight decay, no
  scheduler) at ``lr``; a batch whose loss is below ``min_loss`` takes no optimizer step; the
  run stops early once an epoch's mean loss is below ``min_loss``. ``max_epochs`` of the
  Trainer is the number of epochs (25). ``round_size`` runs it in successive rounds over chunks
  of the requests (each round its own epochs, early stop and Adam state, all in one fit),
  keeping each round's edit (``accumulate``) or restoring it: the editing strategies of
  :mod:`lit_edit.strategy`.
* :class:`DepthFirstFT` — the depth-first pipeline LocFT-BF argues against: each request (or
  edit batch) is optimised alone to convergence (up to ``steps`` Adam steps) before the next.

Both editors share one loss (:func:`ft_loss`), mask, optimizer and projection; switching
between the pipelines, the mini-batch size (``data.batch_size``) and the number of epochs is a
configuration change.

Both losses append nothing but EOS to the target (``append_eos``), pad with EOS, and never
add tokens:

* ``ft_m`` — teacher-forced cross-entropy on the target tokens only (prompt and padding
  masked), mean over each sample's target tokens, then over the batch;
* ``ft_l`` — the old ROME baseline: every target token scored at the last prompt position.

``lora_rank`` switches to a LoRA adapter on the same localized modules; the adapter is merged
into the base weights when fitting ends, so save/restore/export see ordinary tensors.

``preservation`` (off by default) adds the preservation objective of the locate-and-edit
methods to the fine-tuning loss: for each tuned linear weight ``W`` (original ``W₀``), the
relative squared change of its output on the keys ``k`` (its inputs) of generic text,

    λ · E_k ‖(W − W₀) k‖² / E_k ‖W₀ k‖²  =  λ · tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ),   C = E[k kᵀ],

with ``C`` computed once per module by :func:`lit_edit.stats.second_moment` (offline Wikipedia,
train split, cached on disk), the same statistics MEMIT and EMMET use. It steers the update into
directions generic text hardly uses, at the cost of one small matrix product per step; the
edit loss alone still decides ``min_loss`` skips and early stopping.

``neighbour_kl`` (off by default) adds the relation-neighbour term of :mod:`lit_edit.neighbours`:
each request's prompt with its subject replaced by other subjects, where the edited model's
next-token distributions must stay those of the unedited model (KL), so that an edit learns the
fact rather than the relation; ``neighbour_rise`` holds down, on the same prompts, the rise of the
request's new target alone (what the neighbourhood score compares). ``write_positions`` (``all``
by default) can restrict where the edit loss's gradient reaches the tuned modules to the
subject's tokens (``subject``, ``subject_answer``, ``fact_token``), as the locate-and-edit methods
write. ``LocFTBF(extend_epochs=X)`` lets a fit run up to X epochs past
``max_epochs`` while its epoch loss still falls.

``cache_block_inputs`` (on by default): the blocks below the lowest tuned block are frozen and
see the same inputs at every step, so during a fit the hidden states entering that block are
kept per request (:class:`~lit_edit.losses.BlockInputCache`, on the model's device): a request
is run through the whole model the first time it is seen, and from that block up afterwards.
The cache is used only when it is exact: every trainable tensor (LoRA adapters included) in that
block or above (or in the final norm / LM head), the embeddings untouched, the lowest tuned
block not block 0, and no dropout in the model; otherwise, or with ``cache_block_inputs=False``,
every step runs the whole model. The loss is the same either way up to float rounding.

``group_by_length`` (on by default): a mini-batch runs as a few sub-batches of requests of similar
length rather than one batch padded to its longest request (CounterFact mini-batches are about
40% padding), with the same per-request losses and gradient up to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, Optional, Union

import torch
from torch import nn
from typing_extensions import override

from lit_edit.closed_form.tokens import subject_tokens
from lit_edit.config_hub import hub_defaults, hub_settings
from lit_edit.data.request import EditRequest, RecordError
from lit_edit.data.tokenize import encode_prompt
from lit_edit.distributed import all_reduce_sum, rank_and_world_size
from lit_edit.editors.base import Editor
from lit_edit.guards import DEFAULT_MAX_UPDATE_RATIO, UpdateGuard
from lit_edit.losses import BlockInputCache, PreservationTerm, ft_loss, preservation_loss
from lit_edit.masks import ElementMaskHook, check_layers, resolve_mask
from lit_edit.models import eval_mode
from lit_edit.neighbours import CHOICES, NeighbourKeys, NeighbourRise, RelationNeighbours, check_subjects_source
from lit_edit.options import check_bool, check_int, check_real, check_str

log = logging.getLogger(__name__)

__all__ = ["DepthFirstFT", "FineTuneEditor", "LocFTBF", "WRITE_POSITIONS", "write_spans"]

#: Where the edit loss's gradient may reach the tuned modules (``FineTuneEditor(write_positions=...)``).
WRITE_POSITIONS = ("all", "subject", "subject_answer", "fact_token")


def _check_options(**o: Any) -> None:
    """Refuse bad fine-tuning options before any work, naming the option (TypeError / ValueError)."""
    targets = o["target_modules"]
    if targets is not None:
        if isinstance(targets, str):
            check_str("target_modules", targets)
        elif not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in targets):
            raise TypeError(f"target_modules must be a regex string or a list of module names, got {targets!r}")
        elif not targets:
            raise ValueError("target_modules is empty: name at least one module (e.g. ['mlp.down_proj']), or leave it null")
    check_layers(o["layers_to_transform"], None, "layers_to_transform")
    if o["layers_to_transform"] is not None and targets is None:
        raise ValueError(
            "layers_to_transform restricts target_modules, which is null (the config hub's location, blocks included); "
            "pass target_modules too, e.g. target_modules=['mlp.down_proj']"
        )
    check_real("lr", o["lr"], minimum=0, exclusive=True, allow_none=True)
    if o["loss"] not in ("ft_m", "ft_l"):
        raise ValueError(f"loss must be 'ft_m' or 'ft_l', got {o['loss']!r}")
    check_bool("append_eos", o["append_eos"])
    check_real("min_loss", o["min_loss"], minimum=0)
    check_real("adam_eps", o["adam_eps"], minimum=0, exclusive=True)
    check_real("linf_eps", o["linf_eps"], minimum=0, exclusive=True, allow_none=True)
    check_int("lora_rank", o["lora_rank"], minimum=1, allow_none=True)
    check_real("lora_alpha", o["lora_alpha"], minimum=0, exclusive=True, allow_none=True)
    if o["lora_alpha"] is not None and o["lora_rank"] is None:
        raise ValueError("lora_alpha scales a LoRA adapter, but lora_rank is null (full fine-tuning); pass lora_rank too")
    if o["linf_eps"] is not None and o["lora_rank"] is not None:
        raise ValueError("linf_eps constrains tuned weights directly; it cannot be combined with lora_rank")
    check_real("preservation", o["preservation"], minimum=0)
    if o["preservation"] > 0 and o["lora_rank"] is not None:
        raise ValueError("preservation penalises the change of tuned weights; it cannot be combined with lora_rank")
    check_int("preservation_texts", o["preservation_texts"], minimum=1)
    check_str("preservation_corpus", o["preservation_corpus"])
    check_real("neighbour_kl", o["neighbour_kl"], minimum=0)
    if o["neighbour_kl"] > 0 and o["lora_rank"] is not None:
        raise ValueError("neighbour_kl computes the unedited model's outputs with the tuned tensors put back; it cannot be "
                         "combined with lora_rank")
    check_real("neighbour_rise", o["neighbour_rise"], minimum=0)
    if o["neighbour_rise"] > 0 and o["lora_rank"] is not None:
        raise ValueError("neighbour_rise reads the unedited model's scores with the tuned tensors put back; it cannot be "
                         "combined with lora_rank")
    check_real("neighbour_keys", o["neighbour_keys"], minimum=0)
    if o["neighbour_keys"] > 0 and o["lora_rank"] is not None:
        raise ValueError("neighbour_keys penalises the change of tuned weights; it cannot be combined with lora_rank")
    if o["neighbour_keys_own"] not in NeighbourKeys.OWN:
        raise ValueError(f"neighbour_keys_own must be one of {list(NeighbourKeys.OWN)}, got {o['neighbour_keys_own']!r}")
    check_int("neighbour_prompts", o["neighbour_prompts"], minimum=1)
    check_int("neighbour_tokens", o["neighbour_tokens"], minimum=1)
    check_subjects_source(o["neighbour_subjects"])
    check_bool("neighbour_target", o["neighbour_target"])
    if o["neighbour_choice"] not in CHOICES:
        raise ValueError(f"neighbour_choice must be one of {list(CHOICES)}, got {o['neighbour_choice']!r}")
    check_bool("cache_block_inputs", o["cache_block_inputs"])
    check_bool("group_by_length", o["group_by_length"])
    if o["write_positions"] not in WRITE_POSITIONS:
        raise ValueError(f"write_positions must be one of {list(WRITE_POSITIONS)}, got {o['write_positions']!r}")


class FineTuneEditor(Editor):
    """Shared machinery of the fine-tuning editors: mask, optimizer, loss, projection.

    The default tuning location (``target_modules`` left ``None``) and its learning rate come
    from the config hub: ``lit_edit/config_hub/<model>/<editor>.yaml`` for a model in the hub
    (:mod:`lit_edit.config_hub`), the generic ``lit_edit/config_hub/defaults/<editor>.yaml``
    otherwise.

    Args:
        lr: Adam learning rate (no weight decay); ``None`` = the config hub's learning rate of
            the model's default location, or the generic one (5e-4) for any other location.
        loss: ``ft_m`` (target-only teacher forcing) or ``ft_l`` (last-prompt-position baseline).
        append_eos: append EOS to every target so the model learns to stop after the answer.
        min_loss: a batch below this loss takes no optimizer step; an epoch whose mean loss is
            below it ends training.
        adam_eps: Adam's ε (torch's 1e-8 by default). Adam moves every element with a nonzero
            gradient by about ``lr`` per step, however small its gradient; a larger ε scales the
            steps of elements whose gradient is below ε down in proportion to it.
        linf_eps: optional L∞ constraint: each tuned element stays within ``w0 ± linf_eps``.
        element_masks: optional ``{tensor name: bool tensor}`` (or a ``.safetensors`` path)
            restricting the tuned tensors to some of their elements.
        lora_rank: train a LoRA adapter of this rank on the same modules (merged at fit end).
        lora_alpha: LoRA scaling numerator (default ``2 * lora_rank``).
        preservation: weight λ of the preservation term (module docstring); 0 = the published
            methods' loss. Needs every tuned tensor to be the weight of a linear module inside a
            block; not combined with ``lora_rank``.
        preservation_texts: number of generic texts (truncated to 256 tokens) whose keys form
            the statistics ``C``.
        preservation_corpus: source of those texts (``wiki:train`` = the offline Wikipedia
            extracts not used for perplexity; or a local file / hub dataset name).
        neighbour_kl: weight of the relation-neighbour term (:mod:`lit_edit.neighbours`): each
            request's prompt with its subject replaced by ``neighbour_prompts`` other subjects,
            and the KL divergence of the edited model's next-token distributions there from the
            unedited model's, added to the loss; 0 = off. Requests without a subject in their
            prompt get no neighbours. Not combined with ``lora_rank``.
        neighbour_rise: weight of the target-rise term (:class:`~lit_edit.neighbours.NeighbourRise`):
            on the same neighbour prompts, the rise of the request's new target's mean token
            log-probability over the unedited model's, counted where it rose, added to the loss;
            0 = off. One extra forward and backward per step over the neighbour prompts. Not
            combined with ``lora_rank``.
        neighbour_keys: weight of the key-level relation-neighbour term
            (:class:`~lit_edit.neighbours.NeighbourKeys`): the relative squared change of each
            tuned linear module's outputs on its inputs over the neighbour prompts (the same
            prompts as ``neighbour_kl``, followed by the new target), added to the loss; 0 = off.
            One small matrix product per step, no extra forward pass. Needs the weights of
            linear modules inside blocks; not combined with ``lora_rank``.
        neighbour_keys_own: ``none``; ``subject``: ``neighbour_keys`` also holds the request's
            own prompt and target at every position outside the subject's tokens (the relation's
            and the answer's words), so the edit is written through the subject's tokens;
            ``fact_token``: at every position but the subject's last token.
        neighbour_prompts: other subjects per request.
        neighbour_tokens: positions compared per neighbour prompt: the next token after the
            prompt, then the unedited model's own greedy continuation (teacher forced).
        neighbour_subjects: where the other subjects come from: ``wiki:train`` (offline
            Wikipedia article titles of the statistics split) or a ``.txt`` file, one per line.
        neighbour_target: also compare along the request's new target, teacher forced after each
            neighbour prompt: the edit must not make its new answer likelier for other subjects.
        neighbour_choice: ``random`` (seeded draws per request), ``similar`` (the subjects
            nearest the request's by the model's input embeddings: those an edit is most likely
            to spill onto) or ``perturbed`` (near-copies of the request's own subject, one word
            swapped for a word of the candidates: names that differ from it in one place).
        max_update_ratio: after every optimizer step, the tuned tensors must be finite and their
            total change W − W₀ from the original must stay under this (the larger of
            ‖W − W₀‖_F/‖W₀‖_F and max|W − W₀|/max|W₀|, :mod:`lit_edit.guards`); ``None`` checks
            finiteness only. A violation puts back the weights from before the step.
        on_bad_update: ``refuse`` (stop the fit with :class:`~lit_edit.guards.UnsafeUpdateError`
            naming the batch's case ids, the tensor and the ratio) or ``warn`` (continue).
            Non-finite weights are always refused.
        chat_template: ``never`` (raw prompts, default), ``auto`` or ``always`` (the tokenizer's chat
            template, the target as the assistant's answer); see :class:`~lit_edit.editors.base.Editor`.
        cache_block_inputs: during a fit, keep each request's hidden states entering the lowest
            tuned block and run later steps from that block up (module docstring); used only
            where exact, ``False`` runs the whole model at every step.
        group_by_length: run each mini-batch as a few sub-batches of requests of similar length
            (less padding; :func:`~lit_edit.losses.length_groups`). The per-request losses and
            the mini-batch's gradient are the same up to float rounding; ``False`` pads the
            whole mini-batch to its longest request.
        write_positions: where the edit loss's gradient reaches the tuned modules. ``all`` (the
            published method): every position of prompt and target. ``subject``: the subject's
            tokens in the prompt only; ``subject_answer``: those and the answer's own positions
            (where the model continues the answer and learns to stop after it), not the
            question's other words; ``fact_token``: the subject's last token only. The forward
            pass is the same; the outputs of the tuned modules elsewhere are cut from the edit
            loss's backward pass (:func:`~lit_edit.losses.ft_loss`), so the edit is written
            where the model reads the subject and carried to the answer by the blocks above,
            rather than at the question's words, which every subject asked the same question
            shares. Every request needs a subject that occurs in its prompt.

    Float16 weights keep Adam's state in float16, where ε below 6.1e-5 underflows and the step
    becomes NaN: with float16 tensors to tune, ``adam_eps`` must be at least that (else an error
    at construction); bfloat16 and float32 have no such limit.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        target_modules: Union[list[str], str, None] = None,
        layers_to_transform: Union[list[int], int, None] = None,
        layers_pattern: Optional[str] = None,
        exclude_modules: Union[list[str], str, None] = None,
        lr: Optional[float] = None,
        loss: Literal["ft_m", "ft_l"] = "ft_m",
        append_eos: bool = True,
        min_loss: float = 1e-2,
        adam_eps: float = 1e-8,
        linf_eps: Optional[float] = None,
        element_masks: Union[str, dict, None] = None,
        lora_rank: Optional[int] = None,
        lora_alpha: Optional[float] = None,
        preservation: float = 0.0,
        preservation_texts: int = 1000,
        preservation_corpus: str = "wiki:train",
        neighbour_kl: float = 0.0,
        neighbour_rise: float = 0.0,
        neighbour_keys: float = 0.0,
        neighbour_keys_own: Literal["none", "subject", "fact_token"] = "none",
        neighbour_prompts: int = 4,
        neighbour_tokens: int = 1,
        neighbour_subjects: str = "wiki:train",
        neighbour_target: bool = False,
        neighbour_choice: Literal["random", "similar", "perturbed"] = "random",
        max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO,
        on_bad_update: Literal["refuse", "warn"] = "refuse",
        chat_template: Literal["auto", "never", "always"] = "never",
        cache_block_inputs: bool = True,
        group_by_length: bool = True,
        write_positions: Literal["all", "subject", "subject_answer", "fact_token"] = "all",
    ):
        _check_options(
            target_modules=target_modules, layers_to_transform=layers_to_transform, lr=lr, loss=loss, append_eos=append_eos,
            min_loss=min_loss, adam_eps=adam_eps, linf_eps=linf_eps, lora_rank=lora_rank, lora_alpha=lora_alpha,
            preservation=preservation, preservation_texts=preservation_texts, preservation_corpus=preservation_corpus,
            neighbour_kl=neighbour_kl, neighbour_rise=neighbour_rise, neighbour_keys=neighbour_keys, neighbour_keys_own=neighbour_keys_own,
            neighbour_prompts=neighbour_prompts, neighbour_tokens=neighbour_tokens,
            neighbour_subjects=neighbour_subjects, neighbour_target=neighbour_target, neighbour_choice=neighbour_choice,
            cache_block_inputs=cache_block_inputs, group_by_length=group_by_length, write_positions=write_positions,
        )  # before the model is loaded
        guard = UpdateGuard(max_update_ratio, on_bad_update)
        super().__init__(model, tokenizer, dtype, target_modules, layers_to_transform, layers_pattern, exclude_modules,
                         chat_template=chat_template)
        #: The check the tuned tensors pass after every optimizer step (:mod:`lit_edit.guards`).
        self.guard = guard
        self._w0: dict[str, torch.Tensor] = {}
        if lora_rank is None:
            self.check_adam_dtype(self.model.parameters())
        check_layers(layers_to_transform, self.num_layers, "layers_to_transform")
        self._element_masks = self._read_element_masks(element_masks)
        if isinstance(element_masks, dict):
            self.hparams["element_masks"] = sorted(element_masks)
        self._trainable: dict[str, nn.Parameter] = {}
        self._prepared = False
        #: Optimizer steps taken by the last fit (batches below ``min_loss`` take none).
        self.optimizer_steps = 0
        #: tensor name -> its preservation term (C, W₀ as (out, in), tr(W₀ C W₀ᵀ)), filled when fitting starts.
        self._preserve: dict[str, PreservationTerm] = {}
        #: (prompt, subject, write_positions) -> the request's write spans, filled during a fit.
        self._spans: dict[tuple, list[tuple[int, Optional[int]]]] = {}
        #: The hidden states entering the lowest tuned block during a fit (``None`` when not used).
        self.block_inputs: Optional[BlockInputCache] = None
        #: Relation-neighbour prompts and their unedited targets (``None`` when ``neighbour_kl`` is 0).
        self.neighbours: Optional[RelationNeighbours] = None
        #: The new target's unedited scores after the neighbour prompts (``None`` when ``neighbour_rise`` is 0).
        self.neighbour_rise: Optional[NeighbourRise] = None
        #: Second moments of the tuned modules' inputs on the neighbour prompts (``None`` when ``neighbour_keys`` is 0).
        self.neighbour_keys: Optional[NeighbourKeys] = None

    # ------------------------------------------------------------------ configuration

    #: Key of this editor's files in the config hub (``lit_edit/config_hub/<model>/<hub_key>.yaml``).
    hub_key: ClassVar[str] = "locft_bf"

    def hub_settings(self) -> dict[str, Any]:
        """This editor's config hub settings for the loaded model (generic defaults merged with its file).

        A model's file may hold a group ``at_subject`` (``target_modules``, ``layers_to_transform``,
        ``lr``): the location and lr measured for writes at the subject's tokens. It replaces the
        file's own location and lr when ``write_positions`` is not ``all``; a file without it
        keeps its location for such writes, with a warning."""
        if getattr(self, "_hub", None) is None:  # read once per editor, so its warning is said once
            hub = hub_settings(self.model, self.hub_key)
            at_subject = hub.pop("at_subject", None)
            where = self.hparams.get("write_positions", "all")
            if at_subject and where != "all":
                hub.update({k: v for k, v in at_subject.items() if v is not None})
            elif where != "all" and hub.get("target_modules") is not None:
                log.warning(
                    "the config hub's tuning location for %s was measured for edits written at every position; with "
                    "write_positions=%r it is used as is (choose one with recipes/location_sweep.py --model.write_positions %s, "
                    "or pass write_positions='all')", self.model.config.model_type, where, where,
                )
            self._hub = hub
        return self._hub

    def default_location(self) -> dict[str, Any]:
        hub = self.hub_settings()
        if hub.get("target_modules") is None:
            layer = int(round(0.7 * (self.num_layers - 1)))
            log.warning(
                "no default tuning location for %s with %d blocks in the config hub; using mlp_out of block %d "
                "(run recipes/location_sweep.py to choose one)", self.model.config.model_type, self.num_layers, layer,
            )
            return {"target_modules": [self.arch.mlp_out], "layers_to_transform": [layer]}
        return {k: hub[k] for k in ("target_modules", "layers_to_transform") if hub.get(k) is not None}

    @property
    def learning_rate(self) -> float:
        if self.hparams.get("lr") is not None:
            return float(self.hparams["lr"])
        if self.hparams.get("target_modules") is None:
            return float(self.hub_settings()["lr"])
        return float(hub_defaults(self.hub_key)["lr"])

    @staticmethod
    def _read_element_masks(spec: Union[str, dict, None]) -> dict[str, torch.Tensor]:
        if spec is None:
            return {}
        if isinstance(spec, str):
            from safetensors.torch import load_file

            return {k: v.bool() for k, v in load_file(spec).items()}
        return {k: torch.as_tensor(v).bool() for k, v in spec.items()}

    # ------------------------------------------------------------------ preparation

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.prepare_for_editing()

    def prepare_for_editing(self) -> dict[str, nn.Parameter]:
        """Freeze everything but the mask, record originals, attach masks / LoRA (idempotent)."""
        if self._prepared:
            return self._trainable
        mask = self.parameter_mask()
        mask.element_masks = self._element_masks
        selected = resolve_mask(self.model, mask)
        _refuse_tied(self.model, selected)
        self.model.requires_grad_(False)
        self.touch(selected)
        if self.hparams.get("lora_rank"):
            self._trainable = self._inject_lora(mask)
        else:
            for name, p in selected.items():
                p.requires_grad_(True)
                if name in self._element_masks:
                    p.register_hook(ElementMaskHook(self._element_masks[name]))
            self._trainable = selected
        n = sum(p.numel() for p in self._trainable.values())
        log.info("tuning %d tensor(s), %d parameters: %s", len(self._trainable), n, sorted(selected))
        self._prepared = True
        return self._trainable

    def _inject_lora(self, mask) -> dict[str, nn.Parameter]:
        from peft import LoraConfig, inject_adapter_in_model

        r = int(self.hparams["lora_rank"])
        config = LoraConfig(
            r=r,
            lora_alpha=self.hparams.get("lora_alpha") or 2 * r,
            lora_dropout=0.0,
            target_modules=mask.target_modules,
            layers_to_transform=mask.layers_to_transform,
            layers_pattern=mask.layers_pattern,
            exclude_modules=mask.exclude_modules,
        )
        inject_adapter_in_model(config, self.model)
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad}

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Merge LoRA adapters into the (already recorded) base weights and remove them."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, module.get_base_layer())
        self.model.requires_grad_(False)
        self._trainable = {}
        self._prepared = False

    @torch.no_grad()
    def project(self) -> None:
        """Apply element masks and the L∞ constraint to the tuned tensors (after a step)."""
        eps = self.hparams.get("linf_eps")
        if eps is None and not self._element_masks:
            return
        for name, p in self._trainable.items():
            if name not in self._originals:
                continue
            w0 = self._originals[name].to(p.device)
            if eps is not None:
                p.copy_(torch.maximum(torch.minimum(p, w0 + eps), w0 - eps))
            if name in self._element_masks:
                p.copy_(torch.where(self._element_masks[name].to(p.device), p, w0))

    # ------------------------------------------------------------------ guards

    def check_adam_dtype(self, params) -> None:
        """Refuse float16 tensors to tune when ``adam_eps`` underflows in float16 (Adam's state has the
        tensors' dtype; ε = 1e-8 becomes 0 and the step NaN)."""
        eps = float(self.hparams["adam_eps"])
        tiny = torch.finfo(torch.float16).tiny
        if eps < tiny and any(p.dtype == torch.float16 for p in params):
            raise ValueError(
                f"adam_eps={eps:g} underflows in float16: Adam keeps its state in the tuned tensors' dtype, and with "
                f"ε below {tiny:.2g} (the smallest normal float16) its steps become NaN. Pass adam_eps >= 1e-4, or tune "
                "in bfloat16 / float32 (--model.dtype bfloat16, --trainer.precision bf16-true)"
            )

    @torch.no_grad()
    def snapshot_trainable(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors (taken before an optimizer step, to undo a refused one)."""
        return {name: p.detach().clone() for name, p in self._trainable.items()}

    def _changes(self):
        """``(name, W₀, W − W₀)`` of every tuned weight (for LoRA: the adapter's merged update)."""
        if self.hparams.get("lora_rank"):
            from peft.tuners.lora import LoraLayer

            for name, module in self.model.named_modules():
                if isinstance(module, LoraLayer):
                    yield f"{name}.weight", module.get_base_layer().weight, module.get_delta_weight("default")
            return
        for name, p in self._trainable.items():
            w0 = self._w0.get(name)
            if w0 is None or w0.device != p.device or w0.dtype != p.dtype:
                w0 = self._w0[name] = self._originals[name].to(device=p.device, dtype=p.dtype)
            acc = torch.promote_types(p.dtype, torch.float32)
            yield name, w0, p.detach().to(acc) - w0.to(acc)

    @torch.no_grad()
    def check_step(self, requests: list[EditRequest], saved: dict[str, torch.Tensor]) -> float:
        """After an optimizer step: the tuned tensors must be finite and their change from the
        originals within :attr:`guard`'s limit. A violation puts ``saved`` (the pre-step values)
        back and raises :class:`~lit_edit.guards.UnsafeUpdateError` (``on_bad_update="warn"``:
        only a non-finite tensor does). Returns the largest ratio (logged as ``train/update_ratio``)."""
        from lit_edit.guards import UnsafeUpdateError

        ids = [r.case_id for r in requests]
        hint = (f"Lower lr (now {self.learning_rate:g}), or check adam_eps ({self.hparams['adam_eps']:g}) "
                f"and the weights' dtype (docs/methods.md §5.1)")
        largest = 0.0
        try:
            for name, w0, delta in self._changes():
                largest = max(largest, self.guard.check(name, w0, delta, ids, what="change since the original", hint=hint).ratio)
        except UnsafeUpdateError:
            for name, value in saved.items():
                self._trainable[name].copy_(value)
            raise
        return largest

    # ------------------------------------------------------------------ optimisation

    @override
    def configure_optimizers(self):
        params = list(self.prepare_for_editing().values())
        self.check_adam_dtype(params)
        return torch.optim.Adam(params, lr=self.learning_rate, eps=self.hparams["adam_eps"], weight_decay=0.0)

    def check_write_positions(self) -> None:
        """With ``write_positions`` other than ``all``, refuse before any work a tuned tensor that
        is no weight of a module inside a block below the last one (there the subject's
        positions have no path to the answer's), LoRA adapters, and (with an
        :class:`~lit_edit.data.EditDataModule`) a request whose subject is missing or not in its
        prompt."""
        where = self.hparams.get("write_positions", "all")
        self._spans = {}  # spans of this fit only
        if where == "all":
            return
        if self.hparams.get("lora_rank"):
            raise ValueError(f"write_positions={where!r} restricts the tuned modules' own outputs; it cannot be combined with lora_rank")
        prefix = f"{self.arch.layers}."
        for name in self.prepare_for_editing():
            index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            if not index.isdigit() or int(index) >= self.num_layers - 1:
                raise ValueError(
                    f"write_positions={where!r} writes the edit through the subject's positions, which reach the answer "
                    f"only through the blocks above; {name!r} is not in a block below the last one (block {self.num_layers - 1})"
                )
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        load = getattr(datamodule, "load", None)
        if callable(load):  # every request's subject located before the first step (a RecordError naming the record)
            for r in load():
                self._write_spans_of(r, where)

    def _write_spans_of(self, request: EditRequest, where: str) -> list[tuple[int, Optional[int]]]:
        """:func:`write_spans` of ``request``, computed once per fit."""
        key = (request.prompt, request.subject, where)
        if key not in self._spans:
            try:
                self._spans[key] = write_spans(self.tokenizer, request, where)
            except RecordError as e:  # the record and field as found, and the way to edit such data
                raise RecordError(
                    e.record, e.field, f"{e.problem} (write_positions={where!r} writes the edit at the subject's tokens; "
                    "write_positions='all' edits requests without a subject)"
                ) from e
        return self._spans[key]

    def edit_loss(self, requests: list[EditRequest]) -> torch.Tensor:
        """Per-request loss under this editor's settings (shape ``(B,)``)."""
        where = self.hparams.get("write_positions", "all")
        spans, modules = None, ()
        if where != "all":
            spans = [self._write_spans_of(r, where) for r in requests]
            modules = [self.model.get_submodule(name.rsplit(".", 1)[0]) for name in self._trainable]
        return ft_loss(
            self.model, self.tokenizer, requests, self.hparams["loss"], self.hparams["append_eos"], self.block_inputs,
            group_by_length=self.hparams.get("group_by_length", True), write_spans=spans, write_modules=modules,
        )

    def block_input_layer(self) -> tuple[Optional[int], str]:
        """``(block, "")``: the lowest tuned block, whose inputs can be cached during a fit; or
        ``(None, reason)`` when caching them would not be exact (or is switched off)."""
        if not self.hparams.get("cache_block_inputs", True):
            return None, "cache_block_inputs=False"
        prefix = f"{self.arch.layers}."
        above = (f"{self.arch.final_norm}.", f"{self.arch.lm_head}.")
        lowest = None
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            if index.isdigit():
                lowest = int(index) if lowest is None else min(lowest, int(index))
            elif not name.startswith(above):
                return None, f"{name} is trained and lies below the blocks"
        if lowest is None or lowest == 0:
            return None, "the lowest tuned block is block 0" if lowest == 0 else "no tuned block"
        config = getattr(self.model, "config", None)
        for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                    "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(config, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return None, f"the model has dropout ({key}={value})"
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.model.modules()):
            return None, "the model has dropout"
        return lowest, ""

    def start_block_input_cache(self) -> None:
        """Create the fit's :attr:`block_inputs` where it is exact (see :meth:`block_input_layer`)."""
        layer, reason = self.block_input_layer()
        if layer is None:
            self.block_inputs = None
            log.info("every step runs the whole model (%s)", reason)
            return
        self.block_inputs = BlockInputCache(self.model.get_submodule(self.arch.layers), layer)
        log.info("caching the hidden states entering block %d: steps after a request's first run blocks %d-%d only",
                 layer, layer, self.num_layers - 1)

    def stop_block_input_cache(self) -> None:
        """Log the cache's size and drop it (the states are valid for one fit only)."""
        cache, self.block_inputs = self.block_inputs, None
        if cache is not None:
            log.info(
                "block-input cache: %d request(s), %.2f MB on %s; %d forward(s) from the block, %d in full",
                len(cache), cache.nbytes / 2**20, self.device, cache.hits, cache.misses,
            )

    def training_loss(self, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(edit loss, loss to optimise)``: the batch-mean edit loss, plus the preservation and
        relation-neighbour terms."""
        self.fill_neighbours(requests)  # before the edit loss's graph holds the current weights
        edit = self.edit_loss(requests).mean()
        total = edit
        if self._preserve:
            penalty = self.preservation_loss()
            self.log("train/preservation", penalty.detach(), on_step=True, on_epoch=False, batch_size=len(requests))
            total = total + float(self.hparams["preservation"]) * penalty
        if self.neighbours is not None:
            kl = self.neighbour_loss(requests)
            if kl is not None:
                self.log("train/neighbour_kl", kl.detach(), on_step=True, on_epoch=False, batch_size=len(requests))
                total = total + float(self.hparams["neighbour_kl"]) * kl
        if self.neighbour_rise is not None:
            rise = self.neighbour_rise.loss(self.model, self.tokenizer, requests, self.block_inputs)
            if rise is not None:
                self.log("train/neighbour_rise", rise.detach(), on_step=True, on_epoch=False, batch_size=len(requests))
                total = total + float(self.hparams["neighbour_rise"]) * rise
        if self.neighbour_keys is not None:
            change = self.neighbour_key_loss()
            if change is not None:
                self.log("train/neighbour_keys", change.detach(), on_step=True, on_epoch=False, batch_size=len(requests))
                total = total + float(self.hparams["neighbour_keys"]) * change
        return edit, total

    # ------------------------------------------------------------------ relation neighbours

    def prepare_neighbours(self) -> None:
        """Load the candidate subjects when ``neighbour_kl`` or ``neighbour_keys`` > 0 (the
        targets and keys are filled lazily)."""
        self.neighbours, self.neighbour_keys, self.neighbour_rise = None, None, None
        use_kl, use_keys = bool(self.hparams.get("neighbour_kl")), bool(self.hparams.get("neighbour_keys"))
        use_rise = bool(self.hparams.get("neighbour_rise"))
        if not (use_kl or use_keys or use_rise):
            return
        from lit_edit.neighbours import load_subjects

        choice = self.hparams.get("neighbour_choice", "random")
        neighbours = RelationNeighbours(
            load_subjects(self.hparams["neighbour_subjects"]), self.hparams["neighbour_prompts"], self.hparams["neighbour_tokens"],
            choice=choice, on_target=bool(self.hparams.get("neighbour_target", False)),
        )
        if use_kl:
            self.neighbours = neighbours
            log.info("relation-neighbour term: %d prompts per request, %d token(s) each, %s subjects from %s (%d)",
                     neighbours.prompts, neighbours.tokens, choice, self.hparams["neighbour_subjects"],
                     len(neighbours.subjects))
        if use_rise:
            self.neighbour_rise = NeighbourRise(neighbours)
            log.info("target-rise term: %d prompts per request, %s subjects from %s (%d)",
                     neighbours.prompts, choice, self.hparams["neighbour_subjects"], len(neighbours.subjects))
            if choice == "perturbed" and self.hparams.get("write_positions", "all") != "all":
                log.warning(
                    "neighbour_rise with neighbour_choice=perturbed and write_positions=%s: a subject with one word swapped "
                    "shares most of the positions the edit is written at, so the term works against the edit itself "
                    "(measured: the edits not learned, perplexity +43%% or more, docs/results.md §12.6); "
                    "neighbour_choice=random is the measured choice", self.hparams["write_positions"])
        if use_keys:
            for name in self._trainable:
                self._block_module(name)  # a clear error before any work for a tensor that is no linear weight
            own = self.hparams.get("neighbour_keys_own", "none")
            self.neighbour_keys = NeighbourKeys(neighbours, own=own)
            log.info("key-level relation-neighbour term: %d prompts per request, %s subjects from %s (%d)%s",
                     neighbours.prompts, choice, self.hparams["neighbour_subjects"], len(neighbours.subjects),
                     {"none": "", "subject": "; the requests' own positions outside the subject too",
                      "fact_token": "; the requests' own positions but the subject's last token too"}[own])

    @contextmanager
    def _original_weights(self) -> Iterator[None]:
        """The tuned tensors put back to their originals for the block, their current values after."""
        saved = self.snapshot_trainable()
        try:
            with torch.no_grad():
                for name, p in self._trainable.items():
                    p.copy_(self._originals[name].to(device=p.device, dtype=p.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self._trainable[name].copy_(value)

    @torch.no_grad()
    def fill_neighbours(self, requests: list[EditRequest]) -> None:
        """The unedited model's targets (``neighbour_kl``), new-target scores (``neighbour_rise``) and
        keys (``neighbour_keys``) on the neighbours of those of ``requests`` not seen yet, read with the tuned tensors put back to
        their originals for the pass. Call it before a step's forward pass: the pass changes the
        tuned tensors in place, which a graph holding them cannot survive."""
        kl = self.neighbours.missing(requests) if self.neighbours is not None else []
        keys = self.neighbour_keys.missing(requests) if self.neighbour_keys is not None else []
        rise = self.neighbour_rise.missing(requests) if self.neighbour_rise is not None else []
        if not (kl or keys or rise):
            return
        with self._original_weights(), eval_mode(self.model):
            if kl:
                self.neighbours.fill(self.model, self.tokenizer, kl, self.block_inputs)
            if rise:
                self.neighbour_rise.fill(self.model, self.tokenizer, rise, self.block_inputs)
            if keys:
                modules = {}
                for name in self._trainable:
                    layer, module = self._block_module(name)
                    modules[name] = self.model.get_submodule(f"{self.arch.layers}.{layer}.{module}")
                self.neighbour_keys.fill(self.model, self.tokenizer, keys, modules)

    def neighbour_key_loss(self) -> Optional[torch.Tensor]:
        """Relative change of the tuned modules' outputs on the neighbour keys read so far."""
        weights = {name: (p.T if self.arch.conv1d else p) for name, p in self._trainable.items()}
        originals = {name: (w.T if self.arch.conv1d else w) for name, w in self._originals.items() if name in weights}
        return self.neighbour_keys.loss(weights, originals)

    def neighbour_loss(self, requests: list[EditRequest]) -> Optional[torch.Tensor]:
        """Mean KL of the edited model from the unedited one on the neighbours of ``requests``
        (filled by :meth:`fill_neighbours`)."""
        return self.neighbours.loss(self.model, self.tokenizer, requests, self.block_inputs)

    # ------------------------------------------------------------------ preservation

    def _block_module(self, name: str) -> tuple[int, str]:
        """``(block index, module path inside the block)`` of a tuned weight, or a clear error."""
        prefix = f"{self.arch.layers}."
        parts = name[len(prefix):].split(".", 1) if name.startswith(prefix) else []
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].endswith(".weight"):
            raise ValueError(
                f"preservation and neighbour_keys need the weights of linear modules inside blocks ({prefix}<i>.<module>.weight); "
                f"{name!r} is not one"
            )
        module_path = parts[1][: -len(".weight")]
        module = self.model.get_submodule(f"{prefix}{parts[0]}.{module_path}")
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            shape = "not a weight" if weight is None else f"of shape {tuple(weight.shape)}"
            raise ValueError(f"preservation and neighbour_keys need 2-D linear weights; {name!r} is {shape}")
        return int(parts[0]), module_path

    def prepare_preservation(self) -> None:
        """Load (or compute and cache) ``C`` for every tuned tensor when ``preservation`` > 0."""
        self._preserve = {}
        if not self.hparams.get("preservation"):
            return
        from lit_edit.stats import second_moment

        for name, p in self.prepare_for_editing().items():
            layer, module = self._block_module(name)
            sm = second_moment(
                self.model, self.tokenizer, layer, module,
                corpus=self.hparams["preservation_corpus"],
                n_samples=int(self.hparams["preservation_texts"]),
                dtype="float64",
                model_name=self.base_model_name,
            )
            w0 = self._originals[name].to(p.device)
            self._preserve[name] = PreservationTerm.build(sm.mom2, w0.T if self.arch.conv1d else w0)
            log.info("preservation statistics for %s: %d tokens", name, sm.count)

    def preservation_loss(self) -> torch.Tensor:
        """Σ over tuned tensors of ``tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ)``."""
        weights = {name: self._trainable[name] for name in self._preserve}
        if self.arch.conv1d:
            weights = {name: w.T for name, w in weights.items()}
        return preservation_loss(self._preserve, weights)

    @override
    def on_fit_start(self) -> None:
        self.optimizer_steps = 0
        if not self.hparams.get("lora_rank"):
            self.touch(list(self._trainable))  # again after a restore(): the guard and save_edit need W₀
        self.match_originals_dtype()
        self._w0 = {}
        self.check_write_positions()
        self.prepare_preservation()
        self.prepare_neighbours()
        self.start_block_input_cache()

    @override
    def on_fit_end(self) -> None:
        self.stop_block_input_cache()
        if self.hparams.get("lora_rank"):
            self.merge_lora()


class LocFTBF(FineTuneEditor):
    """LocFT-BF: breadth-first (epoch-based) mini-batch fine-tuning of a localized mask.

    Use with ``Trainer(max_epochs=25)`` and ``EditDataModule(batch_size=100)`` (the recipe's
    defaults); the Trainer's epochs are the method's epochs. A budget in steps instead
    (``Trainer(max_epochs=-1, max_steps=S)``) counts mini-batches, including those that took no
    step under ``min_loss``; :attr:`optimizer_steps` counts the steps actually taken.

    **Rounds** (the editing strategies, :mod:`lit_edit.strategy`). ``round_size=R`` cuts the
    requests, in data order, into chunks of ``R`` that arrive one after another; each chunk is
    one LocFT-BF *round*: its own epochs over that chunk only (mini-batch ``data.batch_size``,
    capped at the chunk; reshuffled each epoch, counting epochs from the round's start), its own
    ``min_loss`` early stop, a fresh Adam state, up to ``max_epochs`` epochs per round. All
    rounds run inside one ``Trainer.fit``: the editor sets the fit's epoch budget to
    ``rounds × max_epochs`` and ``reload_dataloaders_every_n_epochs=1``, and the data module
    serves the current round's chunk (:meth:`round_requests`). At the end of a round its edits
    are announced (:meth:`~lit_edit.editors.base.Editor.edits_applied`, where an immediate
    evaluation scores them), then kept (``accumulate=True``: sequential-batched, announced with
    :meth:`~lit_edit.editors.base.Editor.commit_edits`) or undone bit for bit
    (``accumulate=False``: single / batched). ``round_size=None`` (default) is one round of every
    request: the published method, unchanged. A checkpoint records the round, so a resumed fit
    continues the right one. Each round start and end is logged (round i/n, requests, epochs
    run, final loss) and kept in :attr:`round_history`.

    **Budget extension.** ``extend_epochs=X`` lets a fit (or each round) run past the Trainer's
    ``max_epochs`` E while it is still learning: after epoch E, and after every later epoch up
    to E + X, training goes on only if the epoch's mean edit loss is still above ``min_loss`` and
    fell by at least the fraction ``extend_min_drop`` below the lowest epoch loss before it;
    otherwise it stops there. A small data set whose loss is still falling at E gets the epochs it needs; one that
    has converged or plateaued stops as before. ``extend_epochs=0`` (default) is the published
    fixed budget. A budget in steps (``max_epochs=-1``) is not extended. With
    ``extend_patience=P`` the fit goes on while one of the last P epochs fell that far, so a
    single noisy epoch does not end a fit that is still learning (P = 1, the default: the first
    epoch that does not fall that far ends it).

    **Best epoch.** ``keep_best=True`` keeps, per round, a copy of the tuned tensors after the
    epoch with the lowest mean edit loss; when the round ends on a later epoch whose loss is
    higher (a loss spike, or the epochs of patience that found nothing better), those tensors are
    put back before the round's edits are announced, evaluated or kept. The copy is the size
    of the tuned tensors and travels in checkpoints.

    **Learning rate on a plateau.** ``plateau_lr_decay=f`` (below 1) multiplies the learning rate
    by ``f`` after every epoch whose mean edit loss did not fall ``extend_min_drop`` below the
    best epoch before it (the epochs that ``extend_patience`` counts). A fit whose loss has
    settled into an oscillation at the constant rate, typically one held back by a strong
    ``preservation`` term, takes smaller steps and settles lower instead of stopping there.
    It acts from a round's second epoch on, not only in the extension, and the rate never
    rises again within the round: choose an ``extend_min_drop`` that a fit still learning clears
    every epoch. Each round starts at ``lr`` again; a resumed fit goes on at the checkpoint's
    rate; ``1.0`` (default) keeps the rate constant, as published.

    Args:
        round_size: requests per round (``None`` = all requests in one round).
        accumulate: keep each round's edit (``True``) or restore the weights after it.
        extend_epochs: most epochs added to ``max_epochs`` (per round) while the loss still falls.
        extend_min_drop: the relative fall of the epoch mean loss, below the best epoch before
            it, that counts as still falling (0.05 = 5%).
        extend_patience: epochs in a row without such a fall after which an extended fit stops.
        keep_best: end each round with the tensors of its lowest-loss epoch.
        plateau_lr_decay: factor on the learning rate after each epoch without such a fall
            (1.0 = a constant rate).
        *args, **kwargs: as :class:`FineTuneEditor`.
    """

    trainer_defaults = {**Editor.trainer_defaults, "max_epochs": 25}
    edits_in_rounds = True

    def __init__(
        self,
        *args: Any,
        round_size: Optional[int] = None,
        accumulate: bool = True,
        extend_epochs: int = 0,
        extend_min_drop: float = 0.05,
        extend_patience: int = 1,
        keep_best: bool = False,
        plateau_lr_decay: float = 1.0,
        **kwargs: Any,
    ):
        check_int("round_size", round_size, minimum=1, allow_none=True)
        check_bool("accumulate", accumulate)
        check_int("extend_epochs", extend_epochs, minimum=0)
        check_real("extend_min_drop", extend_min_drop, minimum=0)
        check_int("extend_patience", extend_patience, minimum=1)
        check_bool("keep_best", keep_best)
        check_real("plateau_lr_decay (a factor on the learning rate; 1 = constant)", plateau_lr_decay, minimum=0, exclusive=True, maximum=1)
        if extend_min_drop >= 1:
            raise ValueError(f"extend_min_drop is a relative fall of the loss, below 1 (e.g. 0.05); got {extend_min_drop}")
        super().__init__(*args, **kwargs)
        if self.hparams.get("lora_rank") and not accumulate:
            raise ValueError("accumulate=False restores tensors after each round; it cannot be combined with lora_rank")
        if self.hparams.get("lora_rank") and round_size is not None:
            raise ValueError("round_size runs LocFT-BF in rounds, which a LoRA adapter (lora_rank) cannot do: one adapter per fit")
        self.automatic_optimization = False  # the min_loss rule decides whether a mini-batch steps
        self._epoch_loss = 0.0
        self._epoch_count = 0
        self._epoch_open = False
        self._step_saved: Optional[dict[str, torch.Tensor]] = None
        self._step_requests: list[EditRequest] = []
        # rounds: index of the current one, the epoch it began at, its epochs completed
        self._round = 0
        self._round_first_epoch = 0
        self._round_epochs = 0
        self._num_rounds = 1
        self._epochs_per_round: Optional[int] = None
        self._round_seen: dict[int, EditRequest] = {}
        self._resuming = False
        self._last_epoch_loss = float("nan")
        self._end_reason = "end of fit"
        self._base_epochs: Optional[int] = None  # the Trainer's max_epochs before any extension
        # the current round's lowest epoch loss, its epoch (1-based within the round), the epochs
        # since the loss last fell extend_min_drop below the best before it, and (keep_best) its tensors
        self._best_loss = float("inf")
        self._best_epoch = 0
        self._since_fall = 0
        self._best_state: Optional[dict[str, torch.Tensor]] = None
        #: One entry per round the last fit finished: ``round``, ``rounds``, ``requests``,
        #: ``epochs``, ``loss`` (the last epoch's mean), ``stopped`` (``min_loss`` / ``epochs`` / ``end of fit``), ``kept``.
        self.round_history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ rounds

    @property
    def num_rounds(self) -> int:
        """Rounds of the current fit (1 without ``round_size``)."""
        return self._num_rounds

    def round_requests(self, requests: list[EditRequest]) -> tuple[list[EditRequest], int]:
        """``(the current round's requests, the epoch the round began at)``, from all ``requests``
        of the fit in data order; the data module serves them (and counts its per-epoch shuffles
        from that epoch)."""
        size = self.hparams.get("round_size")
        if size is None or self._num_rounds <= 1:
            return list(requests), 0
        i = min(self._round, self._num_rounds - 1)
        return list(requests[i * size:(i + 1) * size]), self._round_first_epoch

    def _plan_rounds(self) -> None:
        from lit_edit.data.datamodule import EditDataModule

        trainer = self.trainer
        size = self.hparams.get("round_size")
        self._num_rounds, self._epochs_per_round = 1, None
        extend = int(self.hparams.get("extend_epochs") or 0)
        self._base_epochs = None
        if extend:  # the budget before extension, kept on the Trainer for a later fit with it
            self._base_epochs = getattr(trainer, "_lit_edit_base_epochs", None)
            if self._base_epochs is None and trainer.max_epochs is not None and trainer.max_epochs > 0:
                self._base_epochs = trainer._lit_edit_base_epochs = int(trainer.max_epochs)
        if size is None:
            if extend and self._base_epochs is not None:
                trainer.fit_loop.max_epochs = self._base_epochs + extend
                log.info("up to %d epochs, and up to %d more while the epoch loss falls by %.0f%% or more",
                         self._base_epochs, extend, 100 * self.hparams["extend_min_drop"])
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, EditDataModule):
            raise RuntimeError(
                f"LocFTBF with round_size={size} needs an EditDataModule (trainer.fit(editor, datamodule=...)), which serves "
                "each round's requests; a dataloader passed to fit() cannot"
            )
        n = len(datamodule.load())
        self._num_rounds = max(1, -(-n // size))
        if self._num_rounds == 1:
            log.info("round_size %d >= %d requests: one round, as without rounds", size, n)
            if extend and self._base_epochs is not None:
                trainer.fit_loop.max_epochs = self._base_epochs + extend
            return
        epochs = getattr(trainer, "_lit_edit_epochs_per_round", None)  # set when this Trainer fitted in rounds before
        if epochs is None:
            epochs = trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ValueError(
                    f"LocFT-BF in rounds (round_size={size}) needs an epoch budget per round: Trainer(max_epochs=E) "
                    f"(--trainer.max_epochs), got max_epochs={epochs}"
                )
            if trainer.max_steps not in (None, -1):
                raise ValueError(
                    f"LocFT-BF in rounds counts epochs per round (max_epochs); a step budget (max_steps={trainer.max_steps}) "
                    "cannot be split into rounds: leave max_steps unset"
                )
            if trainer.min_epochs or trainer.min_steps:
                raise ValueError(
                    f"LocFT-BF in rounds ends each round on its own (min_loss or max_epochs per round); "
                    f"min_epochs={trainer.min_epochs} / min_steps={trainer.min_steps} would train on after the last: leave them unset"
                )
            trainer._lit_edit_epochs_per_round = epochs
        self._epochs_per_round = int(epochs)
        trainer.fit_loop.max_epochs = (self._epochs_per_round + extend) * self._num_rounds
        trainer.reload_dataloaders_every_n_epochs = 1  # each epoch's dataloader holds the current round's requests
        log.info(
            "LocFT-BF in %d rounds of up to %d requests (in data order), up to %d epochs each; edits %s after each round",
            self._num_rounds, size, self._epochs_per_round, "kept" if self.hparams["accumulate"] else "restored",
        )

    def _round_list(self) -> list[EditRequest]:
        """The requests of the current round: the data module's chunk, else those trained on."""
        datamodule = getattr(self.trainer, "datamodule", None)
        requests = getattr(datamodule, "requests", None)
        if isinstance(requests, list):
            return self.round_requests(requests)[0]
        return list(self._round_seen.values())

    def _close_round(self, loss: float, stopped: str) -> None:
        """End the current round: announce its edits, keep or undo them, move on (or stop after the last)."""
        chunk = self._round_list()
        keep = bool(self.hparams["accumulate"])
        entry = {
            "round": self._round + 1, "rounds": self._num_rounds, "requests": len(chunk), "epochs": self._round_epochs,
            "loss": loss, "stopped": stopped, "kept": keep,
        }
        if self.hparams.get("keep_best"):
            entry["best_epoch"], entry["best_loss"] = self._best_epoch, self._best_loss
            if self._best_state is not None and self._best_epoch != self._round_epochs and self._best_loss < loss:
                with torch.no_grad():
                    for name, value in self._best_state.items():
                        self._trainable[name].copy_(value.to(self._trainable[name].device))
                log.info("LocFT-BF round %d/%d: back to epoch %d's tensors (loss %.4f; the last epoch's %.4f)",
                         self._round + 1, self._num_rounds, self._best_epoch, self._best_loss, loss)
        self._reset_best()
        self.round_history.append(entry)
        log.info(
            "LocFT-BF round %d/%d done: %d requests, %d epoch(s), final loss %.4f (stopped: %s); edits %s",
            entry["round"], entry["rounds"], entry["requests"], entry["epochs"], loss, stopped, "kept" if keep else "restored",
        )
        self.edits_applied(chunk)  # an immediate evaluation scores the round here, before any restore
        if keep:
            self.commit_edits(chunk)
        else:
            self.restore(forget=False)
        self._round += 1
        self._round_epochs = 0
        self._round_first_epoch = self.current_epoch + 1
        self._round_seen = {}
        if self._round >= self._num_rounds:
            self.trainer.should_stop = True
            return
        optimizer = self.optimizers().optimizer
        optimizer.state.clear()  # the next round starts from a fresh Adam state, at the base learning rate
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate
        if self.block_inputs is not None:  # the next round's requests are others: start an empty cache
            self.stop_block_input_cache()
            self.start_block_input_cache()

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self._plan_rounds()

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self._resuming:
            self._round, self._round_first_epoch, self._round_epochs = 0, self.current_epoch, 0
            self._epoch_loss, self._epoch_count, self._epoch_open = 0.0, 0, False
            self._last_epoch_loss = float("nan")
            self.round_history = []
            self._reset_best()
        self._end_reason = "end of fit"
        self._round_seen = {}
        self._resuming = False

    @override
    def on_train_start(self) -> None:
        if self._num_rounds > 1 and self._round >= self._num_rounds:  # resumed after the last round
            log.info("every round of the checkpoint is done: nothing left to fit")
            self.trainer.should_stop = True

    @override
    def on_train_end(self) -> None:
        # The fit ended (max_epochs / max_steps / max_time) with a round still open: the last one
        # of a fit without rounds, or one cut short.
        if self._round < self._num_rounds and (self._round_epochs > 0 or self._epoch_count > 0):
            mean = self._epoch_loss / max(self._epoch_count, 1) if self._epoch_count else self._last_epoch_loss
            self._close_round(mean, "end of fit" if self._num_rounds > 1 else self._end_reason)

    # ------------------------------------------------------------------ epochs

    @override
    def on_train_epoch_start(self) -> None:
        self._epoch_loss, self._epoch_count, self._epoch_open = 0.0, 0, True
        if self._num_rounds > 1 and self.current_epoch == self._round_first_epoch:
            chunk = self._round_list()
            ids = [r.case_id for r in chunk[:5]]
            log.info(
                "LocFT-BF round %d/%d: %d requests (case ids %s%s), up to %d epochs",
                self._round + 1, self._num_rounds, len(chunk), ids, ", ..." if len(chunk) > 5 else "", self._epochs_per_round,
            )

    @override
    def training_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self._epoch_open = True
        for r in batch:
            self._round_seen.setdefault(id(r), r)
        edit, loss = self.training_loss(batch)
        # The skip and early-stop rules read the mean loss of the whole mini-batch, over every
        # process of a DDP run, so the processes step (or skip) together.
        total = all_reduce_sum(torch.tensor([float(edit.detach()) * len(batch), len(batch)], dtype=torch.float64, device=self.device))
        value = float(total[0] / total[1])
        self._epoch_loss += float(total[0])
        self._epoch_count += int(total[1])
        self.log("train/loss", value, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch))
        if value < self.hparams["min_loss"]:  # converged mini-batch: no optimizer step
            if rank_and_world_size()[1] > 1:
                self.manual_backward(loss * 0.0)  # DDP expects a backward after each forward
                opt.zero_grad(set_to_none=True)
            opt.step()  # no gradient: nothing moves, but the step counts as a mini-batch
            return None
        self.manual_backward(loss)
        self._step_saved, self._step_requests = self.snapshot_trainable(), list(batch)
        opt.step()
        self.optimizer_steps += 1
        return None

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.project()
        saved, self._step_saved = self._step_saved, None
        if saved is not None:
            ratio = self.check_step(self._step_requests, saved)
            self.log("train/update_ratio", ratio, on_step=True, on_epoch=False, batch_size=len(self._step_requests))

    @override
    def on_train_epoch_end(self) -> None:
        mean = self._epoch_loss / max(self._epoch_count, 1)
        self.log("train/epoch_loss", mean, prog_bar=True, on_epoch=True, sync_dist=True)  # equal on every process already
        self._epoch_open = False
        self._round_epochs += 1
        self._last_epoch_loss = mean
        self._track_best(mean)
        decayed = self._decay_on_plateau()
        converged = mean < self.hparams["min_loss"]
        if self._num_rounds <= 1:
            log.info("epoch %d: mean loss %.4f over %d requests", self.current_epoch, mean, self._epoch_count)
            self._log_decay(decayed)
            if converged:
                log.info("epoch %d mean loss %.4g < %.2g: stopping early", self.current_epoch, mean, self.hparams["min_loss"])
                self.trainer.should_stop = True
                self._end_reason = "min_loss"
            budget = self._base_epochs if self._base_epochs is not None else self.trainer.max_epochs
            out_of_budget = budget is not None and budget > 0 and self.current_epoch + 1 >= budget
            if out_of_budget and not converged and self._extends(self.current_epoch + 1, budget, mean):
                out_of_budget = False
            elif out_of_budget and not converged and self.current_epoch + 1 > budget:
                self._end_reason = "loss no longer falling"
            if converged or out_of_budget:
                # the only round ends here, before the callbacks' end-of-training hooks, so they
                # see its edits committed; a fit cut short otherwise ends it in on_train_end
                self._close_round(mean, self._end_reason)
            return
        log.info("round %d/%d, epoch %d: mean loss %.4f over %d requests", self._round + 1, self._num_rounds,
                 self._round_epochs, mean, self._epoch_count)
        self._log_decay(decayed)
        self.log("train/round", float(self._round + 1), on_epoch=True, sync_dist=False)
        if converged:
            log.info("round %d mean loss %.4g < %.2g: the round stops early", self._round + 1, mean, self.hparams["min_loss"])
            self._close_round(mean, "min_loss")
        elif self._epochs_per_round is not None and self._round_epochs >= self._epochs_per_round:
            if not self._extends(self._round_epochs, self._epochs_per_round, mean):
                extended = self._round_epochs > self._epochs_per_round
                self._close_round(mean, "loss no longer falling" if extended else "epochs")

    def _reset_best(self) -> None:
        self._best_loss, self._best_epoch, self._since_fall, self._best_state = float("inf"), 0, 0, None

    def _track_best(self, mean: float) -> None:
        """After an epoch of the current round: count the epochs since the loss last fell
        ``extend_min_drop`` below the best before it, and (``keep_best``) copy a new best's tensors."""
        drop = float(self.hparams["extend_min_drop"])
        if self._round_epochs > 1 and not mean <= self._best_loss * (1 - drop):  # NaN counts as no fall
            self._since_fall += 1
        else:
            self._since_fall = 0
        if mean < self._best_loss:
            self._best_loss, self._best_epoch = mean, self._round_epochs
            if self.hparams.get("keep_best"):
                if self._best_state is None:
                    self._best_state = self.snapshot_trainable()
                else:  # the copy's buffers are reused from one best epoch to the next
                    with torch.no_grad():
                        for name, value in self._best_state.items():
                            value.copy_(self._trainable[name])

    def _decay_on_plateau(self) -> float | None:
        """``plateau_lr_decay`` < 1: after an epoch that did not fall ``extend_min_drop`` below the
        best before it, multiply the learning rate by that factor and return the new rate (the loss
        is the same on every process, so every process decays alike); else None."""
        factor = float(self.hparams.get("plateau_lr_decay", 1.0))
        if factor >= 1 or self._since_fall == 0:
            return None
        optimizer = self.optimizers().optimizer
        for group in optimizer.param_groups:
            group["lr"] *= factor
        return float(optimizer.param_groups[0]["lr"])

    def _log_decay(self, lr: float | None) -> None:
        if lr is not None:
            log.info("no %.1f%% fall in the epoch loss for %d epoch(s) (best %.4f at epoch %d): learning rate now %.3g",
                     100 * float(self.hparams["extend_min_drop"]), self._since_fall, self._best_loss, self._best_epoch, lr)

    def _extends(self, done: int, budget: int, mean: float) -> bool:
        """Whether a fit (or round) that has run ``done`` >= ``budget`` epochs goes on: epochs of
        ``extend_epochs`` left, and one of the last ``extend_patience`` epochs fell by
        ``extend_min_drop`` or more (relative) below the best loss before it."""
        extend = int(self.hparams.get("extend_epochs") or 0)
        if done >= budget + extend or done < 2:
            return False
        patience = int(self.hparams.get("extend_patience") or 1)
        if self._since_fall < patience:
            log.info("epoch budget %d reached, loss %.4f (best %.4f at epoch %d, %d epoch(s) since a %.1f%% fall): "
                     "one more epoch (%d of %d extra)", budget, mean, self._best_loss, self._best_epoch, self._since_fall,
                     100 * float(self.hparams["extend_min_drop"]), done - budget + 1, extend)
            return True
        return False

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_edit_rounds"] = {
            "round": self._round, "first_epoch": self._round_first_epoch, "round_epochs": self._round_epochs,
            "num_rounds": self._num_rounds, "round_size": self.hparams.get("round_size"),
            "accumulate": bool(self.hparams["accumulate"]), "epochs_per_round": self._epochs_per_round,
            "history": [dict(h) for h in self.round_history], "epoch_open": self._epoch_open,
            "epoch_loss": self._epoch_loss, "epoch_count": self._epoch_count, "last_epoch_loss": self._last_epoch_loss,
            "best_loss": self._best_loss, "best_epoch": self._best_epoch, "since_fall": self._since_fall,
            "best_state": None if self._best_state is None else {k: v.detach().cpu().clone() for k, v in self._best_state.items()},
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lit_edit_rounds")
        if state is None:  # a checkpoint from before rounds: one round
            return
        if self._trainer is not None:  # resuming a fit: the same rounds, or a clear error
            size, keep = self.hparams.get("round_size"), bool(self.hparams["accumulate"])
            mismatch = [
                f"{name} {ours!r} (the checkpoint's: {theirs!r})"
                for name, ours, theirs in (
                    ("round_size", size, state["round_size"]), ("accumulate", keep, state["accumulate"]),
                    ("rounds", self._num_rounds, state["num_rounds"]),
                    ("epochs per round (max_epochs)", self._epochs_per_round, state["epochs_per_round"]),
                )
                if ours != theirs and (name != "epochs per round (max_epochs)" or self._num_rounds > 1)
            ]
            if mismatch:
                raise ValueError(
                    "this fit cannot resume the checkpoint's LocFT-BF rounds: " + "; ".join(mismatch)
                    + ". Resume with the same strategy (round_size, accumulate), data and max_epochs"
                )
        self._round, self._round_first_epoch = int(state["round"]), int(state["first_epoch"])
        self._round_epochs = int(state["round_epochs"])
        self.round_history = [dict(h) for h in state.get("history", [])]
        self._last_epoch_loss = float(state.get("last_epoch_loss", float("nan")))
        self._best_loss = float(state.get("best_loss", float("inf")))
        self._best_epoch, self._since_fall = int(state.get("best_epoch", 0)), int(state.get("since_fall", 0))
        self._best_state = state.get("best_state")
        if state.get("epoch_open"):  # saved mid-epoch: the epoch goes on with its loss so far
            self._epoch_loss, self._epoch_count = float(state["epoch_loss"]), int(state["epoch_count"])
        else:
            self._epoch_loss, self._epoch_count = 0.0, 0
        self._epoch_open = bool(state.get("epoch_open"))
        self._resuming = True


class DepthFirstFT(FineTuneEditor):
    """Depth-first fine-tuning: each edit batch is optimised alone to convergence before the next.

    With ``EditDataModule(batch_size=1, shuffle=False)`` this is the classic sample-wise
    pipeline (FT-M of the editing literature): up to ``steps`` Adam steps per request (fresh
    optimizer state for each), stopping once its loss is below ``min_loss``; edits accumulate.
    ``accumulate=False`` restores the weights after each batch instead (single / batched
    editing, for use with ``EditEvaluation(timing="immediate")``).

    Requests already edited are recorded in checkpoints (by case id), so an interrupted run
    resumed with ``trainer.fit(..., ckpt_path=...)`` neither repeats nor loses an edit.
    """

    trainer_defaults = {**Editor.trainer_defaults, "max_epochs": 1}
    hub_key = "depth_first_ft"
    supports_ddp = False

    def __init__(self, *args: Any, steps: int = 25, accumulate: bool = True, **kwargs: Any):
        check_int("steps", steps, minimum=1)
        check_bool("accumulate", accumulate)
        super().__init__(*args, **kwargs)
        if not accumulate and self.hparams.get("lora_rank"):
            raise ValueError("accumulate=False restores tensors after each batch; it cannot be combined with lora_rank")
        self.automatic_optimization = False
        self._done: set = set()

    @staticmethod
    def _key(r: EditRequest) -> Any:
        return r.case_id if r.case_id is not None else (r.prompt, r.target_new)

    @override
    def training_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        todo = [r for r in batch if self._key(r) not in self._done]
        if not todo:
            return None
        opt = self.optimizers()
        opt.optimizer.state.clear()  # every batch starts from a fresh Adam state
        steps_taken, loss_value, ratio = 0, float("nan"), 0.0
        for _ in range(self.hparams["steps"]):
            edit, loss = self.training_loss(todo)
            loss_value = float(edit.detach())
            if loss_value < self.hparams["min_loss"]:
                break
            opt.zero_grad()
            self.manual_backward(loss)
            saved = self.snapshot_trainable()
            opt.step()
            self.project()
            ratio = max(ratio, self.check_step(todo, saved))
            steps_taken += 1
        self.optimizer_steps += steps_taken
        self._done.update(self._key(r) for r in todo)
        self.log_dict(
            {"train/loss": loss_value, "train/steps": float(steps_taken), "edits_done": float(len(self._done)),
             "train/update_ratio": ratio},
            prog_bar=True, on_step=True, on_epoch=False, batch_size=len(todo),
        )
        if self.hparams["accumulate"]:
            # the batch is part of the model for good: announced here, before a ModelCheckpoint
            # saves at the end of this batch (callbacks' batch-end hooks run before the module's),
            # so the checkpoint already holds what the callbacks did with it
            self.commit_edits(todo)
        return None

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.hparams["accumulate"]:
            self.restore(forget=False)

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


def write_spans(tokenizer: Any, request: EditRequest, where: str) -> list[tuple[int, Optional[int]]]:
    """Token ranges ``[start, end)`` of ``request``'s row (its encoded prompt,
    :func:`~lit_edit.data.tokenize.encode_prompt`, chat template included, then its target) where
    ``write_positions=where`` lets the edit be written: the subject's tokens (``"subject"``), those
    and every position from the prompt's end on (``"subject_answer"``, ``end`` ``None``), or the
    subject's last token (``"fact_token"``). A clear :class:`~lit_edit.data.request.RecordError`
    when the subject is missing or not in the prompt (:func:`~lit_edit.closed_form.tokens.subject_tokens`)."""
    if where not in WRITE_POSITIONS or where == "all":
        raise ValueError(f"where must be one of {list(WRITE_POSITIONS[1:])}, got {where!r}")
    first, end = subject_tokens(tokenizer, request)
    if where == "fact_token":
        return [(end - 1, end)]
    if where == "subject":
        return [(first, end)]
    return [(first, end), (len(encode_prompt(tokenizer, request.prompt)), None)]


def _refuse_tied(model: nn.Module, selected: dict[str, nn.Parameter]) -> None:
    """Refuse tuning a tensor shared under several names (e.g. an LM head tied to the input
    embeddings): the edit would silently change the other module too."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name, param in selected.items():
        others = [n for n in names.get(id(param), []) if n != name]
        if others:
            raise ValueError(
                f"target_modules selects {name!r}, which is the same tensor as {', '.join(map(repr, others))} "
                "(tied weights): tuning it would change both; choose another module"
            )
