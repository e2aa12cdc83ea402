"""The cases the default purification is measured on (issue: one data-free default). Each case is a
model planted once (cached under runs/cases/, every file with its experiment record) by the project's
own code paths: `defense.scenario.backdoored_scenario` (central) or `federated.engine.run_federated`
(FedAvg, IID or Dirichlet). Targets, places and seeds vary across cases.

DEV is the development subset the default was iterated on (marked `tuned` in every table);
HELD_OUT is run once, at the end. LATE (eleventh round) are the defence matrix's FedAvg cells, where
the attack ends five rounds before the last (target 0), plus three more clean models: the set on
which the verdict's false negatives were found, so a development set from then on; LATE_HELD_OUT are
the same kinds of model on another seed, run once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from defense.experiment import Experiment

CACHE = Path("runs/cases")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                        # central | fedavg | dirichlet
    attack: Experiment               # the attack's record (kind, trigger, place, target, seed)
    poisoned: bool = True            # False: a clean model (no attacker, poison rate 0)
    malicious: int = 2
    boost: float = 1.0
    matrix_attack: Optional[str] = None   # kind "matrix": the defence matrix's cell of this attack
    matrix_aggregation: str = "fedavg"    # and of this in-training defence


def case(name: str, kind: str, poisoned: bool = True, malicious: int = 2, boost: float = 1.0, **attack) -> Case:
    """A case; `attack` are Experiment fields (seed: the case's seed, which also seeds the trigger)."""
    seed = attack.pop("seed", 0)
    return Case(name, kind, Experiment(trigger_seed=seed, **attack), poisoned, malicious, boost)


DEV = [
    case("clean-central-s0", "central", poisoned=False, seed=0),
    case("clean-fedavg-s1", "fedavg", poisoned=False, seed=1),
    case("badnets3-corner-central", "central", trigger_size=3, target=0, seed=0),
    case("badnets4-centre-fedavg", "fedavg", trigger_size=4, place="centre", target=5, seed=2),
    case("blended0.2-fedavg", "fedavg", attack="blended", target=3, seed=3),
    case("sig-fedavg", "fedavg", attack="sig", target=8, seed=4),
    case("dba4-fedavg", "fedavg", attack="dba", trigger_size=4, target=2, seed=5, malicious=3),
    case("badnets2-random-central", "central", trigger_size=2, place="random", target=6, seed=6),
]

HELD_OUT = [
    case("clean-fedavg-s11", "fedavg", poisoned=False, seed=11),
    case("clean-central-s12", "central", poisoned=False, seed=12),
    case("badnets3-random-fedavg", "fedavg", trigger_size=3, place="random", target=9, seed=13),
    case("blended0.1-central", "central", attack="blended", blend_alpha=0.1, target=4, seed=14),
    case("blended0.3-dirichlet", "dirichlet", attack="blended", blend_alpha=0.3, target=1, seed=15),
    case("sig-central", "central", attack="sig", target=7, seed=16),
    case("badnets4-corner-boosted", "fedavg", trigger_size=4, target=6, seed=17, malicious=1, boost=5.0),
    case("dba3-dirichlet", "dirichlet", attack="dba", trigger_size=3, target=0, seed=18, malicious=3),
]


# the defence matrix's attack rows: SimulationConfig fields of each (the trigger, how attackers poison,
# how many, boost)
MATRIX_ATTACKS = {
    "badnets": {"attack": "badnets"},
    "blended": {"attack": "blended"},
    "sig": {"attack": "sig"},
    "dba": {"attack": "dba", "malicious": 3},
    "neurotoxin": {"attack": "badnets", "attacker": "neurotoxin"},
    "a3fl": {"attack": "badnets", "attacker": "a3fl"},
    "boosted-badnets": {"attack": "badnets", "malicious": 1, "boost": 5.0},
}


def cell_config(attack: str, aggregation: str, seed: int, tiny: bool):
    """One matrix cell's simulation: 10 clients, 20 rounds, attackers in rounds 1-15, target seed % 10."""
    from federated.config import SimulationConfig

    rounds = 3 if tiny else 20
    fields = {"clients": 4 if tiny else 10, "malicious": 2, "rounds": rounds, "local_epochs": 1 if tiny else 2,
              "aggregation": aggregation, "seed": seed, "target": seed % 10,
              "attack_from_round": 1, "attack_until_round": rounds - (1 if tiny else 5), **MATRIX_ATTACKS[attack]}
    if tiny:
        fields["malicious"] = min(fields["malicious"], 1)
    return SimulationConfig(**fields)


def matrix_case(attack: str, seed: int = 0, aggregation: str = "fedavg") -> Case:
    """The defence matrix's cell (benchmarks.defence_matrix.cell_config) as a case."""
    fields = {"badnets": {}, "blended": {"attack": "blended"}, "sig": {"attack": "sig"},
              "dba": {"attack": "dba"}, "neurotoxin": {}, "boosted-badnets": {}}[attack]
    return Case(f"matrix-{attack}-{aggregation}-s{seed}", "matrix",
                Experiment(trigger_seed=seed, target=seed % 10, **fields), matrix_attack=attack,
                matrix_aggregation=aggregation)


LATE = [matrix_case(a) for a in ("badnets", "blended", "sig", "dba", "neurotoxin", "boosted-badnets")] + [
    case("clean-central-s20", "central", poisoned=False, seed=20),
    case("clean-central-s21", "central", poisoned=False, seed=21),
    case("clean-fedavg-s22", "fedavg", poisoned=False, seed=22),
]
# run once, for the eleventh round's decision: late-window cells of another seed (target 1), one more clean model
LATE_HELD_OUT = [matrix_case(a, seed=1) for a in ("sig", "badnets", "blended")] + [
    case("clean-fedavg-s23", "fedavg", poisoned=False, seed=23)]
# run once, for the twelfth round (the verdict over earlier global models): late-window cells of a third
# seed (target 2), DBA among them, and two more clean FedAvg runs; fixed before any of them was planted
TEMPORAL_HELD_OUT = [matrix_case(a, seed=2) for a in ("sig", "badnets", "blended", "dba")] + [
    case("clean-fedavg-s24", "fedavg", poisoned=False, seed=24),
    case("clean-fedavg-s25", "fedavg", poisoned=False, seed=25)]
# run once, for the thirteenth round (earlier versions searched on the model's fitted copy of G): a fourth
# seed's late-window cells (target 3) and two more clean FedAvg runs; fixed before any of them was planted
SHARED_GENERATOR_HELD_OUT = [matrix_case(a, seed=3) for a in ("sig", "badnets", "blended", "dba")] + [
    case("clean-fedavg-s26", "fedavg", poisoned=False, seed=26),
    case("clean-fedavg-s27", "fedavg", poisoned=False, seed=27)]
# run once, for the fourteenth round (the verdict's false alarms on clean federations, and its misses
# under robust aggregation): a fifth seed's late-window cells (target 4), two of them under trimmed mean
# and median, and four more clean FedAvg runs; fixed before any of them was planted
FALSE_ALARM_HELD_OUT = [matrix_case(a, seed=4) for a in ("sig", "badnets", "blended", "dba")] + [
    matrix_case("blended", 4, "trimmed-mean"), matrix_case("sig", 4, "median")] + [
    case(f"clean-fedavg-s{seed}", "fedavg", poisoned=False, seed=seed) for seed in (28, 29, 30, 31)]
# fixed for the seventeenth round (a suspect confirmed by the size of Neural Cleanse's smallest mask) before
# any was planted: a sixth seed's late-window cells (target 5) and three more clean FedAvg runs. That rule
# was refuted on visible cases first, so this set stayed unplanted; it was run once in stop 33 for the final
# default, with the two FALSE_ALARM_HELD_OUT cases left until then (blended under trimmed mean, clean s31).
MASK_SIZE_HELD_OUT = [matrix_case(a, seed=5) for a in ("sig", "badnets", "blended", "dba")] + [
    case(f"clean-fedavg-s{seed}", "fedavg", poisoned=False, seed=seed) for seed in (32, 33, 34)]
# the defence matrix's cells (seed 0, target 0) where a robust aggregation left a live backdoor (ASR x1 >=
# 50%; benchmarks/results/defence_matrix.md): the purified column, run once, handed some of them back
# or left them unerased (fourteenth round); development cases from then on
ROBUST_AGGREGATION = [matrix_case("blended", 0, a) for a in ("median", "trimmed-mean", "clip", "rlr")] + [
    matrix_case("sig", 0, a) for a in ("median", "trimmed-mean", "rlr")]
CASE_SETS = {"dev": DEV, "held-out": HELD_OUT, "late": LATE, "late-held-out": LATE_HELD_OUT,
             "temporal-held-out": TEMPORAL_HELD_OUT, "shared-generator-held-out": SHARED_GENERATOR_HELD_OUT,
             "false-alarm-held-out": FALSE_ALARM_HELD_OUT, "robust-aggregation": ROBUST_AGGREGATION,
             "mask-size-held-out": MASK_SIZE_HELD_OUT}


def simulation_config(case: Case, tiny: bool = False):
    """The simulation that plants a federated case (kinds fedavg, dirichlet, matrix)."""
    from federated.config import SimulationConfig

    if case.kind == "matrix":
        return cell_config(case.matrix_attack, case.matrix_aggregation, case.attack.trigger_seed, tiny)
    trigger = case.attack
    return SimulationConfig(malicious=case.malicious if case.poisoned else 0, seed=trigger.trigger_seed,
                            attack=trigger.attack, trigger_size=trigger.trigger_size,
                            trigger_place=trigger.place if trigger.place != "whole image" else "corner",
                            target=trigger.target, blend_alpha=trigger.blend_alpha, boost=case.boost,
                            rounds=2 if tiny else 20, partition="dirichlet" if case.kind == "dirichlet" else "iid")


def plant(case: Case, cache: Path = CACHE, tiny: bool = False) -> Path:
    """The case's model file (planted on first use, then reused)."""
    stem = case.name.replace(".", "p")  # a dot would end the file's stem
    path = cache / f"{stem}{'-tiny' if tiny else ''}.json"
    if path.exists():
        return path
    trigger = case.attack
    if case.kind == "central":
        from defense.modelio import save_model
        from defense.scenario import backdoored_scenario

        scenario = backdoored_scenario(trigger.attack, 16, trigger.trigger_size, 0.1 if case.poisoned else 0.0,
                                       target=trigger.target, seed=trigger.trigger_seed, epochs=2 if tiny else 30,
                                       cache=None, place=trigger.place, blend_alpha=trigger.blend_alpha)
        save_model(scenario.teacher, path, "small-cnn", scenario.bundle.spec,
                   {"tool": "benchmarks.default_cases", "case": case.name}, experiment=scenario.experiment.to_dict())
        return path
    import tempfile

    from defense.modelio import load_model, save_model

    with tempfile.TemporaryDirectory() as folder:
        final = load_model(run_simulation(case, Path(folder) / "run", tiny) / "final.json")
        save_model(final.model, path, final.model_name, final.spec,
                   {"tool": "benchmarks.default_cases", "case": case.name, "via": "federated.engine.run_federated"},
                   experiment=final.manifest["experiment"])
    return path


def run_simulation(case: Case, folder: Path, tiny: bool = False) -> Path:
    from defense.data import load_dataset
    from federated.engine import run_federated

    config = simulation_config(case, tiny)
    spec = load_dataset(config.dataset, None, config.image_size).spec
    run_federated(config, folder, spec, purify=False, quiet=True)
    return folder


def plant_history(case: Case, cache: Path = CACHE.parent / "history") -> Path:
    """A federated case's whole run folder (every round's global model under models/), kept."""
    folder = cache / case.name.replace(".", "p")
    if (folder / "final.json").exists():
        return folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    return run_simulation(case, folder)


def earlier_model_files(folder: Path, last_round: int) -> list[Path]:
    """The earlier global models of a run folder that the simulation's purification hands the verdict
    (federated.purification.earlier_rounds: rounds 5, 10, 15 of 20)."""
    from federated.purification import earlier_rounds
    from federated.run_folder import round_model_file

    return [round_model_file(folder, r) for r in earlier_rounds(last_round, range(1, last_round))]


def history_models(case: Case) -> tuple[Path, list[Path]]:
    """A federated case's final global model and the earlier ones the verdict weighs."""
    folder = plant_history(case)
    return folder / "final.json", earlier_model_files(folder, simulation_config(case).rounds)


def by_name(name: str) -> Optional[Case]:
    return next((c for cases in CASE_SETS.values() for c in cases if c.name == name), None)
