"""AlphaEdit (docs/methods.md §2.11): MEMIT's update projected onto the null space of the
preserved keys, with the keys of earlier batches kept; the sequential-batched baseline.

    python recipes/alphaedit.py                                         # demo edits, 3 sequential batches of 8
    python recipes/alphaedit.py --data.path counterfact --data.limit 100 --data.batch_size 10
    python recipes/alphaedit.py --print_config                          # every setting, with its default
    python recipes/alphaedit.py --model.nullspace_threshold 0.01

Defaults live in ``alphaedit.yaml`` beside this file; any ``--section.field`` overrides them.
Hyperparameters left ``null`` take the per-model defaults
(the config hub, ``lit_edit/config_hub/<model>/alphaedit.yaml``). Key statistics are computed once
per (model, layer, corpus, sample count, ...) and cached under ``checkpoints/stats``.
The edit is saved under ``checkpoints/edits/alphaedit`` and the run's metrics under ``logs/``.
"""

from pathlib import Path

from lit_edit.cli import run_recipe
from lit_edit.editors import AlphaEdit


def main(args=None):
    return run_recipe(AlphaEdit, str(Path(__file__).with_suffix(".yaml")), args)


if __name__ == "__main__":
    main()
