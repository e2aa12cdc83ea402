"""One DHBE experiment: a backdoored teacher, a config, per-epoch ACC/ASR, appended as a JSON line
to benchmarks/results/dhbe_experiments.jsonl. Usage:

    python -m benchmarks.dhbe_probe --attack badnets --seed 0 --set lam=0.1 epochs=20 ...
    python -m benchmarks.dhbe_probe --model runs/main/final.json --switch 15:lam=0 ...

`--model` probes a model file (e.g. the federated run's global model, measured with the trigger and
target of the experiment record it carries) instead of a centrally poisoned teacher. `--switch EPOCH:FIELD=VALUE` changes a
config field after that epoch (an ablation of one term mid-run).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from defense.scenario import backdoored_scenario, model_file_scenario
from defense.cli import ArgumentParser, field_pairs, run_main
from defense.dhbe import DHBEConfig, coerce_fields, purify
from defense.dhbe.cli import add_recipe_arguments, recipe_from_args

RESULTS = Path("benchmarks/results/dhbe_experiments.jsonl")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser()
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--trigger-size", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_recipe_arguments(parser)
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="probe this model file instead of a centrally poisoned teacher")
    parser.add_argument("--bf16", action="store_true", help="run DHBE under CPU bfloat16 autocast")
    parser.add_argument("--switch", nargs="*", default=[], metavar="EPOCH:FIELD=VALUE",
                        help="change an official DHBE field (e.g. lam) after that epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        scenario = model_file_scenario(args.model)
    else:
        scenario = backdoored_scenario(args.attack, args.image_size, args.trigger_size, seed=args.seed)
    switches: dict[int, dict] = {}
    for item in args.switch:
        epoch, pair = item.split(":", 1)
        switches.setdefault(int(epoch), {}).update(coerce_fields(DHBEConfig, field_pairs([pair], "--switch")))
    config = recipe_from_args(args, {"seed": args.seed})
    stamp = config.get("stamped_patches")
    replaces = stamp is not None and stamp.replaces
    before = scenario.evaluate(scenario.teacher)
    print("teacher", json.dumps(before))
    start = time.perf_counter()
    epochs = []
    blend_evidence: dict = {}

    def trigger_probe(trainer) -> float:
        """Research diagnostic (uses test data and the target, so never part of the defence): how
        often Gp's current patches, pasted at the true trigger's corner of non-target test images,
        make the *teacher* answer the target class, i.e. whether Gp has found the backdoor."""
        import torch

        test = scenario.bundle.test
        images = test.images[test.labels != scenario.target][:256]
        with torch.no_grad():
            trainer.trigger_generator.eval()
            patches = trainer.trigger_generator(torch.randn(len(images), config.dhbe.trigger_latent_dim))
            trainer.trigger_generator.train()
            k = patches.shape[-1]
            values = (patches + 1) / 2 if replaces else patches
            patched = images.clone()
            if replaces:
                patched[..., -k:, -k:] = values
            else:
                patched[..., -k:, -k:] += values
            return float((scenario.teacher(patched).argmax(1) == scenario.target).float().mean())

    def log(record, trainer):
        record.evaluation["gp_finds_trigger"] = trigger_probe(trainer)
        ev = record.evaluation
        print(f"ep {record.epoch:3d} acc {ev['acc']:.3f} asr {ev['asr_x1']:.3f}/{ev.get('asr_x4') or 0:.3f}/"
              f"{ev.get('asr_x9') or 0:.3f} agree {record.synthetic_agreement:.2f} sens {record.trigger_sensitivity:.3f} "
              f"flipS {record.trigger_flip_rate:.2f} flipT {record.teacher_flip_rate:.2f} Ld {record.loss_distill:.4f} "
              f"Lr {record.loss_regulariser:.4f} GpT {ev['gp_finds_trigger']:.2f} {time.perf_counter() - start:.0f}s", flush=True)
        epochs.append(record.as_row())
        search = trainer.extension("blend_search")
        if search is not None and search.evidence() and not blend_evidence:
            blend_evidence.update(search.evidence())
            print("blend search:", json.dumps(blend_evidence), flush=True)
        if record.epoch in switches:
            trainer.config = replace(trainer.config, **switches[record.epoch])

    def evaluate(model):  # the measuring stick stays in float32
        with torch.autocast("cpu", enabled=False):
            return scenario.evaluate(model)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        _, history = purify(scenario.teacher, scenario.bundle.spec, config, callbacks=(log,), evaluator=evaluate)
    wall = time.perf_counter() - start
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps({"tag": args.tag, "scenario": scenario.name, "config": config.to_dict(),
                                 **({"switch": args.switch} if args.switch else {}),
                                 **({"autocast": "bf16"} if args.bf16 else {}),
                                 **({"blend_search": blend_evidence} if blend_evidence else {}),
                                 "teacher": before, "final": history[-1].evaluation, "wall_s": wall,
                                 "epochs": epochs}) + "\n")
    print(f"wall {wall:.1f}s final {json.dumps(history[-1].evaluation)}")
    return 0


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.dhbe_probe")
