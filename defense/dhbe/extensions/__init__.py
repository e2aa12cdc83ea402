"""DHBE's departures from the official recipe, each a named extension (config + runtime object).
Importing this package registers them all in `defense.dhbe.config.EXTENSIONS`."""
from defense.dhbe.extensions import (blend_search, generator_priors, mask_search, patches, sample_pool,  # noqa: F401
                                     schedule, statistics, verdict)
from defense.dhbe.extensions.base import Extension
from defense.dhbe.extensions.blend_search import BlendSearchConfig
from defense.dhbe.extensions.generator_priors import (BatchNormPriorConfig, ClassBalanceConfig,
                                                      PriorOnlyGeneratorConfig)
from defense.dhbe.extensions.mask_search import MaskSearchConfig
from defense.dhbe.extensions.patches import StampedPatchesConfig, TriggerBankConfig
from defense.dhbe.extensions.sample_pool import SamplePoolConfig
from defense.dhbe.extensions.schedule import LambdaStepConfig, StudentEMAConfig
from defense.dhbe.extensions.statistics import MixedBatchesConfig
from defense.dhbe.extensions.verdict import VerdictConfig

__all__ = ["Extension", "BatchNormPriorConfig", "BlendSearchConfig", "ClassBalanceConfig", "LambdaStepConfig", "MaskSearchConfig", "MixedBatchesConfig",
           "PriorOnlyGeneratorConfig", "SamplePoolConfig", "StampedPatchesConfig", "StudentEMAConfig",
           "TriggerBankConfig", "VerdictConfig"]
