"""The paper's scale, projected: ResNet-18 on 32x32 RGB, batch 256, the official DHBE settings
(`DHBEConfig()`: 5 student steps, G and Gp of width 64, latent 256, 5x5 patches), seconds per
iteration of the official loop's structure and of the project's loop (benchmarks/dhbe_throughput.py
defines both), and what the paper's 15,000 iterations would take.

    python -m benchmarks.paper_scale [--device cpu|cuda] [--iterations N] [--warmup N] [--out STEM] [--tiny]

Writes STEM.json and STEM.md (--out STEM, default runs/bench/paper_scale; the committed table: --out
benchmarks/results/paper_scale): this device's rows replace its earlier ones, the rows of another device
are kept (read from STEM.json where it exists, else from the committed benchmarks/results/paper_scale.json),
and a device never measured is marked so."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from benchmarks.dhbe_throughput import SPEC as TINY_SPEC, official_iteration, project_iteration
from defense.dhbe import DHBEConfig, DHBETrainer, Recipe
from defense.fileio import atomic_write_json, atomic_write_text
from defense.models import build_model
from defense.report import markdown_table
from defense.spec import InputSpec
from benchmarks.tables import COMMITTED, add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser

RESULTS = COMMITTED
PAPER_ITERATIONS = 15_000   # 300 epochs x 50 iterations (the official code)
SIDES = ("official", "project", "project-bf16")   # the last: the project's loop under bf16 autocast (logits fp32)
CIFAR = InputSpec(3, 32, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def seconds_per_iteration(side: str, device: str, iterations: int, warmup: int, tiny: bool) -> float:
    torch.manual_seed(0)
    spec = TINY_SPEC if tiny else CIFAR
    config = DHBEConfig(batch_size=8, generator_width=8, trigger_width=8, latent_dim=16, trigger_latent_dim=16,
                        patch_size=3) if tiny else DHBEConfig()
    teacher = build_model("small-cnn" if tiny else "resnet18", spec).eval()
    recipe = Recipe(config).replace(channels_last=side != "official", precision="bf16" if side == "project-bf16" else "fp32")
    trainer = DHBETrainer(teacher, spec, recipe, device=device)
    trainer.student.train()
    if side == "official":   # DHBE_train.py never freezes the teacher
        trainer.teacher.requires_grad_(True)
    step = official_iteration if side == "official" else project_iteration
    for _ in range(warmup):
        with trainer.precision():
            step(trainer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        with trainer.precision():
            step(trainer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / iterations


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0, help="untimed iterations first (GPU: 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI); writes nothing")
    add_out_argument(parser, "paper_scale", (".json", ".md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for side in SIDES:
        seconds = seconds_per_iteration(side, args.device, args.iterations, args.warmup, args.tiny)
        rows.append({"side": side, "device": args.device.split(":")[0], "device_name": device_name(args.device),
                     "seconds_per_iteration": round(seconds, 3), "it_per_s": round(1 / seconds, 4),
                     "projected_hours_15000_iterations": round(seconds * PAPER_ITERATIONS / 3600, 1),
                     "timed_iterations": args.iterations, "warmup_iterations": args.warmup,
                     "torch": torch.__version__, "platform": platform.platform()})
        print(json.dumps(rows[-1]), flush=True)
    if args.tiny:
        return
    out = out_stem(args)
    earlier = next((path for path in (out_file(out, ".json"), RESULTS / "paper_scale.json") if path.exists()), None)
    previous = json.loads(earlier.read_text()) if earlier is not None else []
    kept = [r for r in previous if r["device"] != rows[0]["device"]]
    table = kept + rows
    atomic_write_json(out_file(out, ".json"), table)
    lines = ["# DHBE at the paper's scale (ResNet-18, 32x32 RGB, batch 256, official settings)", "",
             "`python -m benchmarks.paper_scale --device DEVICE`: seconds per iteration (5 student steps, one G "
             "and one Gp step) of the official loop's structure and of the project's loop (exact maths; "
             f"benchmarks/dhbe_throughput.py; `project-bf16`: the same under bf16 autocast with fp32 logits), and the paper's {PAPER_ITERATIONS:,} iterations projected from them. "
             "The paper reports about 6 h on an RTX 2080 Ti.", ""]
    lines += markdown_table(["device", "loop", "s / iteration", f"{PAPER_ITERATIONS:,} iterations (h)", "timed", "torch"],
                            [[r["device_name"], r["side"], r["seconds_per_iteration"], r["projected_hours_15000_iterations"],
                              f"{r['timed_iterations']} (+{r['warmup_iterations']} warm-up)", r["torch"]] for r in table])
    if not any(r["device"] == "cuda" for r in table):
        lines += ["| GPU | official / project | not measured (no GPU lent yet) | | | |"]
    atomic_write_text(out_file(out, ".md"), "\n".join(lines) + "\n")
    print(f"wrote {out_file(out, '.md')} and .json (earlier rows from {earlier or 'nowhere'})")


if __name__ == "__main__":
    main()
