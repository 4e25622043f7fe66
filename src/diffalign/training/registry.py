"""Which config and trainer class a preset or run trains with (shared by the CLI and evaluation)."""

from __future__ import annotations

from pathlib import Path


def train_classes(source: Path, overrides: list[str]):
    """(config class, trainer class) for the ``algorithm`` that overrides or a preset / run config
    name: the preference family goes to the preference trainer, the rest to the RL trainer."""
    from diffalign.training.preference import (
        PREFERENCE_ALGORITHMS,
        PreferenceConfig,
        PreferenceTrainer,
        preset_algorithm,
    )
    from diffalign.training.trainer import TrainConfig, Trainer

    given = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "algorithm"]
    algorithm = given[-1] if given else preset_algorithm(source)
    if algorithm in PREFERENCE_ALGORITHMS:
        return PreferenceConfig, PreferenceTrainer
    return TrainConfig, Trainer
