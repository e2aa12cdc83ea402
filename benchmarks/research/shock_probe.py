"""A research probe of the early ACC shock (docs/research/dhbe-log.md, tenth round): the default purification of one
case, measured every 5 epochs (and after epochs 1 and 2) four ways: the output model (S's moving
average), the same with its batch-norm statistics re-estimated on 20 batches of G's samples (SWA's
update_bn, data-free), S itself, and S re-estimated the same way. Test ACC / ASR x1 / x9 are the
experimenter's, for reading only.

    python -m benchmarks.research.shock_probe [--case NAME] [--epochs N] [--set FIELD=VALUE ...] [--tiny]

The re-estimation draws latent batches from the global random stream, so the run's later draws
differ from an unprobed run of the same recipe (that is how the tenth round saw the spread of one
recipe over random streams). Prints one JSON line per measured epoch."""
from __future__ import annotations

import argparse
import copy
import json

import torch

from benchmarks.default_cases import by_name, plant
from defense.dhbe import DHBETrainer, recipe_config, scanned_trainer, smoke_sized
from defense.scenario import model_file_scenario
from defense.cli import ArgumentParser


def reestimated(trainer: DHBETrainer, model: torch.nn.Module, batches: int) -> torch.nn.Module:
    """A copy of `model` whose batch-norm running statistics are the average over G's samples."""
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        trainer.sample_generator.eval()
        for _ in range(batches):
            model(trainer.synthesise(trainer.latent(trainer.config.latent_dim)))
        trainer.sample_generator.train()
    return model.eval()


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="badnets2-random-central")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from defense.cli import field_pairs

    case = by_name(args.case)
    if case is None:
        parser.error(f"unknown case {args.case!r}")
    scenario = model_file_scenario(plant(case, tiny=args.tiny))
    recipe = recipe_config("default", field_pairs(args.set, "--set"))
    recipe = smoke_sized(recipe).replace(epochs=2) if args.tiny else recipe.replace(epochs=args.epochs)
    trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe)
    figures = lambda model: {k: scenario.evaluate(model).get(k) for k in ("acc", "asr_x1", "asr_x9")}
    batches = 2 if args.tiny else 20
    while trainer.epoch < recipe.dhbe.epochs and trainer.stop_reason is None:
        trainer.run_epoch()
        if trainer.epoch % 5 and trainer.epoch not in (1, 2):
            continue
        output = trainer.output_model().eval()
        print(json.dumps({"epoch": trainer.epoch, "output": figures(output),
                          "output_bn_reestimated": figures(reestimated(trainer, output, batches)),
                          "student": figures(copy.deepcopy(trainer.student).eval()),
                          "student_bn_reestimated": figures(reestimated(trainer, trainer.student, batches))}), flush=True)


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.research.shock_probe")   # a bad --set value: one line, exit 2
