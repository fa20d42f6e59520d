"""ROME (docs/methods.md §2): rank-one edit of one MLP output projection per request (r-ROME keys).

    python recipes/rome.py                                         # demo edits, embedded SmolLM2-135M
    python recipes/rome.py --data.path counterfact --data.limit 100
    python recipes/rome.py --print_config                          # every setting, with its default
    python recipes/rome.py --model.layers [4] --model.statistics.adjustment false

Defaults live in ``rome.yaml`` beside this file; any ``--section.field`` overrides them.
Hyperparameters left ``null`` take the per-model defaults
(the config hub, ``lit_edit/config_hub/<model>/rome.yaml``). Key statistics are computed once per
(model, layer, corpus, sample count, ...) and cached under ``checkpoints/stats``.
The edit is saved under ``checkpoints/edits/rome`` and the run's metrics under ``logs/``.
"""

from pathlib import Path

from lit_edit.cli import run_recipe
from lit_edit.editors import ROME


def main(args=None):
    return run_recipe(ROME, str(Path(__file__).with_suffix(".yaml")), args)


if __name__ == "__main__":
    main()
