"""Iterations per second of DHBE: (a) the official loop's structure re-implemented step for step
(every forward tracked by autograd and detached afterwards, the teacher's parameters left
trainable, NCHW memory layout, as in DHBE_train.py) against the project's loop (`DHBETrainer`),
(b) with its exact-maths levers only (channels-last, no parameter gradients where they are thrown
away) and (c) with the sample pool as well (the student steps draw G's samples and T's logits from
a pool the G and Gp steps fill: no G or T forward per student step; this changes the maths, and
its quality is measured in benchmarks/results/dhbe_table_cpu_pool.md). Same model, batch, seed, config.

    python -m benchmarks.dhbe_throughput [--iterations N] [--sample-pool N] [--out STEM] [--tiny] [--bf16]

Each side runs in its own process (peak RSS per side), every side once per round, 5 rounds. Writes
STEM.json (--out STEM, default runs/bench/dhbe_throughput; the committed one: --out
benchmarks/results/dhbe_throughput): official_it_per_s, project_it_per_s and speedup (median of
the per-round ratios) of (c), and under `exact_maths` those of (b) with the first iteration's
student losses of (a) and (b) (equal to float precision: NHWC convolutions sum in another order).
`--bf16` runs (b) under CPU bfloat16 autocast (a lever that changes the maths; written to
STEM_bf16.json, never over the main result)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from defense.dhbe import DHBEConfig, DHBETrainer, Recipe
from defense.dhbe.extensions import SamplePoolConfig
from defense.dhbe.losses import total_variation_l2
from defense.fileio import atomic_write_json
from defense.generators import paste_patches
from defense.models import build_model
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.spec import InputSpec
from defense.cli import ArgumentParser

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))


def official_iteration(t: DHBETrainer) -> list[float]:
    """One iteration with the official code's structure and bookkeeping."""
    cfg = t.config
    losses = []
    for _ in range(cfg.student_steps):
        z = torch.randn(cfg.batch_size, cfg.latent_dim, device=t.device)
        fake = t.sample_generator(z).detach()
        z2 = torch.randn(cfg.batch_size, cfg.trigger_latent_dim, device=t.device)
        pert = t.trigger_generator(z2)
        pixels = t.spec.denormalise(fake)
        patched = paste_patches(pixels, pert, False, 1, t.rng).detach()
        t.opt_student.zero_grad()
        t_logit = t.teacher(pixels)
        s_logit = t.student(pixels)
        s_logit_pert = t.student(patched)
        loss = F.l1_loss(s_logit, t_logit.detach()) + cfg.lam * F.l1_loss(s_logit_pert, s_logit.detach())
        loss.backward()
        t.opt_student.step()
        losses.append(loss.item())
    z = torch.randn(cfg.batch_size, cfg.latent_dim, device=t.device)
    t.opt_generator.zero_grad()
    fake = t.sample_generator(z)
    pixels = t.spec.denormalise(fake)
    loss_g = -F.l1_loss(t.student(pixels), t.teacher(pixels)) + cfg.image_prior_weight * total_variation_l2(fake)
    loss_g.backward()
    t.opt_generator.step()
    z = torch.randn(cfg.batch_size, cfg.latent_dim, device=t.device)
    fake = t.sample_generator(z).detach()
    pixels = t.spec.denormalise(fake)
    t.opt_trigger.zero_grad()
    patched = paste_patches(pixels, t.trigger_generator(torch.randn(cfg.batch_size, cfg.trigger_latent_dim, device=t.device)),
                            False, 1, t.rng)
    loss_p = -F.l1_loss(t.student(pixels), t.student(patched))
    loss_p.backward()
    t.opt_trigger.step()
    return losses


def project_iteration(t: DHBETrainer) -> list[float]:
    t.student.train()
    losses = [float(t.student_step()[0]) for _ in range(t.config.student_steps)]
    t.generator_step()
    t.trigger_step()
    return losses


SIDES = {  # side -> what runs on it
    "official": "the official loop's structure (NCHW, every forward tracked by autograd)",
    "project": "the project's loop, exact-maths levers: channels-last, no parameter gradients thrown away",
    "pooled": "the project's loop with the exact-maths levers and the sample pool (changes the maths)",
}


