"""A research probe of the erasing game (docs/research/dhbe-log.md, twenty-second round): the default
purification of cases or run folders, in-process, with recipe overrides, measured by the experimenter
(ACC drop, ASR x1/x9, and after a clean batch-norm refit) after the game, and optionally every epoch.

    python -m benchmarks.research.game_probe NAME ... [--set FIELD=VALUE ...] [--force-game] [--every-epoch]
        [--path] [--save DIR] [--g-from-scan] [--anchor MU [--fisher]] [--anchor-per-source] [--tiny]

NAME: a case of benchmarks/default_cases.py (with its earlier global models) or a federated run folder
(`python -m federated.simulate --malicious 2 --no-purify --out runs/main-s0`). Prints one JSON line per
NAME. The test-set numbers are for reading only; the game never sees them."""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.default_table import forced_report
from benchmarks.default_time import model_files_of
from defense.cli import ArgumentParser, field_pairs, positive_float, writable_destination
from defense.dhbe import DHBETrainer, recipe_config, scanned_trainer, smoke_sized, train_epochs
from defense.fileio import atomic_path
from defense.metrics import statistics_refitted
from defense.modelio import load_model
from defense.scenario import model_file_scenario


FITTED: list = []


def capture_scan_generator() -> None:
    """H7: keep the scan's fitted G (the same seed, priors and architecture as the game's G at CPU scale)."""
    import defense.scan.core as core

    fit = core.fit_sample_generator

    def fitted(*args, **kwargs):
        FITTED.append(fit(*args, **kwargs))
        return FITTED[-1]

    core.fit_sample_generator = fitted


def clean_fisher(trainer, samples: int = 256) -> list:
    """Per parameter of T: the mean squared gradient of log p_T(T's own label | x) over the scan's
    samples, normalised to mean 1 over all parameters."""
    teacher = trainer.teacher
    params = list(teacher.parameters())
    for p in params:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p) for p in params]
    images = trainer.scan_report.samples.flatten(0, 1)[:samples].to(trainer.device)
    for x in images:
        logits = teacher(x[None])
        loss = torch.log_softmax(logits, 1)[0, logits.argmax()]
        grads = torch.autograd.grad(loss, params)
        for total, g in zip(sums, grads):
            total += g.detach() ** 2
    for p in params:
        p.requires_grad_(False)
    mean = torch.cat([t.flatten() for t in sums]).mean()
    return [t / mean for t in sums]


def anchor_suspects_on_teacher(trainer) -> None:
    """H11: Eq. 8's regulariser anchored per source: Gp's patches at S(x) (the paper), the suspects'
    sources (the scan's triggers, the blend patterns) at T(x). DHBETrainer.student_step with only the
    anchor changed (single process only: no sharding, no gradient averaging)."""
    from defense.dhbe.extensions.perturbations import evenly_spread
    from defense.dhbe.losses import distillation_loss

    part = trainer.extension("perturbations")
    share, sources = part.config.perturbed_share, len(part.sources)

    def suspect_rows(n: int, device) -> torch.Tensor:
        perturbed = evenly_spread(n, share, device)
        turn = (torch.cumsum(perturbed.long(), 0) - 1) % sources
        return perturbed & (turn > 0)

    def student_step() -> torch.Tensor:
        with torch.no_grad():
            x, t_logits = trainer.student_batch()
            x_patched = trainer.perturb(x, trainer.latent(trainer.config.trigger_latent_dim), "student")
        s_logits = trainer.student(x)
        distill = distillation_loss(s_logits, t_logits)
        anchor = torch.where(suspect_rows(len(x), x.device)[:, None], t_logits, s_logits.detach())
        regulariser = torch.nn.functional.l1_loss(trainer.student(x_patched).float(), anchor.float())
        loss = distill + trainer.current_lambda() * regulariser
        trainer.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt_student.step()
        for ext in trainer.extensions:
            ext.after_student_step(trainer)
        return torch.stack([loss.detach(), distill.detach(), regulariser.detach()]).double()

    trainer.student_step = student_step


def anchor_weights_on_teacher(trainer, mu: float, fisher: bool) -> None:
    """H9: L2-SP (Li et al., ICML 2018), S's weights pulled towards T's after every student step by
    lr x `mu` (capped at all the way); H10 with `fisher`: per weight, times T's Fisher information on the
    scan's samples (EWC's weighting, data-free)."""
    step, pairs = trainer.student_step, list(zip(trainer.student.parameters(), trainer.teacher.parameters()))
    weights = clean_fisher(trainer) if fisher else [torch.ones_like(t) for _, t in pairs]

    def anchored_step():
        losses = step()
        with torch.no_grad():
            lr = trainer.opt_student.param_groups[0]["lr"]
            for (s_param, t_param), w in zip(pairs, weights):
                s_param.sub_((lr * mu * w).clamp(max=1.0) * (s_param - t_param))
        return losses

    trainer.student_step = anchored_step


