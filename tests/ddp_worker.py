"""One editing run under a Lightning strategy, launched as a script (Lightning's DDP launcher starts
the other ranks by running this file again). Used by ``tests/test_distributed.py``.

    python tests/ddp_worker.py SPEC.json

``SPEC.json``: ``{"editor": "MEMIT", "model": DIR, "requests": FILE, "out": DIR, "devices": 2,
"strategy": "ddp", "editor_args": {...}, "data_args": {...}, "trainer_args": {...},
"evaluate": ["token_accuracy", ...] | null, "stats_corpus": FILE | null}``. Each rank writes
``rank<r>.safetensors`` (the edited tensors), and ``rank<r>.json`` (their hashes, the
evaluation figures, the optimizer steps and the world size).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lightning as L
    import torch
    from safetensors.torch import save_file

    import lit_edit.editors as editors
    from lit_edit.cli import configure_output
    from lit_edit.data import EditDataModule, load_requests
    from lit_edit.edits import tensor_sha256
    from lit_edit.evaluation import EditEvaluation

    configure_output()
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    editor_class = getattr(editors, spec["editor"])
    L.seed_everything(0, verbose=False)
    editor = editor_class(model=spec["model"], **spec.get("editor_args", {}))
    data = EditDataModule(requests=load_requests(spec["requests"]), **spec.get("data_args", {}))
    callbacks = []
    if spec.get("evaluate"):
        evaluation = EditEvaluation(protocols=spec["evaluate"], print_table=False)  # summary.json in the trainer's log dir
        callbacks.append(evaluation)
    trainer = L.Trainer(
        **{
            **editor_class.trainer_defaults,
            "accelerator": "cpu",
            "devices": spec.get("devices", 1),
            "strategy": spec.get("strategy", "auto"),
            "logger": False,
            "default_root_dir": str(out),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
            **spec.get("trainer_args", {}),
        }
    )
    trainer.fit(editor, datamodule=data)
    rank = trainer.global_rank
    tensors = {k: v.detach().cpu().contiguous() for k, v in editor.edited_tensors().items()}
    save_file(tensors, out / f"rank{rank}.safetensors")
    record = {
        "world_size": trainer.world_size,
        "hashes": {k: tensor_sha256(v) for k, v in tensors.items()},
        "optimizer_steps": getattr(editor, "optimizer_steps", None),
        "lr": next((g["lr"] for o in trainer.optimizers for g in o.param_groups), None),  # closed-form editors: none
        "before": callbacks[0].before if callbacks else None,
        "after": callbacks[0].after if callbacks else None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
