"""Iterations per second of DHBE: (a) the official loop's structure re-implemented step for step
(every forward tracked by autograd and detached afterwards, the teacher's parameters left
trainable, NCHW memory layout, as in DHBE_train.py) against (b) the project's loop
(`DHBETrainer`: channels-last, no parameter gradients where they are thrown away), on the same
model, batch, seed and config.

    python -m benchmarks.dhbe_throughput [--iterations N] [--tiny] [--bf16]

Each side runs in its own process (peak RSS per side), alternating, 5 pairs. Writes
benchmarks/results/dhbe_throughput.json with official_it_per_s, project_it_per_s, speedup (median
of the pairs), peak_rss_mb and the first iteration's losses of both (equal to float precision:
NHWC convolutions sum in another order). `--bf16` runs the project's side under CPU bfloat16 autocast
(a lever that changes the maths; written to dhbe_throughput_bf16.json, never over the main result)."""
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
from pathlib import Path

import torch
import torch.nn.functional as F

from defense.dhbe import DHBEConfig, DHBETrainer, total_variation_l2
from defense.fileio import atomic_write_json
from defense.generators import paste_patches
from defense.models import build_model
from defense.spec import InputSpec

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))


def official_iteration(t: DHBETrainer) -> list[float]:
    """One iteration with the official code's structure and bookkeeping."""
    cfg = t.config
    losses = []
    for _ in range(cfg.student_steps):
        z = torch.randn(cfg.batch_size, cfg.latent_dim)
        fake = t.sample_generator(z).detach()
        z2 = torch.randn(cfg.batch_size, cfg.trigger_latent_dim)
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
    z = torch.randn(cfg.batch_size, cfg.latent_dim)
    t.opt_generator.zero_grad()
    fake = t.sample_generator(z)
    pixels = t.spec.denormalise(fake)
    loss_g = -F.l1_loss(t.student(pixels), t.teacher(pixels)) + cfg.image_prior_weight * total_variation_l2(fake)
    loss_g.backward()
    t.opt_generator.step()
    z = torch.randn(cfg.batch_size, cfg.latent_dim)
    fake = t.sample_generator(z).detach()
    pixels = t.spec.denormalise(fake)
    t.opt_trigger.zero_grad()
    patched = paste_patches(pixels, t.trigger_generator(torch.randn(cfg.batch_size, cfg.trigger_latent_dim)),
                            False, 1, t.rng)
    loss_p = -F.l1_loss(t.student(pixels), t.student(patched))
    loss_p.backward()
    t.opt_trigger.step()
    return losses


def project_iteration(t: DHBETrainer) -> list[float]:
    t.set_student_mode()
    losses = [t.student_step()[0] for _ in range(t.config.student_steps)]
    t.generator_step()
    t.trigger_step()
    return losses


def measure(mode: str, iterations: int, config: DHBEConfig, model: str, bf16: bool = False) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher = build_model(model, SPEC).eval()
    if mode == "official":  # the official code's memory layout (NCHW)
        config = replace(config, channels_last=False)
    trainer = DHBETrainer(teacher, SPEC, config)
    trainer.set_student_mode()
    if mode == "official":  # DHBE_train.py never freezes the teacher: its forwards build graphs too
        trainer.teacher.requires_grad_(True)
    step = official_iteration if mode == "official" else project_iteration
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and mode == "project"
                else contextlib.nullcontext())
    with autocast:
        first = step(trainer)  # warm-up, and the losses to compare
        started = time.perf_counter()
        for _ in range(iterations):
            step(trainer)
        seconds = time.perf_counter() - started
    return {"it_per_s": iterations / seconds, "first_losses": first,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="alternating official/project pairs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="the project's side under bfloat16 autocast")
    parser.add_argument("--mode", choices=("official", "project"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The official structure: per-batch placement, no BN prior; generators sized for the CPU.
    config = replace(DHBEConfig(), batch_size=16 if args.tiny else args.batch_size, generator_width=16,
                     trigger_width=16, latent_dim=64, trigger_latent_dim=64, patch_size=3)
    iterations = 2 if args.tiny else args.iterations
    if args.mode:
        print(json.dumps(measure(args.mode, iterations, config, args.model, args.bf16)))
        return
    # This machine's speed drifts by +-15% from minute to minute: the sides alternate, and the
    # speed-up is the median of the per-pair ratios.
    runs: dict[str, list[dict]] = {"official": [], "project": []}
    for _ in range(1 if args.tiny else args.repeats):
        for mode in ("official", "project"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.dhbe_throughput", "--mode", mode,
                                   "--iterations", str(iterations), "--batch-size", str(config.batch_size),
                                   "--model", args.model, *(["--bf16"] if args.bf16 else [])],
                                  capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    sides = {mode: {"it_per_s": statistics.median(r["it_per_s"] for r in found),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in found), "first_losses": found[0]["first_losses"]}
             for mode, found in runs.items()}
    ratios = [p["it_per_s"] / o["it_per_s"] for o, p in zip(runs["official"], runs["project"])]
    result = {
        "official_it_per_s": round(sides["official"]["it_per_s"], 3),
        "project_it_per_s": round(sides["project"]["it_per_s"], 3),
        "speedup": round(statistics.median(ratios), 3),
        "speedup_per_pair": [round(r, 3) for r in ratios],
        "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in sides.items()},
        "first_iteration_student_losses": {k: v["first_losses"] for k, v in sides.items()},
        # NHWC convolutions round differently: equal to float precision, not bit for bit
        "max_relative_loss_difference": max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(
            sides["official"]["first_losses"], sides["project"]["first_losses"])),
        "config": {"bf16_autocast": args.bf16, "batch_size": config.batch_size, "iterations": iterations, "repeats": len(ratios), "model": args.model,
                   "student_steps": config.student_steps},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(json.dumps(result, indent=2))
    if not args.tiny:
        name = "dhbe_throughput_bf16.json" if args.bf16 else "dhbe_throughput.json"
        atomic_write_json(Path("benchmarks/results") / name, result)


if __name__ == "__main__":
    main()