def probe(name: str, variants: argparse.Namespace, overrides: dict) -> dict:
    """One purification of `name` with the probe's `variants` (the CLI's flags), measured."""
    FITTED.clear()
    tiny = variants.tiny
    final, earlier = model_files_of(name, tiny)
    scenario = model_file_scenario(final)
    before = scenario.evaluate(scenario.teacher)
    recipe = recipe_config("default", overrides)
    if tiny:
        recipe = smoke_sized(recipe)
    versions = [load_model(p).model.eval() for p in earlier]
    started = time.perf_counter()
    if variants.force_game:
        trainer = DHBETrainer(scenario.teacher, scenario.bundle.spec, recipe,
                              scan=forced_report(scenario.teacher, scenario.bundle.spec, recipe, versions))
    else:
        trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe, earlier=versions)
    if variants.g_from_scan:
        trainer.sample_generator.load_state_dict(FITTED[-1].state_dict())
    if variants.anchor_per_source:   # first: it replaces the step the weight anchor then wraps
        anchor_suspects_on_teacher(trainer)
    if variants.anchor:
        anchor_weights_on_teacher(trainer, variants.anchor, variants.fisher)
    pct = lambda v: None if v is None else round(100 * v, 1)
    trajectory = []

    def measure(model) -> dict:
        found = scenario.evaluate(model.eval())
        return {"drop": round(100 * (before["acc"] - found["acc"]), 2), "x1": pct(found.get("asr_x1")),
                "x9": pct(found.get("asr_x9"))}

    def measure_epoch(model) -> dict:   # + a data-free reading: the scan's first trigger's hit rate on the model
        report = trainer.scan_report
        found = measure(model)
        if report.triggers:
            trigger, x = report.triggers[0], report.samples.flatten(0, 1)
            with torch.no_grad():
                stamped = (1 - trigger.mask) * x + trigger.mask * trigger.pattern
                found["scan_hit"] = round(float((model(stamped).argmax(1) == trigger.target).float().mean()), 3)
        return found

    train_epochs(trainer, evaluator=measure_epoch if variants.every_epoch else None)
    wall = time.perf_counter() - started
    if variants.every_epoch:
        trajectory = [(r.epoch, r.evaluation["drop"], r.evaluation["x1"], r.evaluation["x9"],
                       round(r.synthetic_agreement, 3), round(r.trigger_flip_rate, 3), round(r.teacher_flip_rate, 3),
                       round(r.trigger_sensitivity, 3), r.evaluation.get("scan_hit"))
                      for r in trainer.history]
    output = trainer.output_model().eval()
    after, refit = measure(output), measure(statistics_refitted(output, scenario.bundle.train.images))
    evidence = trainer.evidence()
    if variants.save:
        with atomic_path(f"{variants.save}/{name.strip('/').replace('/', '_')}.pt") as tmp:
            torch.save({"output": output.state_dict(), "student": trainer.student.state_dict()}, tmp)
    path = []
    if variants.path:   # the experimenter's reading of T + a (output - T): where on the straight path ACC and ASR part
        import copy

        teacher, out = trainer.teacher.state_dict(), output.state_dict()
        for a in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9):
            mixed = copy.deepcopy(output)
            mixed.load_state_dict({k: (t + a * (out[k] - t)) if t.is_floating_point() else out[k]
                                   for k, t in teacher.items()})
            path.append((a, *measure(mixed).values()))
    return {"name": name, "suspects": list(trainer.scan_report.suspects), "epochs": trainer.epoch,
            **after, "refit_x1": refit["x1"], "refit_x9": refit["x9"], "wall_s": round(wall, 1),
            "stopped": evidence.get("stopped", ""), "guard": (evidence.get("verdict") or {}).get("guard", ""),
            "perturbations": evidence.get("perturbations"), "trajectory": trajectory, "path": path}


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="cases or run folders")
    parser.add_argument("--tiny", action="store_true", help="every variant at once on a tiny case (CI)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--force-game", action="store_true")
    parser.add_argument("--every-epoch", action="store_true")
    parser.add_argument("--path", action="store_true", help="measure T + a (output - T) for a few a")
    parser.add_argument("--save", default=None, help="a folder: the output model and S saved there (torch.save)")
    parser.add_argument("--anchor", type=positive_float, default=None, help="H9: L2-SP weight towards T's weights")
    parser.add_argument("--fisher", action="store_true", help="H10: the anchor weighted by T's Fisher information")
    parser.add_argument("--anchor-per-source", action="store_true", help="H11: suspects' sources anchored at T(x)")
    parser.add_argument("--g-from-scan", action="store_true", help="H7: the game's G starts as the scan's fitted G")
    args = parser.parse_args()
    torch.set_num_threads(2)
    overrides = field_pairs(args.set, "--set")
    if args.tiny:   # every variant at once, so none of them rots
        args.names, args.force_game, args.every_epoch, args.path = ["badnets3-corner-central"], True, True, True
        args.anchor, args.fisher, args.anchor_per_source, args.g_from_scan = 1.0, True, True, True
    if not args.names:
        parser.error("name at least one case or run folder (or --tiny)")
    if args.save:
        writable_destination(args.save, "--save")
    if args.g_from_scan:
        capture_scan_generator()
    for name in args.names:
        print(json.dumps(probe(name, args, overrides)), flush=True)


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.research.game_probe")
