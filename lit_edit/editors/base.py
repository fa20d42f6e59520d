"""``Editor``: the LightningModule every lit_edit editor derives from.

It wraps a Hugging Face causal LM and its tokenizer, and owns the undo/save machinery: before
any tensor is changed, :meth:`Editor.touch` records its original value, so

* :meth:`restore` puts every touched tensor back bit for bit;
* :meth:`save_edit` writes only the touched tensors (safetensors) plus a JSON description;
* :meth:`apply_edit` puts a saved edit on this editor's (base) model, refusing a mismatch;
* :meth:`export` writes a plain ``save_pretrained`` model with the edit merged.

Lightning checkpoints of an editor hold only the touched and trainable tensors, never the
whole model, so a long run can be resumed cheaply.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lit_edit import edits
from lit_edit.data.chat import check_chat_mode, use_chat_template
from lit_edit.data.request import EditRequest
from lit_edit.masks import ParameterMask, resolve_mask
from lit_edit.models import arch_for, load_causal_lm, model_name

log = logging.getLogger(__name__)

__all__ = ["Editor", "check_strategy"]


class Editor(L.LightningModule):
    """Base class: a causal LM plus the record of every tensor an edit touched.

    Args:
        model: embedded name (``smollm2-135m``), hub id, local path, or a loaded ``PreTrainedModel``.
        tokenizer: tokenizer (object, name or path); defaults to the model's own.
        dtype: weights dtype (``float32`` default; ``bfloat16``/``float16``/``auto``).
        target_modules: peft-style module selection (list = suffix match, string = full regex);
            ``None`` = the editor's default location for this architecture.
        layers_to_transform: block indices to restrict ``target_modules`` to.
        layers_pattern: name of the block list (peft ``layers_pattern``), if ambiguous.
        exclude_modules: peft-style exclusions.
        chat_template: how prompts reach the model, in the edit and in its evaluation
            (:mod:`lit_edit.data.chat`): ``never`` (raw text, answers after a space; default),
            ``auto`` (the tokenizer's chat template when it has one: the prompt as the user turn,
            the answer as the assistant's reply) or ``always`` (as ``auto``; a tokenizer
            without a template is an error). Kept on :attr:`tokenizer`, so the evaluation of
            this editor (``EditEvaluation``, or ``evaluate(editor.model, editor.tokenizer, ...)``)
            uses the same format.
    """

    #: Trainer arguments this editor relies on (the CLI applies them as defaults).
    trainer_defaults: ClassVar[dict[str, Any]] = {
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
    }
    #: Whether requests must carry a subject contained in the prompt.
    requires_subject: ClassVar[bool] = False
    #: Whether the editor runs correctly on several processes under Lightning's DDP strategy.
    supports_ddp: ClassVar[bool] = True
    #: Whether every process must see the same edit batches (Lightning's distributed sampler off).
    replicated_batches: ClassVar[bool] = False
    #: Whether the editor edits in rounds of several epochs (LocFT-BF) rather than one edit per
    #: dataloader batch: its batch size under an editing strategy is ``round_size`` (not
    #: ``data.batch_size``), and it announces each round's edits with :meth:`edits_applied`.
    edits_in_rounds: ClassVar[bool] = False

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        target_modules: Union[list[str], str, None] = None,
        layers_to_transform: Union[list[int], int, None] = None,
        layers_pattern: Optional[str] = None,
        exclude_modules: Union[list[str], str, None] = None,
        chat_template: Literal["auto", "never", "always"] = "never",
    ):
        super().__init__()
        check_chat_mode(chat_template)  # before the model is loaded
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.model, self.tokenizer = load_causal_lm(model, tokenizer, dtype)
        #: How prompts are tokenized for this editor and its evaluation (:mod:`lit_edit.data.chat`).
        self.prompt_format = use_chat_template(self.tokenizer, chat_template)
        if self.prompt_format.chat:
            log.info("prompts go through the tokenizer's chat template (chat_template=%s)", chat_template)
        elif chat_template == "auto":
            log.info("chat_template=auto: the tokenizer has no chat template, prompts are raw text")
        self.hparams["model"] = model if isinstance(model, str) else self.base_model_name
        self.arch = arch_for(self.model)
        self._originals: dict[str, torch.Tensor] = {}
        self.strict_loading = False  # checkpoints hold only the edited tensors
        #: The declared editing strategy (:class:`lit_edit.strategy.EditingStrategy`), set by
        #: :func:`lit_edit.strategy.apply_strategy` or the CLI's ``--editing.strategy``; ``None``:
        #: the strategy follows from ``accumulate`` and the batch size alone.
        self.editing_strategy: Any = None
        #: What the last fit was (editor, model, strategy, evaluation timing, data;
        #: :func:`lit_edit.strategy.run_record`), set when it starts; also in ``hparams_initial``
        #: (the loggers' hyperparameters) and in a saved edit's ``edit.json``.
        self.run_record: dict[str, Any] = {}

    # ------------------------------------------------------------------ identity

    @property
    def base_model_name(self) -> str:
        return model_name(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.model.get_submodule(self.arch.layers))

    def default_location(self) -> dict[str, Any]:
        """The editor's default ``target_modules``/``layers_to_transform`` for this model."""
        raise NotImplementedError(f"{type(self).__name__} has no default location; pass target_modules")

    def parameter_mask(self) -> ParameterMask:
        hp = self.hparams
        if hp.get("target_modules") is None:
            loc = self.default_location()
            return ParameterMask(**loc)
        return ParameterMask(
            target_modules=hp["target_modules"],
            layers_to_transform=hp.get("layers_to_transform"),
            layers_pattern=hp.get("layers_pattern"),
            exclude_modules=hp.get("exclude_modules"),
        )

    def masked_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters selected by this editor's mask, named relative to the HF model."""
        return resolve_mask(self.model, self.parameter_mask())

    # ------------------------------------------------------------------ undo record

    @torch.no_grad()
    def touch(self, names) -> None:
        """Record the original value of each named tensor (once) before it is changed."""
        params = dict(self.model.named_parameters())
        for name in [names] if isinstance(names, str) else names:
            if name not in self._originals:
                if name not in params:
                    raise KeyError(f"{name!r} is not a parameter of {type(self.model).__name__}")
                self._originals[name] = params[name].detach().cpu().clone()

    def commit_edits(self, requests: list) -> None:
        """Announce that the edits of ``requests`` are now part of the model for good (a batch of
        sequential editing, a round of LocFT-BF): every trainer callback with an
        ``on_edits_committed(trainer, editor, requests)`` method is called, in order. Editors
        call this once per committed batch or round; nothing is called when edits are undone
        after each batch (single / batched editing)."""
        self._announce("on_edits_committed", requests)

    def edits_applied(self, requests: list) -> None:
        """Announce that the edits of ``requests`` are in the model now, before they are kept or
        undone (the end of a LocFT-BF round): every trainer callback with an
        ``on_edits_applied(trainer, editor, requests)`` method is called, in order (the
        evaluation callback scores them there under ``immediate`` timing). Editors that edit in
        rounds (:attr:`edits_in_rounds`) call this once per round; the others edit once per
        dataloader batch, and callbacks see their edits in ``on_train_batch_end``."""
        self._announce("on_edits_applied", requests)

    def _announce(self, hook_name: str, requests: list) -> None:
        """Call ``hook_name(trainer, editor, requests)`` on every trainer callback that has it."""
        trainer = self._trainer
        if trainer is None:
            return
        for callback in trainer.callbacks:
            hook = getattr(callback, hook_name, None)
            if callable(hook):
                hook(trainer, self, list(requests))

    @property
    def touched(self) -> list[str]:
        return list(self._originals)

    def edited_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self._originals}

    @torch.no_grad()
    def restore(self, forget: bool = True) -> None:
        """Put every touched tensor back to its original value (bit-exact).

        ``forget=False`` keeps the record (the tensors stay tracked for further edits).
        """
        params = dict(self.model.named_parameters())
        for name, value in self._originals.items():
            params[name].copy_(value.to(params[name].device))
        if forget:
            self._originals.clear()

    # ------------------------------------------------------------------ persistence

    def init_args(self) -> dict[str, Any]:
        """The editor's arguments as recorded in ``edit.json`` (JSON values; a tensor argument is
        recorded by its dtype and shape only, a typed option group as a plain mapping)."""
        import dataclasses

        def jsonable(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return {"tensor": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return jsonable(dataclasses.asdict(v))
            if isinstance(v, dict):
                return {str(k): jsonable(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [jsonable(x) for x in v]
            if v is None or isinstance(v, (bool, int, float, str)):
                return v
            return str(v)

        return {k: jsonable(v) for k, v in dict(self.hparams).items() if not isinstance(v, torch.Tensor)}

    def save_edit(self, directory: Union[str, Path], extra: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
        """Write the touched tensors and their description to ``directory``, crash-safely.

        ``directory`` must be new, empty, or (``overwrite=True``) hold a lit_edit edit; only
        ``edit.json`` and ``edit.safetensors`` are replaced there, other files are kept. A killed
        save leaves the previous edit or the new one, never neither (:mod:`lit_edit.edits`).
        Non-finite values in a touched tensor are refused, naming the tensor; an edit that changed
        no tensor (e.g. a fit of zero epochs) is saved with a warning saying so.
        """
        edited = self.edited_tensors()
        if edited and all(torch.equal(edited[n].detach().cpu(), v.to(edited[n].dtype)) for n, v in self._originals.items()):
            log.warning(
                "saving an edit to %s that changes nothing: every touched tensor still equals the base model's "
                "(did the fit take any step? check max_epochs / max_steps and min_loss)", directory,
            )
        run = {k: self.run_record[k] for k in ("strategy", "data") if k in self.run_record}  # the fit that made it
        path = edits.write_edit(
            directory,
            self.edited_tensors(),
            self._originals,
            base_model=self.base_model_name,
            editor=f"{type(self).__module__}.{type(self).__qualname__}",
            init_args=self.init_args(),
            extra={**run, **(extra or {})},
            overwrite=overwrite,
        )
        log.info("saved edit of %d tensor(s) to %s", len(self._originals), path)
        return path

    def apply_edit(self, directory: Union[str, Path]) -> None:
        """Apply a saved edit to this editor's model; :meth:`restore` undoes it.

        Every stored tensor is checked first (name, exact shape, dtype, finite values, original
        hash); a mismatch raises and leaves the model unchanged.
        """
        originals = edits.apply_edit(self.model, directory)
        for name, value in originals.items():
            self._originals.setdefault(name, value)

    def export(self, directory: Union[str, Path], overwrite: bool = False) -> Path:
        """Write a plain Hugging Face checkpoint of the edited model (``save_pretrained`` + tokenizer).

        ``directory`` must be new, empty, or (``overwrite=True``) a previous lit_edit export, of
        which only the files it wrote are replaced. Refused when a touched tensor holds
        non-finite values.
        """
        return edits.export_model(self.model, self.tokenizer, directory, overwrite=overwrite, tensors=self.touched)

    # ------------------------------------------------------------------ Lightning plumbing

    @override
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        check_strategy(
            type(self).__name__,
            trainer.strategy,
            trainer.world_size,
            supports_ddp=self.supports_ddp,
            distributed_sampler=getattr(trainer._accelerator_connector, "use_distributed_sampler", False),
            replicated_batches=self.replicated_batches,
        )
        if stage == "fit":
            from lit_edit.strategy import check_run, run_record

            check_run(self, trainer)  # a declared strategy's settings are still in place
            self.run_record = run_record(self, trainer)
            initial = getattr(self, "_hparams_initial", None)
            if initial is not None:  # logged with the hyperparameters (beside the data module's); not an init argument
                initial["strategy"] = dict(self.run_record["strategy"])

    @override
    def configure_model(self) -> None:
        # Lightning's true-precision plugins (bf16-true, 16-true, 64-true) convert every floating
        # tensor of a batch and fail on a list of frozen EditRequest; edit batches hold no tensors
        # (the editors tokenize them), so they pass through unchanged.
        if self._trainer is not None:  # also called without a Trainer, by load_from_checkpoint
            _pass_edit_batches(self.trainer.precision_plugin)

    @torch.no_grad()
    def match_originals_dtype(self) -> None:
        """Cast the recorded originals to their tensors' current dtype, when a precision plugin
        (``--trainer.precision bf16-true | 16-true | 64-true``) converted the model after they were
        recorded: :meth:`restore` and :meth:`save_edit` then refer to the model as it is edited
        (a saved edit applies to the base loaded in that dtype)."""
        params = dict(self.model.named_parameters())
        changed = [n for n, v in self._originals.items() if n in params and v.dtype != params[n].dtype]
        for name in changed:
            self._originals[name] = self._originals[name].to(params[name].dtype)
        if changed:
            log.info("the model is now %s: %d recorded original(s) cast to it", params[changed[0]].dtype, len(changed))

    @override
    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Edit batches are lists of EditRequest; editors tokenize and place tensors themselves.
        if isinstance(batch, list) and all(isinstance(r, EditRequest) for r in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _kept_state_keys(self) -> set[str]:
        keep = {f"model.{n}" for n in self._originals}
        keep |= {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return keep

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._kept_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lit_edit_originals"] = {k: v.clone() for k, v in self._originals.items()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, value in checkpoint.get("lit_edit_originals", {}).items():
            self._originals.setdefault(name, value)


def _is_edit_batch(batch: Any) -> bool:
    return isinstance(batch, list) and all(isinstance(r, EditRequest) for r in batch)


def _pass_edit_batches(plugin: Any) -> None:
    """Make ``plugin.convert_input`` leave edit batches (lists of :class:`EditRequest`) alone."""
    if getattr(plugin, "_lit_edit_passes_edit_batches", False):
        return
    convert = plugin.convert_input

    def convert_input(data: Any) -> Any:
        return data if _is_edit_batch(data) else convert(data)

    plugin.convert_input = convert_input
    plugin._lit_edit_passes_edit_batches = True


def check_strategy(
    editor: str,
    strategy: Any,
    world_size: int,
    supports_ddp: bool = True,
    distributed_sampler: bool = False,
    replicated_batches: bool = False,
) -> None:
    """Refuse, before any work, a Lightning strategy the editor cannot run correctly under.

    Supported: one process (any accelerator and precision) and DDP (``ddp``, ``ddp_spawn``,
    ``ddp_fork``, ...) with several processes for the editors that support it. Editors whose
    every process must see the same edit batches (the closed-form ones) need Lightning's
    distributed sampler off (``Trainer(use_distributed_sampler=False)``; the recipes set it).
    """
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise RuntimeError(
            f"{editor} does not support {type(strategy).__name__} (FSDP / model parallel): the editors read and write whole "
            "weight matrices and keep bit-exact copies of the tensors they touch. Use DDP (each process holds the whole "
            "model; one 80 GB GPU holds an 8B model in bfloat16, see docs/distributed.md) or a single device."
        )
    if world_size <= 1 or isinstance(strategy, SingleDeviceStrategy):
        return
    if not isinstance(strategy, DDPStrategy) or type(strategy).__name__ == "DeepSpeedStrategy":
        raise RuntimeError(
            f"{editor} is not supported under {type(strategy).__name__}; supported: a single device, or DDP "
            "(--trainer.strategy ddp) with several processes"
        )
    if not supports_ddp:
        raise RuntimeError(
            f"{editor} runs on one process only: each request is optimised to convergence before the next, "
            "so the processes of a DDP run cannot share the work; run it with --trainer.devices 1 (or use LocFTBF under DDP)"
        )
    if replicated_batches and distributed_sampler:
        raise RuntimeError(
            f"{editor} under DDP needs every process to see the same edit batches: pass "
            "Trainer(use_distributed_sampler=False) (--trainer.use_distributed_sampler false); the recipes set it"
        )
