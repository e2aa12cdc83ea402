"""Fifteenth round (docs/dhbe.md): does moving the purified student back towards T in weight space
give back the ACC the game cost without giving back the backdoor, and can a data-free signal say how
far? `python -m benchmarks.interpolation_probe --only CASE ... --out FILE` then `--report FILE`.

S starts as a copy of T, so the two share a basin and M(a) = (1 - a) S + a T (parameters and
batch-norm statistics) is a path from the purified model to the input. For each a the probe records
what a defender can compute (agreement with T on G's samples; how often the triggers the run
inverted against T, its blend and mask patterns and its patch bank, send M(a)'s samples to the
suspect class; the suspect's blend pattern re-inverted on M(a)) and, for the log only, the
experimenter's test ACC and ASR. Nothing here is read by the defence.

`--recalibrate` re-estimates every point's batch-norm statistics on G's samples; `--refit-check`
measures S with its statistics re-estimated on G's samples and on the clean training images (what a
user's AdaBN would do), and T likewise."""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.default_cases import DEV, by_name
from benchmarks.default_table import case_model
from defense.blend_search import invert_class_patterns
from defense.dhbe import DHBETrainer, recipe_config, scanned_trainer, smoke_sized, train_epochs
from defense.generators import blend_patterns, paste_patches
from defense.mask_search import apply_mask_trigger
from defense.metrics import statistics_refitted
from defense.modelio import load_model
from defense.scenario import model_file_scenario

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def interpolate(student: torch.nn.Module, teacher: torch.nn.Module, a: float, samples=None) -> torch.nn.Module:
    """(1 - a) S + a T on every floating tensor of the state (parameters and batch-norm statistics);
    with `samples` (images), the batch-norm statistics are then re-estimated on them (as REPAIR /
    `reset BN` do after interpolating weights)."""
    model = copy.deepcopy(student)
    s, t = student.state_dict(), teacher.state_dict()
    model.load_state_dict({k: (1 - a) * v + a * t[k] if v.is_floating_point() else v for k, v in s.items()})
    return statistics_refitted(model, samples) if samples is not None else model.eval()


@torch.no_grad()
def share_to(model, x, triggered, k: int) -> float:
    """Of the samples `model` does not already answer k on, the share the trigger sends to k."""
    clean, answer = model(x).argmax(1), model(triggered).argmax(1)
    keep = clean != k
    return float(((answer == k) & keep).sum() / keep.sum().clamp(min=1))


def signals(trainer: DHBETrainer, model, suspects: list[int], x: torch.Tensor) -> dict:
    """Agreement with T on `x`, and per suspect k how often the run's inverted triggers (k's blend pattern
    at ratios 0.1 and 0.2, k's Neural Cleanse trigger, the trigger bank's patches) send `model`'s samples to k."""
    blend, mask, bank = (trainer.extension(n) for n in ("blend_search", "mask_search", "trigger_bank"))
    teacher_answer = trainer.teacher(x).argmax(1)
    out = {"agree": float((model(x).argmax(1) == teacher_answer).float().mean())}
    g = torch.Generator().manual_seed(5)
    picks = torch.randint(0, len(bank.bank), (len(x),), generator=g)
    patched = paste_patches(x, bank.bank[picks].to(x), True, 1, g, True)
    for k in suspects:
        pattern = blend.found.patterns[blend.found.classes.index(k)]
        for ratio in (0.1, 0.2):
            out[f"blend{ratio}_{k}"] = share_to(model, x, blend_patterns(x, pattern.expand_as(x), ratio), k)
        found = next((t for t in mask.found if t.target == k), None)
        if found is not None:
            out[f"mask_{k}"] = share_to(model, x, apply_mask_trigger(x, found.mask, found.pattern), k)
        out[f"bank_{k}"] = share_to(model, x, patched, k)
    return out


def reinverted_loss(trainer: DHBETrainer, model, k: int) -> float:
    """The suspect's blend pattern inverted afresh on `model` (the search's own settings): its loss."""
    blend = trainer.extension("blend_search")
    cfg = blend.config
    samples = lambda: blend.search_batch(trainer)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        return invert_class_patterns(model, samples, [k], cfg.ratio, cfg.steps, cfg.lr).losses[0]


