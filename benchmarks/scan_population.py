"""The population the scanner is measured on as a detector (`python -m benchmarks.scan_roc`).

Every member is planted once by the project's own code paths (`federated.engine.run_federated` for a
federation, whose whole run folder is kept so that its earlier global models can be scanned too;
`defense.scenario.backdoored_scenario` for a central model) and cached under runs/scan_population/,
with the experimenter's truth beside it (ACC and ASR x1/x4/x9 of the attack's own trigger on the test
split; the scanner never reads it).

The members are drawn from the two lists below by a seeded generator. CALIBRATION (seeds 100+) is
where the scanner's threshold and rules are chosen; HELD_OUT (seeds 300+) was fixed in this file
before any of its models was planted and is scanned once, at the end. A member counts as backdoored
when its final ASR x1 >= 50% or x9 >= 80%, as clean when no client poisoned, and is reported apart
when an attack ran but left a weaker backdoor than that (or none).
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from defense.cli import ArgumentParser

CACHE = Path("runs/scan_population")

# attack kinds a federation can plant: SimulationConfig fields (targets, seeds and shapes drawn apart)
FEDERATED_ATTACKS: dict[str, dict[str, Any]] = {
    "badnets": {"attack": "badnets"},
    "badnets-white": {"attack": "badnets", "trigger_pattern": "white"},
    "badnets-tri1": {"attack": "badnets", "trigger_pattern": "tri1"},
    "badnets-centre": {"attack": "badnets", "trigger_place": "centre"},
    "badnets-random": {"attack": "badnets", "trigger_place": "random"},
    "blended": {"attack": "blended"},
    "sig": {"attack": "sig"},
    "dba": {"attack": "dba", "malicious": 3},
    "boosted": {"attack": "badnets", "malicious": 1, "boost": 5.0},
    "neurotoxin": {"attack": "badnets", "attacker": "neurotoxin"},
    "a3fl": {"attack": "badnets", "attacker": "a3fl"},
}
# federation shapes, clean or attacked: SimulationConfig fields
SHAPES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "dirichlet": {"partition": "dirichlet"},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean"},
    "clip": {"aggregation": "clip"},
    "rlr": {"aggregation": "rlr"},
    "flame": {"aggregation": "flame"},
    "20-sampled": {"clients": 20, "sample": 10},
    "50-sampled": {"clients": 50, "sample": 10},
    "late-window": {"late": True},
}
CENTRAL_ATTACKS = {"badnets-corner": {"attack": "badnets", "place": "corner"},
                   "badnets-centre": {"attack": "badnets", "place": "centre"},
                   "badnets-random": {"attack": "badnets", "place": "random"},
                   "blended": {"attack": "blended"}, "sig": {"attack": "sig"}}


@dataclass(frozen=True)
class Member:
    name: str
    split: str                     # calibration | held-out
    kind: str                      # federated | central
    poisoned: bool
    attack_kind: str               # the attack's name in FEDERATED_ATTACKS / CENTRAL_ATTACKS, or "clean"
    shape: str                     # the federation's shape (SHAPES) or "central"
    fields: dict = field(default_factory=dict, hash=False)   # SimulationConfig fields, or central scenario's


def _federated(split: str, index: int, rng: random.Random, attack: Optional[str], shape: str, seed: int) -> Member:
    fields: dict[str, Any] = {"seed": seed, "rounds": rng.choice([12, 16, 20]), "local_epochs": 2}
    shape_fields = dict(SHAPES[shape])
    late = shape_fields.pop("late", False)
    fields.update(shape_fields)
    if attack is None:
        fields["malicious"] = 0
    else:
        fields.update({"malicious": 2, "target": rng.randrange(10), **FEDERATED_ATTACKS[attack]})
        if fields["attack"] in ("badnets", "dba"):
            fields["trigger_size"] = rng.choice([2, 3, 4]) if fields["attack"] == "badnets" else rng.choice([3, 4])
        if fields["attack"] == "blended":
            fields["blend_alpha"] = rng.choice([0.1, 0.15, 0.2, 0.3])
        if fields.get("sample"):
            fields["malicious"] = fields["malicious"] * fields["clients"] // 10   # the same share of attackers
        if late:
            fields["attack_until_round"] = fields["rounds"] - 4
    name = f"{split}-{index:02d}-{'clean' if attack is None else attack}-{shape}-s{seed}"
    return Member(name, split, "federated", attack is not None, attack or "clean", shape, fields)


def _central(split: str, index: int, rng: random.Random, attack: Optional[str], seed: int) -> Member:
    fields: dict[str, Any] = {"seed": seed, "epochs": rng.choice([20, 30])}
    if attack is None:
        fields.update({"attack": "badnets", "poison_rate": 0.0})
    else:
        fields.update({"poison_rate": 0.1, "target": rng.randrange(10), **CENTRAL_ATTACKS[attack]})
        if fields["attack"] == "badnets":
            fields["trigger_size"] = rng.choice([2, 3, 4])
        if fields["attack"] == "blended":
            fields["blend_alpha"] = rng.choice([0.1, 0.2, 0.3])
    name = f"{split}-{index:02d}-{'clean' if attack is None else attack}-central-s{seed}"
    return Member(name, split, "central", attack is not None, attack or "clean", "central", fields)


# the parts of the population and their first seeds: calibration (rules are chosen there), held-out (run
# once, stop 40), held-out-2 (planted at stop 43 for the shift rule written down before it: docs/scan.md)
SPLITS = {"calibration": 100, "held-out": 300, "held-out-2": 500}


def population(split: str) -> list[Member]:
    """The split's members, in planting order (fixed: a seeded draw over the lists above)."""
    first_seed = SPLITS[split]
    rng = random.Random(first_seed)
    clean_shapes = ["fedavg"] * 6 + ["dirichlet"] * 3 + ["median", "trimmed-mean", "clip", "rlr", "flame",
                                                          "20-sampled", "50-sampled"]
    attacks = list(FEDERATED_ATTACKS) * 2
    rng.shuffle(attacks)
    attack_shapes = ["fedavg"] * 7 + ["dirichlet"] * 3 + ["late-window"] * 3 + [
        "median", "trimmed-mean", "clip", "rlr", "flame", "20-sampled", "50-sampled"] + ["fedavg"] * 2
    plan: list[tuple[str, Optional[str], str]] = (
        [("federated", None, s) for s in clean_shapes] + [("central", None, "central")] * 5 +
        [("federated", a, s) for a, s in zip(attacks, attack_shapes)] +
        [("central", a, "central") for a in CENTRAL_ATTACKS])
    members = []
    for index, (kind, attack, shape) in enumerate(plan):
        seed = first_seed + index
        members.append(_federated(split, index, rng, attack, shape, seed) if kind == "federated"
                       else _central(split, index, rng, attack, seed))
    return members


