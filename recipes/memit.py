"""MEMIT (docs/methods.md §2): least-squares edit of all requests of a batch, spread over layers.

    python recipes/memit.py                                         # demo edits, embedded SmolLM2-135M
    python recipes/memit.py --data.path counterfact --data.limit 100
    python recipes/memit.py --print_config                          # every setting, with its default
    python recipes/memit.py --model.layers [4] --model.statistics.adjustment false

Defaults live in ``memit.yaml`` beside this file; any ``--section.field`` overrides them.
Hyperparameters left ``null`` take the per-model defaults
(the config hub, ``lit_edit/config_hub/<model>/memit.yaml``). Key statistics are computed once per
(model, layer, corpus, sample count, ...) and cached under ``checkpoints/stats``.
The edit is saved under ``checkpoints/edits/memit`` and the run's metrics under ``logs/``.
"""

from pathlib import Path

from lit_edit.cli import run_recipe
from lit_edit.editors import MEMIT


def main(args=None):
    return run_recipe(MEMIT, str(Path(__file__).with_suffix(".yaml")), args)


if __name__ == "__main__":
    main()
