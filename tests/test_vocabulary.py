"""One vocabulary: the config's choices, the CLI's ``choices=`` and what the model and the data readers accept are
the tuples of ``dcal.vocabulary``, and importing it loads no torch."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dcal import vocabulary as vocab
from dcal.cli import build_parser
from dcal.config import CHOICES, load_config


def test_import_is_torch_free():
    code = "import sys, dcal.vocabulary, dcal.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _choices(option: str) -> dict[str, tuple]:
    """``option``'s choices in every subcommand that has it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for name, p in sub.choices.items():
        for action in p._actions:
            if option in action.option_strings:
                found[name] = tuple(action.choices)
    return found


def test_cli_choices_are_the_vocabulary():
    assert _choices("--fusion") == dict.fromkeys(("predict", "embed", "search", "export"), vocab.FUSIONS)
    assert _choices("--metric") == {"search": vocab.RETRIEVAL_METRICS}
    assert CHOICES["eval.fusion"] == vocab.FUSIONS and CHOICES["eval.metric"] == vocab.RETRIEVAL_METRICS


def test_the_model_and_the_readers_use_the_vocabulary():
    from dcal.data import fgvc, images, reid, robust, transforms
    from dcal.engine import BEST_METRIC, SCORE_KEYS
    from dcal.model import dcal as model
    from dcal.model import pairs

    assert model.TASKS is vocab.TASKS and transforms.TASKS is vocab.TASKS
    assert model.QUERY_SELECTIONS is CHOICES["model.query_selection"] is vocab.QUERY_SELECTIONS
    assert model.PAIR_STRATEGIES is pairs.PAIR_STRATEGIES is CHOICES["model.pair_strategy"]
    assert model.GLCA_POOLS is CHOICES["model.glca_pool"] and model.FUSIONS is CHOICES["eval.fusion"]
    assert tuple(CHOICES["train.amp"]) == tuple(vocab.AMP_PRECISION)
    assert set(vocab.AMP_PRECISION.values()) == set(model.PRECISIONS)
    assert images.IMAGE_EXTENSIONS is reid.IMAGE_EXTENSIONS is vocab.IMAGE_EXTENSIONS
    assert tuple(fgvc.AIRCRAFT_CLASS_FILES) == CHOICES["data.aircraft_annotation_level"]
    assert fgvc.SYNTHETIC_TASKS is CHOICES["data.synthetic_task"]
    assert robust.ON_BAD_IMAGE is CHOICES["data.on_bad_image"]
    assert transforms.ERASING_MODES is CHOICES["data.random_erasing_mode"]
    assert SCORE_KEYS is vocab.SCORE_KEYS and BEST_METRIC == {"fgvc": "top1", "reid": "mAP"}


@pytest.mark.parametrize("key", ["model.query_selection", "model.pair_strategy", "model.glca_pool"])
def test_every_config_choice_builds_a_model_config(key):
    """What the config accepts, the model accepts; one value past the vocabulary is refused by both."""
    from dcal.model import DCALConfig

    field = key.split(".")[1]
    for value in CHOICES[key]:
        assert load_config(None, [f"{key}={value}"]).model[field] == value
        assert getattr(DCALConfig(**{field: value}), field) == value
    with pytest.raises(ValueError, match=field):
        DCALConfig(**{field: "nope"})