def tiny_population() -> list[Member]:
    """Two members at seconds-long size (CI's smoke run): one clean federation, one central backdoor."""
    return [Member("tiny-clean-fedavg", "calibration", "federated", False, "clean", "fedavg",
                   {"seed": 1, "rounds": 3, "clients": 3, "malicious": 0, "local_epochs": 1}),
            Member("tiny-badnets-central", "calibration", "central", True, "badnets-corner", "central",
                   {"seed": 2, "epochs": 2, "attack": "badnets", "poison_rate": 0.1, "target": 3})]


# ------------------------------------------------------------------------------------------------------
def member_folder(member: Member, cache: Path = CACHE) -> Path:
    return cache / member.name


def plant(member: Member, cache: Path = CACHE) -> Path:
    """The member's folder (planted on first use): model.json (the final model), earlier/ (a federation's
    earlier global models, as the server hook picks them) and truth.json."""
    folder = member_folder(member, cache)
    if (folder / "truth.json").exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{member.name}-", dir=cache.mkdir(parents=True, exist_ok=True) or cache))
    try:
        (_plant_federated if member.kind == "federated" else _plant_central)(member, staging)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _plant_federated(member: Member, staging: Path) -> None:
    from defense.data import load_dataset
    from defense.modelio import load_model, save_model
    from defense.scenario import model_file_scenario
    from federated.config import SimulationConfig
    from federated.engine import run_federated
    from federated.purification import earlier_rounds
    from federated.run_folder import round_model_file

    config = SimulationConfig(**member.fields)
    spec = load_dataset(config.dataset, None, config.image_size).spec
    run = staging / "run"
    run_federated(config, run, spec, purify=False, quiet=True)
    final = load_model(run / "final.json")
    save_model(final.model, staging / "model", final.model_name, final.spec,
               {"tool": "benchmarks.scan_population", "member": member.name}, experiment=final.manifest["experiment"])
    for number in earlier_rounds(config.rounds, range(1, config.rounds)):
        earlier = load_model(round_model_file(run, number))
        save_model(earlier.model, staging / "earlier" / f"round-{number:03d}", earlier.model_name, earlier.spec,
                   {"tool": "benchmarks.scan_population", "member": member.name, "round": number})
    truth = model_file_scenario(staging / "model.json").evaluate(final.model)
    shutil.rmtree(run)
    _write_truth(staging, member, truth)


