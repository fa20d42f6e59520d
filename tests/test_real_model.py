"""End to end on the real embedded model (SmolLM2-135M-Instruct, dequantized from its GGUF)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_edit.data import EditDataModule
from lit_edit.data.demo import demo_requests
from lit_edit.editors import LocFTBF
from lit_edit.evaluation import EditEvaluation

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2(embedded_dir):
    from lit_edit.models import load_causal_lm

    return load_causal_lm(str(embedded_dir))


def test_locft_bf_edits_the_real_model_and_restores_it(smollm2, tmp_path):
    model, tokenizer = smollm2
    requests = demo_requests(limit=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = LocFTBF(model=model, tokenizer=tokenizer, lr=1e-2)  # the default location for SmolLM2-135M
    assert editor.masked_parameters().keys() == {"model.layers.4.mlp.gate_proj.weight"}
    evaluation = EditEvaluation(protocols=["probability"], print_table=False, summary_dir=str(tmp_path))
    trainer = L.Trainer(
        max_epochs=25, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluation],
    )
    trainer.fit(editor, datamodule=EditDataModule(requests=requests, batch_size=100))

    assert evaluation.before["prob/ES"] < 50 and evaluation.after["prob/ES"] == 100.0
    assert evaluation.after["prob/EM"] > evaluation.before["prob/EM"] + 50  # P(new) - P(true), x100
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(editor.touched) and len(changed) == 1
    assert trainer.current_epoch < 25  # stopped early once the epoch loss fell below 1e-2
    editor.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
