"""EMMET (docs/methods.md §2): equality-constrained batched edit, spread over layers like MEMIT.

    python recipes/emmet.py                                         # demo edits, embedded SmolLM2-135M
    python recipes/emmet.py --data.path counterfact --data.limit 100
    python recipes/emmet.py --print_config                          # every setting, with its default
    python recipes/emmet.py --model.layers [4] --model.statistics.adjustment false

Defaults live in ``emmet.yaml`` beside this file; any ``--section.field`` overrides them.
Hyperparameters left ``null`` take the per-model defaults
(the config hub, ``lit_edit/config_hub/<model>/emmet.yaml``). Key statistics are computed once per
(model, layer, corpus, sample count, ...) and cached under ``checkpoints/stats``.
The edit is saved under ``checkpoints/edits/emmet`` and the run's metrics under ``logs/``.
"""

from pathlib import Path

from lit_edit.cli import run_recipe
from lit_edit.editors import EMMET


def main(args=None):
    return run_recipe(EMMET, str(Path(__file__).with_suffix(".yaml")), args)


if __name__ == "__main__":
    main()