def probe_case(name: str, keep: str | None = None, recalibrate: bool = False, alphas=ALPHAS,
               refit_check: bool = False, tiny: bool = False, overrides: dict | None = None) -> dict:
    case = by_name(name)
    model_file, earlier = case_model(case, tiny=tiny, history=True)
    scenario = model_file_scenario(model_file)
    recipe = recipe_config("default", overrides)
    if tiny:   # the game runs blind on every class, so that it runs and the path is walked
        recipe = smoke_sized(recipe).with_overrides({"verdict.hand_back_clean": False})
    torch.manual_seed(0)
    started = time.perf_counter()
    trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe,
                              earlier=[load_model(p).model.eval() for p in earlier])
    train_epochs(trainer)
    wall = time.perf_counter() - started
    suspects = list(trainer.extension("blend_search").suspects)
    row = {"case": name, "target": case.attack.target if case.poisoned else None, "suspects": suspects,
           "recalibrated": recalibrate, "overrides": overrides or {},
           "wall_s": round(wall, 1), "points": []}
    if not suspects or trainer.stop_reason is not None:
        return row
    student = trainer.output_model()
    blend = trainer.extension("blend_search")
    blend.search_generator.eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = trainer.spec.denormalise(blend.search_generator(torch.randn(1024, trainer.config.latent_dim, generator=g)))
    if keep:
        torch.save({"student": student.state_dict(), "teacher": trainer.teacher.state_dict()}, f"{keep}/{name}.pt")
    recalibration = None
    if recalibrate:
        with torch.no_grad():
            recalibration = torch.cat([trainer.spec.denormalise(blend.search_generator(
                torch.randn(256, trainer.config.latent_dim, generator=g))) for _ in range(8)])
    if refit_check:
        real_batches = scenario.bundle.train.images
        synthetic = recalibration if recalibration is not None else torch.cat([trainer.spec.denormalise(
            blend.search_generator(torch.randn(256, trainer.config.latent_dim, generator=g))) for _ in range(8)])
        for label, model in (("handed back", student), ("statistics on G's samples", interpolate(student, trainer.teacher, 0.0, synthetic)),
                             ("statistics on clean training images", interpolate(student, trainer.teacher, 0.0, real_batches)),
                             ("T, statistics on clean training images", interpolate(student, trainer.teacher, 1.0, real_batches))):
            test = scenario.evaluate(model)
            check = {"model": label, **{k: round(100 * v, 2) for k, v in test.items() if isinstance(v, float)},
                     **{k: round(v, 4) for k, v in signals(trainer, model, suspects, x).items()}}
            row.setdefault("refit_check", []).append(check)
            print(json.dumps({"case": name, **check}), flush=True)
    for a in alphas:
        model = interpolate(student, trainer.teacher, a, recalibration)
        test = scenario.evaluate(model)
        point = {"a": a,
                 **{k: round(100 * v, 2) for k, v in test.items() if isinstance(v, float)},
                 **{k: round(v, 4) for k, v in signals(trainer, model, suspects, x).items()},
                 **{f"reinv_{k}": round(reinverted_loss(trainer, model, k), 4) for k in suspects}}
        row["points"].append(point)
        print(json.dumps({"case": name, **point}), flush=True)
    return row


def report(path: Path) -> None:
    for line in path.read_text().splitlines():
        row = json.loads(line)
        print(f"\n{row['case']} target {row['target']} suspects {row['suspects']} ({row['wall_s']} s)")
        if not row["points"]:
            continue
        keys = [k for k in row["points"][0] if k != "a"]
        print("a    " + " ".join(f"{k[:11]:>11}" for k in keys))
        for p in row["points"]:
            print(f"{p['a']:<4} " + " ".join(f"{p.get(k, float('nan')):>11.3f}" for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--out", default=None)
    parser.add_argument("--report", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="the default's overrides")
    parser.add_argument("--tiny", action="store_true", help="one case at smoke size, two points and the refit check (CI)")
    parser.add_argument("--keep", default=None, help="folder: S's and T's states (this machine only, not results)")
    parser.add_argument("--recalibrate", action="store_true", help="re-estimate batch-norm statistics on G's samples")
    parser.add_argument("--alphas", nargs="*", type=float, default=list(ALPHAS), help="points of the path (none: skip it)")
    parser.add_argument("--refit-check", action="store_true",
                        help="also S with its batch-norm statistics re-estimated on G's samples and on clean training "
                             "images (a user's AdaBN; the experimenter's check)")
    args = parser.parse_args()
    if args.report:
        report(Path(args.report))
        return
    torch.set_num_threads(2)
    from defense.cli import field_pairs

    overrides = field_pairs(args.set, "--set")
    unknown = [name for name in args.only if by_name(name) is None]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)} (benchmarks/default_cases.py names them)")
    if args.tiny:
        probe_case(DEV[2].name, alphas=(0.0, 1.0), refit_check=True, recalibrate=True, tiny=True)
        return
    for name in args.only:
        row = probe_case(name, args.keep, args.recalibrate, args.alphas, args.refit_check, overrides=overrides)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.interpolation_probe")   # a bad --set value: one line, exit 2
