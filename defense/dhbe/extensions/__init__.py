"""DHBE's departures from the official recipe, each a named extension (config + runtime object).
Importing this package registers them all in `defense.dhbe.config.EXTENSIONS`."""
from defense.dhbe.extensions import generator_priors, perturbations, sample_pool, schedule, verdict  # noqa: F401
from defense.dhbe.extensions.base import Extension
from defense.dhbe.extensions.generator_priors import (BatchNormPriorConfig, ClassBalanceConfig,
                                                      PriorOnlyGeneratorConfig)
from defense.dhbe.extensions.perturbations import PerturbationsConfig
from defense.dhbe.extensions.sample_pool import SamplePoolConfig
from defense.dhbe.extensions.schedule import LambdaStepConfig, StudentEMAConfig
from defense.dhbe.extensions.verdict import VerdictConfig

__all__ = ["Extension", "BatchNormPriorConfig", "ClassBalanceConfig", "LambdaStepConfig", "PerturbationsConfig",
           "PriorOnlyGeneratorConfig", "SamplePoolConfig", "StudentEMAConfig", "VerdictConfig"]
