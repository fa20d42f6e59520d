"""LocFT-BF: breadth-first localized fine-tuning on edit requests, evaluated before and after.

    python recipes/locft_bf.py                                   # demo edits, embedded SmolLM2-135M
    python recipes/locft_bf.py --data.path counterfact --data.limit 200
    python recipes/locft_bf.py --print_config                    # every setting, with its default
    python recipes/locft_bf.py --model.lr 1e-4 --trainer.max_epochs 10

Defaults live in ``locft_bf.yaml`` beside this file; any ``--section.field`` overrides them.
The edit is saved under ``checkpoints/edits/locft_bf`` and the run's metrics under ``logs/``.
"""

from pathlib import Path

from lit_edit.cli import run_recipe
from lit_edit.editors import LocFTBF


def main(args=None):
    return run_recipe(LocFTBF, str(Path(__file__).with_suffix(".yaml")), args)


if __name__ == "__main__":
    main()
