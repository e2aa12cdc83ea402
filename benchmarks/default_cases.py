"""The cases the default purification is measured on (issue: one data-free default). Each case is a
model planted once (cached under runs/cases/, every file with its experiment record) by the project's
own code paths: `defense.scenario.backdoored_scenario` (central) or `federated.engine.run_federated`
(FedAvg, IID or Dirichlet). Targets, places and seeds vary across cases.

DEV is the development subset the default was iterated on (marked `tuned` in every table);
HELD_OUT is run once, at the end; CLEAN are models no attacker touched."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

CACHE = Path("runs/cases")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                        # central | fedavg | dirichlet
    attack: str = "badnets"
    trigger_size: int = 3
    place: str = "corner"
    target: int = 0
    seed: int = 0
    blend_alpha: float = 0.2
    poisoned: bool = True            # False: a clean model (no attacker, poison rate 0)
    malicious: int = 2
    boost: float = 1.0
    extra: dict = field(default_factory=dict)


DEV = [
    Case("clean-central-s0", "central", poisoned=False, seed=0),
    Case("clean-fedavg-s1", "fedavg", poisoned=False, seed=1),
    Case("badnets3-corner-central", "central", trigger_size=3, target=0, seed=0),
    Case("badnets4-centre-fedavg", "fedavg", trigger_size=4, place="centre", target=5, seed=2),
    Case("blended0.2-fedavg", "fedavg", attack="blended", target=3, seed=3),
    Case("sig-fedavg", "fedavg", attack="sig", target=8, seed=4),
    Case("dba4-fedavg", "fedavg", attack="dba", trigger_size=4, target=2, seed=5, malicious=3),
    Case("badnets2-random-central", "central", trigger_size=2, place="random", target=6, seed=6),
]

HELD_OUT = [
    Case("clean-fedavg-s11", "fedavg", poisoned=False, seed=11),
    Case("clean-central-s12", "central", poisoned=False, seed=12),
    Case("badnets3-random-fedavg", "fedavg", trigger_size=3, place="random", target=9, seed=13),
    Case("blended0.1-central", "central", attack="blended", blend_alpha=0.1, target=4, seed=14),
    Case("blended0.3-dirichlet", "dirichlet", attack="blended", blend_alpha=0.3, target=1, seed=15),
    Case("sig-central", "central", attack="sig", target=7, seed=16),
    Case("badnets4-corner-boosted", "fedavg", trigger_size=4, target=6, seed=17, malicious=1, boost=5.0),
    Case("dba3-dirichlet", "dirichlet", attack="dba", trigger_size=3, target=0, seed=18, malicious=3),
]


def plant(case: Case, cache: Path = CACHE, tiny: bool = False) -> Path:
    """The case's model file (planted on first use, then reused)."""
    stem = case.name.replace(".", "p")  # a dot would end the file's stem
    path = cache / f"{stem}{'-tiny' if tiny else ''}.json"
    if path.exists():
        return path
    if case.kind == "central":
        from defense.modelio import save_model
        from defense.scenario import backdoored_scenario

        scenario = backdoored_scenario(case.attack, 16, case.trigger_size, 0.1 if case.poisoned else 0.0,
                                       target=case.target, seed=case.seed, epochs=2 if tiny else 30, cache=None,
                                       place=case.place, blend_alpha=case.blend_alpha)
        save_model(scenario.teacher, path, "small-cnn", scenario.bundle.spec,
                   {"tool": "benchmarks.default_cases", "case": case.name}, experiment=scenario.experiment.to_dict())
        return path
    import tempfile

    from defense.data import load_dataset
    from defense.modelio import load_model, save_model
    from federated.config import SimulationConfig
    from federated.engine import run_federated

    config = SimulationConfig(malicious=case.malicious if case.poisoned else 0, seed=case.seed, attack=case.attack,
                              trigger_size=case.trigger_size, trigger_place=case.place, target=case.target,
                              blend_alpha=case.blend_alpha, boost=case.boost, rounds=2 if tiny else 20,
                              partition="dirichlet" if case.kind == "dirichlet" else "iid")
    spec = load_dataset(config.dataset, None, config.image_size).spec
    with tempfile.TemporaryDirectory() as folder:
        run_federated(config, Path(folder) / "run", spec, purify=False, quiet=True)
        final = load_model(Path(folder) / "run" / "final.json")
        save_model(final.model, path, final.model_name, final.spec,
                   {"tool": "benchmarks.default_cases", "case": case.name, "via": "federated.engine.run_federated"},
                   experiment=final.manifest["experiment"])
    return path


def by_name(name: str) -> Optional[Case]:
    return next((c for c in DEV + HELD_OUT if c.name == name), None)
