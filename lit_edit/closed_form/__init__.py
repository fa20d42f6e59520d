"""Shared locate-and-edit machinery (ROME, MEMIT, EMMET, AlphaEdit): fact tokens, context templates,
keys, the v*/z optimisation and the closed-form solves — written once, used by every editor."""

from lit_edit.closed_form.keys import block_outputs_at, keys_at, mlp_out_module, projection_weight, template_average
from lit_edit.closed_form.solve import alphaedit_solve, apply_update, emmet_solve, memit_solve, nullspace_projection, rome_solve
from lit_edit.closed_form.tokens import (
    MEMIT_TEMPLATES,
    ROME_TEMPLATES,
    ContextTemplates,
    TemplateSpec,
    encode_in_template,
    fact_token_index,
    stop_token_ids,
    subject_span,
)
from lit_edit.closed_form.values import ValueResult, ValueSettings, optimize_values

__all__ = [
    "ContextTemplates",
    "MEMIT_TEMPLATES",
    "ROME_TEMPLATES",
    "TemplateSpec",
    "ValueResult",
    "ValueSettings",
    "alphaedit_solve",
    "apply_update",
    "block_outputs_at",
    "emmet_solve",
    "encode_in_template",
    "stop_token_ids",
    "fact_token_index",
    "keys_at",
    "memit_solve",
    "mlp_out_module",
    "nullspace_projection",
    "optimize_values",
    "projection_weight",
    "rome_solve",
    "subject_span",
    "template_average",
]
