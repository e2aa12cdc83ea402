"""The experimenter's scenario: a centrally poisoned model plus the test data and true trigger that
measure it. Benchmarks, tests and tuning build backdoored teachers here; the defence never calls it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from defense.data import DataBundle, load_dataset
from defense.errors import ConfigError, shown
from defense.experiment import Experiment, experiment_of
from defense.metrics import evaluate_backdoor
from defense.modelio import load_model, save_model
from defense.models import build_model
from defense.training import TrainConfig, train_classifier
from defense.triggers import Trigger, poison

CACHE = Path("runs/teachers")


@dataclass
class Scenario:
    """A backdoored teacher with everything needed to measure it (the experimenter's side)."""

    teacher: nn.Module
    bundle: DataBundle
    trigger: Trigger
    target: int
    name: str
    experiment: Optional[Experiment] = None
    experiment_source: str = ""

    def evaluate(self, model: nn.Module) -> dict:
        return evaluate_backdoor(model, self.bundle.test, self.trigger, self.target)

    @property
    def evaluator(self) -> Callable[[nn.Module], dict]:
        return self.evaluate


def backdoored_scenario(attack: str = "badnets", image_size: int = 16, trigger_size: int = 3,
                        poison_rate: float = 0.1, target: int = 0, seed: int = 0, model: str = "small-cnn",
                        epochs: int = 30, dataset: str = "digits", cache: Path | None = CACHE,
                        place: str = "corner", blend_alpha: float = 0.2) -> Scenario:
    """Train (or load from cache) a centrally poisoned model (poison rate 0: a clean one)."""
    bundle = load_dataset(dataset, image_size=image_size)
    experiment = Experiment(dataset=dataset, image_size=image_size, attack=attack, trigger_size=trigger_size,
                            trigger_seed=seed, target=target, poison_rate=poison_rate, place=place,
                            blend_alpha=blend_alpha,
                            written_by="defense.scenario.backdoored_scenario")
    trigger = experiment.trigger(bundle.spec)
    name = f"{dataset}{image_size}-{model}-{attack}{trigger_size}-r{poison_rate}-t{target}-s{seed}-e{epochs}"
    if experiment.place not in ("corner", "whole image"):
        name += f"-{experiment.place}"
    if attack == "blended" and blend_alpha != 0.2:
        name += f"-a{blend_alpha}"
    path = cache / f"{name}.json" if cache is not None else None
    if path is not None and path.exists():
        teacher = load_model(path).model
    else:
        torch.manual_seed(seed)
        teacher = build_model(model, bundle.spec)
        poisoned = poison(bundle.train, trigger, poison_rate, target, seed)[0] if poison_rate > 0 else bundle.train
        train_classifier(teacher, poisoned, TrainConfig(epochs=epochs, seed=seed))
        if path is not None:
            save_model(teacher, path, model, bundle.spec, {"tool": "defense.scenario", "scenario": name},
                       experiment=experiment.to_dict())
    return Scenario(teacher.eval(), bundle, trigger, target, name, experiment, "planted here")


def model_file_scenario(path: str | Path, overrides: Optional[Mapping[str, Any]] = None,
                        data_dir: str | Path | None = None) -> Scenario:
    """A backdoored model from a file (e.g. the federated run's global model), measured on its data
    set's test split with the trigger and target of the experiment record the file carries;
    `overrides` (Experiment fields, None = not given) win over the record. A file without a record
    is measured with the defaults (a 3x3 BadNets patch, target 0) and whatever `overrides` say."""
    loaded = load_model(path)
    spec = loaded.spec
    recorded = experiment_of(loaded.manifest, str(path))
    base = recorded or Experiment(image_size=spec.height, written_by="unknown (no record in the file)")
    experiment = base.with_overrides(overrides or {})
    bundle = load_dataset(experiment.dataset, data_dir, image_size=spec.height)
    if bundle.spec.shape != spec.shape or bundle.spec.num_classes != spec.num_classes:
        raise ConfigError(f"model expects {spec.shape} inputs and {spec.num_classes} classes; "
                          f"data set {shown(experiment.dataset)} gives {bundle.spec.shape} and {bundle.spec.num_classes}")
    if not 0 <= experiment.target < spec.num_classes:
        raise ConfigError(f"--target must be in 0..{spec.num_classes - 1}, got {experiment.target}")
    source = "the file's record" if recorded is not None else "defaults (the file has no record)"
    return Scenario(loaded.model.eval(), bundle, experiment.trigger(spec), experiment.target, f"file:{path}",
                    experiment, source)
