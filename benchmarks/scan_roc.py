"""`python -m benchmarks.scan_roc --split calibration|held-out`: the scanner measured as a detector.

Plants (once, cached) the split's population (benchmarks/scan_population.py), scans every member with
its earlier versions where it has them, and reports ROC AUC, the true-positive rate at false-positive
rates <= 2% and <= 5%, the share of detected backdoors whose true target is the first suspect, per
attack kind and per federation shape, and seconds per scan; beside it the weight-only baseline
(defense/scan/weights.py) on the same models. Writes STEM.{parquet,md,png} (--out STEM, default
runs/bench/scan_roc_SPLIT; the committed tables: --out benchmarks/results/scan_roc_SPLIT; with --tiny:
two seconds-long members, written into a temporary folder unless --out is given).

The measurements of a scan (per version and class) are cached beside each member, keyed by the scan's
settings; the verdict is re-decided from them (defense.scan.decide), so the same cache serves every
threshold.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.scan_population import CACHE, SPLITS, Member, label, model_files, plant, population, tiny_population
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser

RESULTS = Path(__file__).resolve().parent / "results"   # the committed tables


def settings_key(config) -> str:
    """The cache key of a scan's measurements: every setting but the decision's threshold and the memory
    bound (classes inverted in groups: the same maths)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("threshold", "max_images")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def measure(folder: Path, config) -> dict[str, Any]:
    """The scan's measurements of one planted member (cached)."""
    from defense.fileio import atomic_write_json
    from defense.modelio import load_model
    from defense.scan import scan

    cached = folder / f"scan-{settings_key(config)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    final_path, earlier_paths = model_files(folder)
    final = load_model(final_path)
    earlier = [load_model(p).model.eval() for p in earlier_paths]
    report = scan(final.model.eval(), final.spec, earlier, config,
                  version_names=[p.stem for p in earlier_paths] + ["model"])
    record = {"versions": list(report.versions), "per_version": [asdict(v) for v in report.per_version],
              "weight_scores": list(report.weight_scores), "seconds": report.seconds,
              "seconds_by_stage": dict(report.seconds_by_stage)}
    atomic_write_json(cached, record)
    return record


def decided(record: dict[str, Any], config):
    from defense.scan import VersionScores, decide

    per_version = [VersionScores(**{k: tuple(v) for k, v in version.items()}) for version in record["per_version"]]
    return decide(per_version, record["versions"], record["weight_scores"], config, record["seconds"],
                  record["seconds_by_stage"])


def row(member: Member, folder: Path, config) -> dict[str, Any]:
    truth = json.loads((folder / "truth.json").read_text())
    record = measure(folder, config)
    report = decided(record, config)
    return {"member": member.name, "split": member.split, "label": label(truth), "attack_kind": member.attack_kind,
            "shape": member.shape, "target": truth.get("target"), "acc": truth["acc"], "asr_x1": truth["asr_x1"],
            "asr_x9": truth["asr_x9"], "versions": len(report.versions), "score": report.score,
            "flagged": report.backdoored, "first_suspect": report.suspects[0] if report.suspects else None,
            "suspects": list(report.suspects),
            "baseline_score": max(report.weight_scores),
            "baseline_first": max(range(len(report.weight_scores)), key=lambda k: report.weight_scores[k]),
            "seconds": report.seconds}


