"""Compute to quality: ACC and ASR against student updates, read from the logged DHBE probes
(benchmarks/results/dhbe_experiments.jsonl; each probe logs the evaluation after every epoch).

    python -m benchmarks.research.compute_to_quality [--tags TAG ...] [--out STEM]

Default: the CPU recipe's three seeds. Writes STEM.md (--out STEM, default runs/bench/compute_to_quality;
the committed table: --out benchmarks/results/compute_to_quality; the log is read where it is) with the
mean over the chosen runs at each logged number of student updates, and the first point at which
the DHBE issue's bar (ASR x1 <= 5%, ASR x9 <= 10%, ACC drop <= 2 points) holds for every run."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from defense.fileio import atomic_write_text
from defense.metrics import bar_outcome
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser
from defense.errors import ConfigError

LOG = Path("benchmarks/results/dhbe_experiments.jsonl")
RECIPE_TAGS = ("s3-advw0-ms89-bal1-s0", "s3-advw0-ms89-bal1-s1", "s3-advw0-ms89-bal1-s2")  # the CPU recipe
OFFICIAL_STUDENT_UPDATES = 300 * 50 * 5  # the paper's 15,000 iterations x 5 student steps


def load_runs(tags: tuple[str, ...]) -> list[dict]:
    runs = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    chosen = [r for r in runs if r["tag"] in tags]
    missing = set(tags) - {r["tag"] for r in chosen}
    if missing:
        raise ConfigError(f"no logged run with tag(s) {sorted(missing)} in {LOG}; nothing written")
    return chosen


def meets_bar(epoch: dict, teacher_acc: float) -> bool:
    """The project's bar (defense.metrics.bar_outcome) on one epoch's logged evaluation."""
    after = {"acc": epoch["eval_acc"], "asr_x1": epoch["eval_asr_x1"], "asr_x9": epoch.get("eval_asr_x9")}
    return bar_outcome({"acc": teacher_acc}, after)[0]


def table(runs: list[dict]) -> str:
    updates = sorted({e["student_updates"] for r in runs for e in r["epochs"]})
    lines = ["| student updates | share of the official 75,000 | ACC % | ACC drop (points) | ASR x1 % | ASR x4 % | "
             "ASR x9 % | runs meeting the bar |", "|---|---|---|---|---|---|---|---|"]
    for count in updates:
        rows = [(r, e) for r in runs for e in r["epochs"] if e["student_updates"] == count]
        if len(rows) < len(runs) or (count not in updates[:3] and count % 150):
            continue

        def mean(key: str) -> float:
            return 100 * statistics.mean(e.get(key) or 0.0 for _, e in rows)

        drop = statistics.mean(100 * (r["teacher"]["acc"] - e["eval_acc"]) for r, e in rows)
        meeting = sum(meets_bar(e, r["teacher"]["acc"]) for r, e in rows)
        lines.append(f"| {count} | {count / OFFICIAL_STUDENT_UPDATES:.1%} | {mean('eval_acc'):.1f} | {drop:.1f} | "
                     f"{mean('eval_asr_x1'):.1f} | {mean('eval_asr_x4'):.1f} | {mean('eval_asr_x9'):.1f} | "
                     f"{meeting}/{len(rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tags", nargs="*", default=list(RECIPE_TAGS))
    add_out_argument(parser, "compute_to_quality", (".md",))
    args = parser.parse_args()
    if not args.tags:
        raise ConfigError("--tags names no run; nothing written")
    runs = load_runs(tuple(args.tags))
    text = (f"# Compute to quality (runs: {', '.join(args.tags)}; mean over runs)\n\n{table(runs)}\n\n"
            "Bar: ASR x1 <= 5%, ASR x9 <= 10%, ACC drop <= 2 points (the DHBE issue's). "
            "The learning-rate schedule is that of each run's full length.\n")
    print(text)
    out = out_file(out_stem(args), ".md")
    atomic_write_text(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.research.compute_to_quality")   # no such run: one line, exit 2
