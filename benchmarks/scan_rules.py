"""`python -m benchmarks.scan_rules`: candidate decision rules of the scanner, compared on the
calibration part of the population only (benchmarks/scan_population.py), from the cached measurements
of `benchmarks.scan_roc --split calibration` (no model is scanned again).

A rule is a per-class statistic of one measure (the blend patterns' losses, the masks' areas, or both)
in one version, and a way to combine the versions. Statistics (each "large = suspiciously easy"):
- `mad`:   Neural Cleanse's anomaly index, (median - log v) / (1.4826 MAD) of the classes' log values,
           the spread floored at 0.25 (the previous verdict's statistic)
- `gap`:   log of the next-smallest class's value over this class's
- `depth`: median - log v (how many e-folds below the median class; no division by the spread)
- `abs`:   -log v
Versions: `final` (the model alone), `votes2` (the second largest over the versions), `median`,
`mean`, `max`.
Writes STEM.md (--out STEM, default runs/bench/scan_rules_calibration; the committed one of the first
calibration pass: --cache-key ae134c4f90d5 --out benchmarks/results/scan_rules_calibration_pass1). The
held-out part is never read here.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Callable, Optional, Sequence

from benchmarks.scan_population import CACHE, label, population
from benchmarks.scan_roc import roc_auc, settings_key, tpr_at_fpr
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.scan import depth   # the adopted statistic, as the scanner computes it
from defense.cli import ArgumentParser


def mad(values: Sequence[float]) -> list[float]:
    logs = [math.log(max(v, 1e-12)) for v in values]
    median = statistics.median_low(logs)
    spread = max(1.4826 * statistics.median_low([abs(v - median) for v in logs]), 0.25)
    return [(median - v) / spread for v in logs]


def gap(values: Sequence[float]) -> list[float]:
    logs = [math.log(max(v, 1e-12)) for v in values]
    return [min(other for j, other in enumerate(logs) if j != k) - v for k, v in enumerate(logs)]


def absolute(values: Sequence[float]) -> list[float]:
    return [-math.log(max(v, 1e-12)) for v in values]


STATISTICS: dict[str, Callable[[Sequence[float]], Sequence[float]]] = {"mad": mad, "gap": gap, "depth": depth,
                                                                   "abs": absolute}
VERSIONS = ("final", "votes2", "median", "mean", "max")
MEASURES = {"blend": ("blend_loss",), "mask": ("mask_area",), "mask at half": ("mask_half_area",),
            "blend+mask (max)": ("blend_loss", "mask_area")}


def combine(per_version: list[list[float]], how: str) -> list[float]:
    classes = range(len(per_version[-1]))
    if how == "final":
        return list(per_version[-1])
    if how == "max":
        return [max(v[k] for v in per_version) for k in classes]
    if how == "mean":
        return [sum(v[k] for v in per_version) / len(per_version) for k in classes]
    if how == "votes2":
        n = min(2, len(per_version))
        return [sorted((v[k] for v in per_version), reverse=True)[n - 1] for k in classes]
    return [statistics.median(v[k] for v in per_version) for k in classes]


def rule_scores(record: dict, statistic: str, measure: str, how: str) -> list[float]:
    per_version = []
    for version in record["per_version"]:
        if not all(version.get(name) for name in MEASURES[measure]):
            return []
        columns = [STATISTICS[statistic](version[name]) for name in MEASURES[measure]]
        per_version.append([max(values) for values in zip(*columns)])
    return combine(per_version, how)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from defense.fileio import atomic_write_text
    from defense.report import markdown_table
    from defense.scan import ScanConfig
    from defense.cli import field_pairs

    p = ArgumentParser(prog="python -m benchmarks.scan_rules", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="scan_set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="the scan settings whose cached measurements to read (as given to scan_roc)")
    p.add_argument("--cache-key", default=None,
                   help="the cache key of the measurements to read (default: that of the --set settings; the first "
                        "calibration pass, with blend inversions: ae134c4f90d5)")
    add_out_argument(p, "scan_rules_calibration", (".md",))
    args = p.parse_args(argv)
    config = ScanConfig.from_values(field_pairs(args.scan_set, "--set"))
    key = args.cache_key or settings_key(config)
    members = []
    for member in population("calibration"):
        cached = CACHE / member.name / f"scan-{key}.json"
        if cached.exists():
            truth = json.loads((CACHE / member.name / "truth.json").read_text())
            members.append((truth, json.loads(cached.read_text())))
    if not members:
        print(f"python -m benchmarks.scan_rules: error: no cached calibration measurements {key} under {CACHE} "
              "(run python -m benchmarks.scan_roc --split calibration first)", file=sys.stderr)
        return 2
    rows = []
    for statistic in STATISTICS:
        for measure in MEASURES:
            for how in VERSIONS:
                negatives, positives, first = [], [], 0
                for truth, record in members:
                    scores = rule_scores(record, statistic, measure, how)
                    if not scores:
                        continue
                    top = max(range(len(scores)), key=lambda k: scores[k])
                    if label(truth) == "clean":
                        negatives.append(scores[top])
                    elif label(truth) == "backdoored":
                        positives.append(scores[top])
                        first += top == truth["target"]
                if not positives:
                    continue
                tpr2, _ = tpr_at_fpr(negatives, positives, 0.02)
                tpr5, threshold = tpr_at_fpr(negatives, positives, 0.05)
                rows.append([statistic, measure, how, f"{roc_auc(negatives, positives):.3f}", f"{100 * tpr2:.0f}%",
                             f"{100 * tpr5:.0f}%", f"{threshold:.2f}", f"{first}/{len(positives)}"])
    clean = sum(label(t) == "clean" for t, _ in members)
    backdoored = sum(label(t) == "backdoored" for t, _ in members)
    lines = [f"# Candidate scanner rules on the calibration models ({clean} clean, {backdoored} backdoored)", "",
             f"`python -m benchmarks.scan_rules --cache-key {key}` (cached measurements {key}).", "",
             *markdown_table(["statistic", "measure", "versions", "ROC AUC", "TPR at FPR <= 2%", "TPR at FPR <= 5%",
                              "threshold at 5%", "target is the top class"], rows), ""]
    out = out_file(out_stem(args), ".md")
    atomic_write_text(out, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
