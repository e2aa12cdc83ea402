"""Markdown summary of the DHBE probe log (benchmarks/results/dhbe_experiments.jsonl):
`python -m benchmarks.research.experiments_summary` prints one row per logged run."""
from __future__ import annotations

import json
from pathlib import Path

from defense.dhbe import DHBEConfig

LOG = Path("benchmarks/results/dhbe_experiments.jsonl")


def differences(config: dict) -> str:
    """Official fields that differ from the defaults, then the extensions. Lines logged before the
    recipe had extensions (before commit 3677cdd's successor) hold one flat dict of fields."""
    if "dhbe" in config:
        extensions = [name + "(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
                      for name, fields in config.get("extensions", [])]
        return ", ".join(filter(None, [differences(config["dhbe"]), *extensions]))
    defaults = DHBEConfig().to_dict()
    keep = []
    for key, value in config.items():
        default = defaults.get(key)
        if isinstance(default, tuple):
            default = list(default)
        if key != "seed" and value != default:
            keep.append(f"{key}={value}")
    return ", ".join(keep)


def main() -> None:
    print("| run | departures from the official defaults | teacher ACC | final ACC | ASR x1 | ASR x4 | ASR x9 | min ASR x9 (epoch) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for line in LOG.read_text().splitlines():
        run = json.loads(line)
        final, teacher = run["final"], run["teacher"]
        x9 = [(e.get("eval_asr_x9"), e["epoch"]) for e in run["epochs"] if e.get("eval_asr_x9") is not None]
        best = min(x9) if x9 else (None, None)
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
        print(f"| {run['tag']} | {differences(run['config'])} | {pct(teacher['acc'])} | {pct(final['acc'])} | "
              f"{pct(final['asr_x1'])} | {pct(final.get('asr_x4'))} | {pct(final.get('asr_x9'))} | "
              f"{pct(best[0])} ({best[1]}) | {run['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
