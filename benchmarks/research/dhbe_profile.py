"""Where DHBE's time goes: torch.profiler over the project's loop (CPU recipe, small CNN, 16x16),
split by phase (student steps, G step, Gp step) and by operator.

    python -m benchmarks.research.dhbe_profile [--iterations N] [--out STEM] [--tiny]

Writes STEM.md (phase shares and the top operators by self CPU time; --out STEM, default
runs/bench/dhbe_profile; the committed table: --out benchmarks/results/dhbe_profile)."""
from __future__ import annotations

import os
import platform

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from defense.dhbe import DHBETrainer, cpu_recipe
from defense.models import build_model
from defense.spec import InputSpec
from benchmarks.tables import add_out_argument, write_output
from defense.cli import ArgumentParser

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))
PHASES = ("student steps", "G step", "Gp step")


def profile_loop(iterations: int, batch_size: int, channels_last: bool = False):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = cpu_recipe().with_overrides({"perturbations.warmup_steps": 0}).replace(batch_size=batch_size)
    trainer = DHBETrainer(build_model("small-cnn", SPEC).eval(), SPEC, config)
    trainer.student.train()

    def iteration() -> None:
        with record_function("student steps"):
            for _ in range(config.dhbe.student_steps):
                trainer.student_step()
        with record_function("G step"):
            trainer.generator_step()
        with record_function("Gp step"):
            trainer.trigger_step()

    iteration()  # warm-up outside the trace
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            iteration()
    return prof


def report(prof, iterations: int, batch_size: int) -> str:
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    total = sum(phases.values()) or 1.0
    lines = [f"# Where DHBE's time goes (torch.profiler, {iterations} iterations, batch {batch_size}, "
             f"small CNN 16x16, {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.machine()})", "",
             "| phase | ms per iteration | share |", "|---|---|---|"]
    for name in PHASES:
        lines.append(f"| {name} | {phases.get(name, 0) / 1000 / iterations:.1f} | {100 * phases.get(name, 0) / total:.0f}% |")
    operators = sorted((e for e in events if e.key not in PHASES and not e.key.startswith("ProfilerStep")),
                       key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    self_total = sum(e.self_cpu_time_total for e in events if e.key not in PHASES) or 1.0
    lines += ["", "| operator (top 15 by self CPU time) | calls per iteration | self ms per iteration | share |",
              "|---|---|---|---|"]
    for e in operators:
        lines.append(f"| `{e.key}` | {e.count / iterations:.0f} | {e.self_cpu_time_total / 1000 / iterations:.2f} | "
                     f"{100 * e.self_cpu_time_total / self_total:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    add_out_argument(parser, "dhbe_profile", (".md",))
    parser.add_argument("--tiny", action="store_true", help="2 iterations of batch 16, printed, not written")
    args = parser.parse_args()
    iterations, batch = (2, 16) if args.tiny else (args.iterations, args.batch_size)
    text = report(profile_loop(iterations, batch), iterations, batch)
    print(text)
    if not args.tiny:
        write_output(args, ".md", text)


if __name__ == "__main__":
    main()
