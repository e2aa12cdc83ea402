"""`python -m defense.scan MODEL [--earlier MODEL ...] [--run RUN_FOLDER] [--json] [--out FILE]`:
is this model backdoored, and towards which class? Data-free (docs/scan.md).

Prints one verdict line (with --json, one JSON line with every field of the report); exit 0 on a
verdict of either kind, 2 with one line on bad input. Nothing is written unless --out names a file."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from defense.cli import ArgumentParser, field_pairs, json_line, run_main, writable_destination
from defense.errors import ConfigError

MAX_EARLIER = 32   # earlier versions (each costs one pair of inversions)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m defense.scan", description=__doc__)
    p.add_argument("model", nargs="?", default=None,
                   help="model file (.json manifest, .safetensors or weights-only .pt); with --run, not given")
    p.add_argument("--earlier", nargs="+", default=[], metavar="MODEL",
                   help="earlier versions of the same model, oldest first (a federated server's global models of "
                        "earlier rounds)")
    p.add_argument("--run", default=None, metavar="RUN_FOLDER",
                   help="a federated run folder: its final model and the earlier global models the server hook "
                        "weighs (rounds at 1/4, 1/2 and 3/4 of the run)")
    p.add_argument("--json", action="store_true", help="print one JSON line with every field of the report")
    p.add_argument("--out", default=None, help="also write the report as JSON to this file (default: nothing written)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    p.add_argument("--set", dest="scan_set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="scanner settings, e.g. threshold=1.2 mask_steps=200 (fields of defense.scan.ScanConfig)")
    return p


def model_paths(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    if args.run is not None:
        if args.model is not None or args.earlier:
            raise ConfigError("--run names the model and its earlier versions; give no MODEL or --earlier with it")
        from defense.scan.versions import run_folder_versions

        return run_folder_versions(Path(args.run))
    if args.model is None:
        raise ConfigError("name a MODEL file or a --run folder")
    return Path(args.model), [Path(p) for p in args.earlier]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from defense.scan import ScanConfig

    config = ScanConfig.from_values(field_pairs(args.scan_set, "--set"))
    out = writable_destination(args.out) if args.out is not None else None
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; name a file")
    model_path, earlier_paths = model_paths(args)
    if len(earlier_paths) > MAX_EARLIER:
        raise ConfigError(f"--earlier: at most {MAX_EARLIER} earlier versions, got {len(earlier_paths)}")
    import torch

    from defense.modelio import load_model
    from defense.scan import scan

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device[:40]!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    from defense.scan.versions import check_earlier_versions

    loaded = load_model(model_path)
    earlier = [load_model(path) for path in earlier_paths]
    check_earlier_versions(loaded, earlier, [str(path)[:200] for path in earlier_paths])
    names = [f"earlier {p.stem}" for p in earlier_paths] + ["model"]
    report = scan(loaded.model.eval(), loaded.spec, [version.model.eval() for version in earlier], config, device, names)
    record = {"model": str(model_path), "earlier": [str(p) for p in earlier_paths], **report.to_dict()}
    if out is not None:
        from defense.fileio import atomic_write_json

        atomic_write_json(out, record)
    print(json_line(record) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    run_main(main, "python -m defense.scan")
