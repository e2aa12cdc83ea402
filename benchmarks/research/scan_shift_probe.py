"""A research probe of the scanner (docs/scan.md, stop 43, H6): does a class's inverted trigger still
work when it is stamped somewhere else?

A backdoor trained with a trigger at random places (or amplified by many copies) is a shortcut that
works wherever it is stamped; the smallest mask of a naturally easy class completes a digit's strokes
where they are. Per member of the population's calibration part and per class: the scan's own
measurements on the final model (G fitted with the scan's seed, the same pool, Neural Cleanse for
every class at once), then the class's mask and pattern moved by random cyclic shifts (8 by default),
and the share of the pool's samples the moved trigger sends to the class. Data-free: the pool is G's.

    python -m benchmarks.research.scan_shift_probe [--split calibration|held-out-2] [--out FILE.jsonl] [--tiny]

One JSON line per member: its label (the experimenter's, for the ROC only), the per-class depth and
the per-class hit rate in place and moved."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from benchmarks.scan_population import CACHE, SPLITS, label, model_files, plant, population, tiny_population
from defense.cli import ArgumentParser, positive_int, writable_destination
from defense.fileio import atomic_path
from defense.modelio import load_model
from defense.scan import ScanConfig
from defense.scan.core import depth
from defense.scan.inversion import ScanSamples, fit_sample_generator, invert_masks


def moved_hit_rates(model, pool: ScanSamples, masks: torch.Tensor, patterns: torch.Tensor, shifts: int,
                    generator: torch.Generator) -> tuple[list[float], list[float]]:
    """Per class: the share of the pool sent to it by its trigger in place, and moved by `shifts` random
    cyclic shifts (each the same for the whole pool; dy and dx both drawn below the height: the inputs
    measured here are square)."""
    images = pool.images.flatten(0, 1)
    height = images.shape[-2]
    in_place, moved = [], []
    with torch.no_grad():
        for k in range(len(masks)):
            mask, pattern = masks[k][None], patterns[k][None]
            in_place.append(float((model((1 - mask) * images + mask * pattern).argmax(1) == k).float().mean()))
            hits = 0.0
            for _ in range(shifts):
                dy, dx = (int(v) for v in torch.randint(0, height, (2,), generator=generator))
                m, p = torch.roll(mask, (dy, dx), (-2, -1)), torch.roll(pattern, (dy, dx), (-2, -1))
                hits += float((model((1 - m) * images + m * p).argmax(1) == k).float().mean())
            moved.append(hits / shifts)
    return in_place, moved


def measure(folder: Path, config: ScanConfig, shifts: int) -> dict:
    final_path, _ = model_files(folder)
    final = load_model(final_path)
    model, spec = final.model.eval(), final.spec
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)   # the scan's own draws: the same G, pool and masks as its cache
        generator = fit_sample_generator(model, spec, config.generator_steps, config.generator_batch,
                                         config.latent_dim, config.generator_width, config.generator_lr,
                                         config.image_prior_weight)
        pool = ScanSamples.draw(generator, spec, config.pool_batches, config.batch_size)
        found = invert_masks(model, pool, spec.num_classes, config.mask_steps, config.mask_lr, config.mask_cost,
                             config.mask_success, config.max_images)
    in_place, moved = moved_hit_rates(model, pool, found.masks, found.patterns, shifts,
                                      torch.Generator().manual_seed(config.seed))
    return {"depth": list(depth(found.areas.tolist())), "area": found.areas.tolist(), "hit_in_place": in_place,
            "hit_moved": moved}


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--split", choices=tuple(SPLITS), default="calibration",
                        help="calibration (rules chosen there) or held-out-2 (run once, stop 43)")
    parser.add_argument("--shifts", type=positive_int, default=8, help="random places per class's trigger")
    parser.add_argument("--out", default="runs/bench/scan_shift_probe.jsonl")
    parser.add_argument("--tiny", action="store_true", help="two seconds-long members (CI)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out_path = writable_destination(args.out)
    with tempfile.TemporaryDirectory(prefix="scan-shift-") as scratch:
        if args.tiny:
            members, cache, config = tiny_population(), Path(scratch), ScanConfig().smoke_sized()
        else:
            members, cache, config = population(args.split), CACHE, ScanConfig()
        with atomic_path(out_path) as tmp, open(tmp, "w") as out:   # the whole file, or none
            for member in members:
                folder = plant(member, cache)
                truth = json.loads((folder / "truth.json").read_text())
                line = {"member": member.name, "label": label(truth), "target": truth.get("target"),
                        "attack_kind": member.attack_kind, **measure(folder, config, args.shifts)}
                out.write(json.dumps(line) + "\n")
                top = max(range(len(line["depth"])), key=lambda k: line["depth"][k])
                print(f"{member.name}: {line['label']} top class {top} depth {line['depth'][top]:.2f} "
                      f"moved hit {line['hit_moved'][top]:.2f}", flush=True)

if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.research.scan_shift_probe")