# --- detector statistics ------------------------------------------------------------------------------
def roc_auc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney)."""
    if not negatives or not positives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(negatives) * len(positives))


def tpr_at_fpr(negatives: Sequence[float], positives: Sequence[float], max_fpr: float) -> tuple[float, float]:
    """The best true-positive rate of a threshold whose false-positive rate is <= max_fpr, and that threshold."""
    best = (0.0, float("inf"))
    for threshold in sorted(set(negatives) | set(positives) | {max(negatives, default=0.0)}):
        fpr = sum(n > threshold for n in negatives) / max(len(negatives), 1)
        if fpr <= max_fpr:
            tpr = sum(p > threshold for p in positives) / max(len(positives), 1)
            if tpr > best[0]:
                best = (tpr, threshold)
    return best


def roc_points(negatives: Sequence[float], positives: Sequence[float]) -> list[tuple[float, float]]:
    points = [(1.0, 1.0)]
    for threshold in sorted(set(negatives) | set(positives)):
        points.append((sum(n > threshold for n in negatives) / len(negatives),
                       sum(p > threshold for p in positives) / len(positives)))
    return sorted(points)


def summary(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    clean = [r for r in rows if r["label"] == "clean"]
    backdoored = [r for r in rows if r["label"] == "backdoored"]
    out: dict[str, Any] = {"clean": len(clean), "backdoored": len(backdoored),
                           "weak": sum(r["label"] == "weak" for r in rows)}
    for name, key in (("scanner", "score"), ("weight baseline", "baseline_score")):
        negatives, positives = [r[key] for r in clean], [r[key] for r in backdoored]
        tpr2, t2 = tpr_at_fpr(negatives, positives, 0.02)
        tpr5, t5 = tpr_at_fpr(negatives, positives, 0.05)
        out[name] = {"roc_auc": roc_auc(negatives, positives), "tpr_at_fpr_2": tpr2, "tpr_at_fpr_5": tpr5,
                     "threshold_at_fpr_5": t5}
    detected = [r for r in backdoored if r["flagged"]]
    out["at_threshold"] = {"threshold": threshold, "tpr": len(detected) / max(len(backdoored), 1),
                           "fpr": sum(r["flagged"] for r in clean) / max(len(clean), 1),
                           "target_first": sum(r["first_suspect"] == r["target"] for r in detected) / max(len(detected), 1)}
    out["seconds_per_scan"] = {"median": sorted(r["seconds"] for r in rows)[len(rows) // 2] if rows else None,
                               "max": max((r["seconds"] for r in rows), default=None)}
    return out


def write_results(rows: list[dict[str, Any]], stats: dict[str, Any], split: str, stem: Path,
                  config) -> list[Path]:
    """STEM.parquet, STEM.md and (where there are clean and backdoored members) STEM.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from defense.fileio import atomic_path, atomic_write_text
    from defense.report import figure, markdown_table

    stem.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{**r, "suspects": json.dumps(r["suspects"])} for r in rows])
    with atomic_path(out_file(stem, ".parquet")) as tmp:
        pq.write_table(table, tmp)
    at = stats["at_threshold"]
    lines = [f"# The scanner as a detector: {split} ({stats['clean']} clean, {stats['backdoored']} backdoored, "
             f"{stats['weak']} weak models)", "",
             f"`python -m benchmarks.scan_roc --split {split}`; scan settings: "
             f"`{json.dumps(config.to_dict())}`.", "",
             *markdown_table(["detector", "ROC AUC", "TPR at FPR <= 2%", "TPR at FPR <= 5%"],
                             [[name, f"{s['roc_auc']:.3f}", f"{100 * s['tpr_at_fpr_2']:.1f}%",
                               f"{100 * s['tpr_at_fpr_5']:.1f}%"]
                              for name, s in ((n, stats[n]) for n in ("scanner", "weight baseline"))]), "",
             f"At the scanner's threshold {at['threshold']:g}: {100 * at['tpr']:.1f}% of backdoors flagged, "
             f"{100 * at['fpr']:.1f}% of clean models flagged; the true target is the first suspect on "
             f"{100 * at['target_first']:.1f}% of the flagged backdoors. Seconds per scan: median "
             f"{stats['seconds_per_scan']['median']:.1f}, max {stats['seconds_per_scan']['max']:.1f} "
             "(while other work shared the two cores: see docs/scan.md for the timing run).", ""]
    for group in ("attack_kind", "shape"):
        names = sorted({r[group] for r in rows})
        body = []
        for name in names:
            members = [r for r in rows if r[group] == name]
            bd = [r for r in members if r["label"] == "backdoored"]
            cl = [r for r in members if r["label"] == "clean"]
            body.append([name, len(bd), sum(r["flagged"] for r in bd), sum(r["flagged"] and r["first_suspect"] == r["target"]
                                                                           for r in bd), len(cl), sum(r["flagged"] for r in cl),
                         sum(r["label"] == "weak" for r in members)])
        lines += [f"## By {group.replace('_', ' ')}", "", *markdown_table(
            [group.replace("_", " "), "backdoored", "flagged", "target first", "clean", "flagged (false alarms)", "weak"],
            body), ""]
    lines += ["## Every model", "", *markdown_table(
        ["member", "label", "target", "ASR x1 / x9", "score", "suspects", "baseline", "s"],
        [[r["member"], r["label"], r["target"], f"{100 * r['asr_x1']:.0f} / " + ("-" if r["asr_x9"] is None else f"{100 * r['asr_x9']:.0f}"),
          f"{r['score']:.2f}", ",".join(map(str, r["suspects"])) or "-",
          f"{r['baseline_score']:.2f}", f"{r['seconds']:.1f}"] for r in rows]), ""]
    atomic_write_text(out_file(stem, ".md"), "\n".join(lines))
    clean = [r for r in rows if r["label"] == "clean"]
    backdoored = [r for r in rows if r["label"] == "backdoored"]
    if clean and backdoored:
        with figure(out_file(stem, ".png"), figsize=(4.5, 4)) as ax:
            for name, key in (("scanner", "score"), ("weight baseline", "baseline_score")):
                points = roc_points([r[key] for r in clean], [r[key] for r in backdoored])
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                        label=f"{name} (AUC {stats[name]['roc_auc']:.3f})")
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
            ax.set_xlabel("false-positive rate"), ax.set_ylabel("true-positive rate")
            ax.set_title(f"scanner ROC, {split}"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    return [out_file(stem, s) for s in (".parquet", ".md", *((".png",) if clean and backdoored else ()))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from defense.cli import field_pairs
    from defense.scan import ScanConfig

    p = ArgumentParser(prog="python -m benchmarks.scan_roc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=tuple(SPLITS), default="calibration",
                   help="which part of the population (default: calibration; held-out: run once, at the end)")
    p.add_argument("--set", dest="scan_set", nargs="*", default=[], metavar="FIELD=VALUE", help="scanner settings")
    p.add_argument("--tiny", action="store_true", help="two seconds-long members into a temporary folder (CI)")
    add_out_argument(p, "scan_roc_<split>", (".parquet", ".md", ".png"))
    args = p.parse_args(argv)
    config = ScanConfig.from_values(field_pairs(args.scan_set, "--set"))
    if args.tiny:
        folder = Path(tempfile.mkdtemp(prefix="scan-roc-"))
        members, cache, config = tiny_population(), folder / "population", config.smoke_sized()
        stem = out_stem(args) if args.out else folder / "scan_roc_tiny"
    else:
        members, cache, stem = population(args.split), CACHE, out_stem(args, f"scan_roc_{args.split}")
    rows = []
    for member in members:
        started = time.perf_counter()
        r = row(member, plant(member, cache), config)
        rows.append(r)
        print(f"{r['member']}: {r['label']} score {r['score']:.2f} suspects {r['suspects']} (target {r['target']}) "
              f"baseline {r['baseline_score']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    stats = summary(rows, config.threshold)
    for path in write_results(rows, stats, "tiny" if args.tiny else args.split, stem, config):
        print(f"wrote {path}")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
