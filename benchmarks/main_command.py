"""The README's main command, end to end, on several seeds, against the project's bar:
`python -m benchmarks.main_command [--seeds 0 1 2] [--out STEM] [--tiny]`.

Each seed runs `python -m federated.simulate --malicious 2 --seed S` as a user would (a fresh process:
federated training, then the default purification on Ray Train), timed from outside; the experimenter
then measures the final and the purified global model with the run's own experiment record (ACC, ASR
x1/x4/x9, RA). The bar: ASR x1 <= 5%, x9 <= 10%, ACC drop <= 2 points. Writes a Markdown table,
STEM.md (--out STEM, default runs/bench/main_command; the committed one: --out benchmarks/results/main_command)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from defense.fileio import atomic_write_text
from defense.report import markdown_table
from defense.scenario import model_file_scenario
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser
from defense.metrics import bar_outcome

TINY = ["--rounds", "2", "--purify-set", "epochs=1", "iters_per_epoch=1", "batch_size=16",
        "perturbations.warmup_steps=2", "perturbations.refresh_steps=2", "scan.generator_steps=2",
        "scan.mask_steps=2", "scan.pool_batches=1", "scan.batch_size=4"]


def run_seed(seed: int, folder: Path, tiny: bool) -> dict:
    command = [sys.executable, "-m", "federated.simulate", "--malicious", "2", "--seed", str(seed),
               "--out", str(folder), "--quiet", *(TINY if tiny else [])]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    before = model_file_scenario(folder / "final.json")
    after = model_file_scenario(folder / "purified.json")
    b, a = before.evaluate(before.teacher), after.evaluate(after.teacher)
    verdict = next((line for line in (folder / "summary.md").read_text().splitlines() if line.startswith("scan:")), "")
    drop = b["acc"] - a["acc"]
    met, _ = bar_outcome(b, a)
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
    return {"row": [seed, f"{wall:.0f}", f"{pct(b['acc'])} -> {pct(a['acc'])}", f"{100 * drop:.1f}",
                    f"{pct(b['asr_x1'])} -> {pct(a['asr_x1'])}", pct(a["asr_x4"]), f"{pct(b['asr_x9'])} -> {pct(a['asr_x9'])}",
                    pct(a["ra"]), "yes" if met else "**no**"],
            "verdict": verdict.split(" (`evidence")[0], "met": met, "wall": wall}


def main() -> int:
    parser = ArgumentParser(prog="python -m benchmarks.main_command", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="run seeds (default: 0 1 2)")
    add_out_argument(parser, "main_command", (".md",))
    parser.add_argument("--tiny", action="store_true", help="one seed, 2 rounds, a seconds-long purification (CI)")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.tiny else args.seeds
    results = []
    with tempfile.TemporaryDirectory(prefix="main-command-") as scratch:
        for seed in seeds:
            results.append(run_seed(seed, Path(scratch) / f"seed-{seed}", args.tiny))
            print(" | ".join(map(str, results[-1]["row"])), flush=True)
    header = ["seed", "wall s", "ACC %", "drop (points)", "ASR x1 %", "x4 %", "ASR x9 %", "RA %", "bar met"]
    lines = [f"# The main command on {len(seeds)} seed(s) (`python -m benchmarks.main_command --seeds "
             f"{' '.join(map(str, seeds))}`{', --tiny' if args.tiny else ''})", "",
             "Each: `python -m federated.simulate --malicious 2 --seed S` in a fresh process (training, then the "
             "default purification on Ray Train), wall time from outside; before -> after the purification. "
             "Bar: ASR x1 <= 5%, x9 <= 10%, ACC drop <= 2 points.", "",
             *markdown_table(header, [r["row"] for r in results]), "",
             f"Bar met on {sum(r['met'] for r in results)} of {len(results)}. Scan verdicts:", "",
             *[f"- seed {seed}: {r['verdict']}" for seed, r in zip(seeds, results)]]
    if not args.tiny:
        out = out_file(out_stem(args), ".md")
        atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.tiny:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