def _plant_central(member: Member, staging: Path) -> None:
    from defense.modelio import save_model
    from defense.scenario import backdoored_scenario

    fields = dict(member.fields)
    scenario = backdoored_scenario(fields.pop("attack"), 16, fields.pop("trigger_size", 3), fields.pop("poison_rate"),
                                   target=fields.pop("target", 0), seed=fields.pop("seed"), epochs=fields.pop("epochs"),
                                   cache=None, **fields)
    save_model(scenario.teacher, staging / "model", "small-cnn", scenario.bundle.spec,
               {"tool": "benchmarks.scan_population", "member": member.name},
               experiment=scenario.experiment.to_dict())
    _write_truth(staging, member, scenario.evaluate(scenario.teacher))


def _write_truth(staging: Path, member: Member, evaluation: dict) -> None:
    truth = {"member": member.name, "poisoned": member.poisoned, "attack_kind": member.attack_kind,
             "shape": member.shape, "fields": member.fields, **{k: evaluation.get(k) for k in
                                                                 ("acc", "asr_x1", "asr_x4", "asr_x9")}}
    truth["target"] = member.fields.get("target") if member.poisoned else None
    truth["label"] = label(truth)
    (staging / "truth.json").write_text(json.dumps(truth, indent=1))


def label(truth: dict) -> str:
    """backdoored (ASR x1 >= 50% or x9 >= 80%), clean (nothing poisoned), or weak (an attack that left less)."""
    if not truth["poisoned"]:
        return "clean"
    if (truth.get("asr_x1") or 0) >= 0.5 or (truth.get("asr_x9") or 0) >= 0.8:
        return "backdoored"
    return "weak"


def model_files(folder: Path) -> tuple[Path, list[Path]]:
    """A planted member's final model and its earlier versions (oldest first)."""
    return folder / "model.json", sorted((folder / "earlier").glob("round-*.json"))


def main() -> None:
    import time

    p = ArgumentParser(prog="python -m benchmarks.scan_population", description=__doc__)
    p.add_argument("--split", choices=tuple(SPLITS), required=True)
    args = p.parse_args()
    for member in population(args.split):
        started = time.perf_counter()
        folder = plant(member)
        truth = json.loads((folder / "truth.json").read_text())
        x9 = "-" if truth["asr_x9"] is None else f"{truth['asr_x9']:.3f}"
        print(f"{member.name}: {truth['label']} acc {truth['acc']:.3f} x1 {truth['asr_x1']:.3f} x9 {x9} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
