"""`python -m benchmarks.scan_speed [--compare REF]`: one scan of a digits FedAvg global model with its
three earlier global models, timed here, and (with --compare) beside the reference commit's verdict on
the same model files in the same run: REF is checked out into a temporary git worktree and its default
recipe's verdict (the blend search on the model and on each earlier version, class after class) is
timed in a subprocess. Writes STEM.md (--out STEM, default runs/bench/scan_speed; the committed table:
--out benchmarks/results/scan_speed; with --tiny: a seconds-long scan of an untrained model, no
comparison, nothing written)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.scan_population import model_files, plant, population
from benchmarks.tables import add_out_argument, out_file, out_stem
from benchmarks.worktree import run_at_commit
from defense.cli import ArgumentParser

MEMBER = "calibration-27-badnets-fedavg-s127"   # a 20-round FedAvg run: rounds 5, 10, 15 and the final model

REFERENCE_VERDICT = """
import json, sys, time
import torch
from defense.dhbe import DHBETrainer, recipe_config
from defense.modelio import load_model
final = load_model(sys.argv[1]); earlier = [load_model(p).model.eval() for p in sys.argv[2:]]
trainer = DHBETrainer(final.model.eval(), final.spec, recipe_config("default"), earlier=earlier)
search = trainer.extension("blend_search")
started = time.perf_counter()
search.probe(trainer)
print(json.dumps({"seconds": time.perf_counter() - started, "suspects": search.suspects,
                  "threads": torch.get_num_threads()}))
"""


def reference_verdict(ref: str, final: Path, earlier: list[Path]) -> dict:
    """REF's verdict on the same files, in a worktree of REF."""
    return run_at_commit(ref, REFERENCE_VERDICT, [str(final.resolve()), *[str(p.resolve()) for p in earlier]])


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from defense.modelio import load_model
    from defense.models import build_model
    from defense.scan import ScanConfig, scan
    from defense.spec import InputSpec

    p = ArgumentParser(prog="python -m benchmarks.scan_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", default=None, metavar="REF", help="a commit whose verdict to time beside (e.g. ad4f791)")
    p.add_argument("--tiny", action="store_true", help="seconds-long, an untrained model, no comparison (CI)")
    add_out_argument(p, "scan_speed", (".md",))
    args = p.parse_args(argv)
    if args.tiny:
        spec = InputSpec(1, 16, 16, 10, (0.5,), (0.5,))
        models = [build_model("small-cnn", spec).eval() for _ in range(4)]
        report = scan(models[-1], spec, models[:-1], ScanConfig().smoke_sized())
        print(json.dumps({"seconds": report.seconds, "stages": report.seconds_by_stage}))
        return 0
    member = next(m for m in population("calibration") if m.name == MEMBER)
    final_path, earlier_paths = model_files(plant(member))
    final = load_model(final_path)
    earlier = [load_model(path).model.eval() for path in earlier_paths]
    started = time.perf_counter()
    report = scan(final.model.eval(), final.spec, earlier)
    wall = time.perf_counter() - started
    rows = [f"| this tree's scan (defense.scan) | {wall:.1f} | {', '.join(map(str, report.suspects)) or '-'} |"]
    reference = None
    if args.compare:
        reference = reference_verdict(args.compare, final_path, earlier_paths)
        rows.append(f"| {args.compare}'s verdict (blend search on the model and each earlier version) | "
                    f"{reference['seconds']:.1f} | {', '.join(map(str, reference['suspects'])) or '-'} |")
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report.seconds_by_stage.items())
    lines = [f"# One scan of a FedAvg global model with {len(earlier)} earlier versions ({MEMBER})", "",
             f"`python -m benchmarks.scan_speed{' --compare ' + args.compare if args.compare else ''}` on "
             f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, one run, nothing else running.", "",
             "| what | seconds | suspects |", "|---|---|---|", *rows, "",
             f"Where this tree's scan spends its time: {stages}."]
    if reference:
        lines.append(f"Speed-up: {reference['seconds'] / wall:.1f}x.")
    out = out_file(out_stem(args), ".md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
