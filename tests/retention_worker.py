"""One sequential ROME run on a tiny model with a retention curve and a checkpoint after every
batch, launched as a script so that a test can kill it from outside. Used by
``tests/test_retention.py``.

    python tests/retention_worker.py SPEC.json

``SPEC.json``: ``{"tokenizer": DIR, "requests": [request dicts], "csv": FILE, "ckpt_dir": DIR,
"ckpt_path": null | "last" | FILE, "hold": bool, "every": 2, "out": FILE}``. With ``hold`` the
run stops moving (sleeps) at the end of the batch that wrote the curve's second row, before that
batch's checkpoint is saved, so a kill lands between a row and its checkpoint. At the end the
edited tensors are written to ``out`` (safetensors).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(spec_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lightning as L
    import torch
    from helpers import make_tiny_llama
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from lit_edit.data import EditDataModule, EditRequest
    from lit_edit.editors import ROME
    from lit_edit.evaluation import RetentionCurve

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    requests = [EditRequest.from_dict(d) for d in spec["requests"]]
    L.seed_everything(0, verbose=False)
    editor = ROME(
        model=make_tiny_llama(len(tokenizer)), tokenizer=tokenizer, layers=[1],
        values={"steps": 3}, statistics={"adjustment": False}, templates={"max_per_group": 2},
    )
    curve = RetentionCurve(
        every=spec["every"], first_chunk=True, protocols=["probability", "token_accuracy", "perplexity"],
        ppl_corpus=spec["ppl_texts"], path=spec["csv"], plot=False,
    )

    class Hold(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if spec.get("hold") and len(curve.rows) >= 2:
                print("HOLDING", flush=True)
                time.sleep(120)

    checkpoint = ModelCheckpoint(dirpath=spec["ckpt_dir"], every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        **{
            **ROME.trainer_defaults,
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": True,
            "callbacks": [curve, Hold(), checkpoint],
        }
    )
    data = EditDataModule(requests=requests, batch_size=1, shuffle=False)
    trainer.fit(editor, datamodule=data, ckpt_path=spec.get("ckpt_path"))
    save_file({k: v.detach().cpu().contiguous() for k, v in editor.edited_tensors().items()}, spec["out"])


if __name__ == "__main__":
    main(sys.argv[1])