def measure(side: str, iterations: int, config: DHBEConfig, pool: int, model: str, bf16: bool = False) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher = build_model(model, SPEC).eval()
    recipe = Recipe(config)
    if side == "official":  # the official code's memory layout (NCHW)
        recipe = recipe.replace(channels_last=False)
    elif side == "pooled":
        recipe = recipe.with_extension(SamplePoolConfig(pool))
    trainer = DHBETrainer(teacher, SPEC, recipe)
    trainer.student.train()
    if side == "official":  # DHBE_train.py never freezes the teacher: its forwards build graphs too
        trainer.teacher.requires_grad_(True)
    step = official_iteration if side == "official" else project_iteration
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and side != "official"
                else contextlib.nullcontext())
    with autocast:
        first = step(trainer)  # warm-up, and the losses to compare
        started = time.perf_counter()
        for _ in range(iterations):
            step(trainer)
        seconds = time.perf_counter() - started
    return {"it_per_s": iterations / seconds, "first_losses": first,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the sides, each side once per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--sample-pool", type=int, default=2560, help="the pooled side's pool (samples)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="the project's side under bfloat16 autocast (writes STEM_bf16.json)")
    add_out_argument(parser, "dhbe_throughput", (".json",))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The official structure: per-batch placement, no BN prior; generators sized for the CPU.
    config = replace(DHBEConfig(), batch_size=16 if args.tiny else args.batch_size, generator_width=16,
                     trigger_width=16, latent_dim=64, trigger_latent_dim=64, patch_size=3)
    pool = 64 if args.tiny else args.sample_pool
    iterations = 2 if args.tiny else args.iterations
    if args.side:
        print(json.dumps(measure(args.side, iterations, config, pool, args.model, args.bf16)))
        return
    # This machine's speed drifts by +-15% from minute to minute: each round runs every side once
    # (in a rotated order), and a speed-up is the median of the per-round ratios.
    sides = ["official", "project"] if args.bf16 else list(SIDES)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_index in range(1 if args.tiny else args.repeats):
        for side in sides[round_index % len(sides):] + sides[:round_index % len(sides)]:
            done = subprocess.run([sys.executable, "-m", "benchmarks.dhbe_throughput", "--side", side,
                                   "--iterations", str(iterations), "--batch-size", str(config.batch_size),
                                   "--model", args.model, "--sample-pool", str(pool),
                                   *(["--bf16"] if args.bf16 else [])],
                                  capture_output=True, text=True, check=True)
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def speed(side: str) -> dict:
        ratios = [p["it_per_s"] / o["it_per_s"] for o, p in zip(runs["official"], runs[side])]
        return {"it_per_s": round(statistics.median(r["it_per_s"] for r in runs[side]), 3),
                "speedup": round(statistics.median(ratios), 3), "speedup_per_round": [round(r, 3) for r in ratios]}

    official_losses, project_losses = runs["official"][0]["first_losses"], runs["project"][0]["first_losses"]
    exact = {**speed("project"), "levers": SIDES["project"],
             "first_iteration_student_losses": {"official": official_losses, "project": project_losses},
             # NHWC convolutions round differently: equal to float precision, not bit for bit
             "max_relative_loss_difference": relative_difference(official_losses, project_losses)}
    shipped = speed(sides[-1])
    result = {
        "official_it_per_s": round(statistics.median(r["it_per_s"] for r in runs["official"]), 3),
        "project_it_per_s": shipped["it_per_s"],
        "speedup": shipped["speedup"],
        "speedup_per_round": shipped["speedup_per_round"],
        "project_side": SIDES[sides[-1]] + (" under bfloat16 autocast" if args.bf16 else ""),
        "exact_maths": exact,
        "peak_rss_mb": {side: round(max(r["peak_rss_mb"] for r in found), 1) for side, found in runs.items()},
        "config": {"bf16_autocast": args.bf16, "batch_size": config.batch_size, "iterations": iterations,
                   "rounds": len(runs["official"]), "model": args.model, "student_steps": config.student_steps,
                   "sample_pool": pool if "pooled" in sides else 0},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(json.dumps(result, indent=2))
    if not args.tiny:
        out = out_file(out_stem(args), "_bf16.json" if args.bf16 else ".json")
        atomic_write_json(out, result)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
