"""`python -m deploy.purify MODEL --out OUT`: purify any model file of the project with DHBE on
Ray Train (a fresh local Ray, or the cluster named by RAY_ADDRESS / --address)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from defense.cli import (ArgumentParser, bounded_int, json_line, positive_float, run_main,
                         writable_destination)
from defense.dhbe.cli import add_recipe_arguments, recipe_from_args
from defense.dhbe.loop import evidence_line
from defense.errors import ConfigError, shown

MAX_EARLIER = 32   # earlier versions the scan weighs (each costs one pair of inversions)


def job_name(text: str) -> str:
    """An argparse type: deploy.ray_job's rule for a job's name, checked before anything is loaded."""
    from deploy.ray_job import JOB_NAME_RULE, job_name_ok

    if not job_name_ok(text):
        raise argparse.ArgumentTypeError(f"{JOB_NAME_RULE}, got {shown(text)}")
    return text


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m deploy.purify", description=__doc__)
    p.add_argument("model", help="model file to purify (.json manifest, .safetensors, or weights-only .pt)")
    p.add_argument("--out", required=True, help="output model path (writes OUT.safetensors and OUT.json)")
    p.add_argument("--earlier", nargs="+", default=[], metavar="MODEL",
                   help="earlier versions of the same model, oldest first (e.g. a federated run's global models "
                        "models/round-005.json ... of earlier rounds): the scan counts in how many versions a "
                        "class stands out (docs/scan.md)")
    p.add_argument("--workers", type=bounded_int(1, 1024), default=1, help="Ray Train workers: one game split over them, each on an equal slice of the batch (batch_size must divide evenly); on a CPU one worker is faster")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                        help="force GPU workers (default: GPU workers when Ray sees a GPU, else CPU)")
    device.add_argument("--cpu", dest="use_gpu", action="store_false", help="force CPU workers")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", default=None,
                   help="folder for Ray Train checkpoints (default: a hidden folder beside --out)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the job's checkpoints after it succeeds (default: removed; needed to resume by --name)")
    p.add_argument("--name", type=job_name, default=None, help="the job's name (default: a fresh one); reusing one resumes that run")
    p.add_argument("--resume", type=job_name, default=None, metavar="NAME",
                   help="go on with the interrupted job NAME from its last checkpoint (kept with --keep-checkpoints, "
                        "or left by a crash), as federated.simulate --resume goes on with a run")
    p.add_argument("--max-failures", type=bounded_int(0, 100), default=2, help="worker failures to recover from")
    p.add_argument("--budget", "--purify-budget", dest="budget", type=positive_float, default=None,
                   help="stop after this many seconds of DHBE (default: the recipe's iteration count)")
    add_recipe_arguments(p, purify_aliases=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from defense.modelio import load_model

    recipe = recipe_from_args(args)
    out = Path(args.out)
    if out.suffix in (".json", ".safetensors"):
        out = out.with_suffix("")
    writable_destination(out.with_suffix(".safetensors"))   # names the file system takes, a folder one can write in
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; name the output model file (OUT.json and OUT.safetensors)")
    for written in (out.with_suffix(".json"), out.with_suffix(".safetensors")):
        if written.exists():
            raise ConfigError(f"--out: {written} already exists")
    if args.storage is not None:
        writable_destination(Path(args.storage) / "x", "--storage")
    local_cpus = os.cpu_count() or 1
    if args.address is None and not os.environ.get("RAY_ADDRESS") and args.workers > local_cpus:
        raise ConfigError(f"--workers {args.workers}: a local Ray has {local_cpus} CPUs; use at most that many "
                          "(or a cluster: --address / RAY_ADDRESS)")
    if args.resume is not None:
        from deploy.ray_job import checkpoint_storage

        if args.name not in (None, args.resume):
            raise ConfigError(f"--resume {args.resume} and --name {args.name}: give one job name")
        storage = checkpoint_storage(out, args.storage)
        if not (storage / args.resume).is_dir():
            raise ConfigError(f"--resume {args.resume}: no checkpoints of that job in {storage}")
        args.name = args.resume
    teacher = load_model(args.model)
    recipe.validate_for(teacher.spec)
    if len(args.earlier) > MAX_EARLIER:
        raise ConfigError(f"--earlier: at most {MAX_EARLIER} earlier versions, got {len(args.earlier)}")
    earlier = [load_model(path) for path in args.earlier]
    from deploy.ray_job import PurifyJobConfig, run_purify_job

    job = PurifyJobConfig(recipe=recipe, workers=args.workers, use_gpu=args.use_gpu, address=args.address,
                          storage_path=args.storage, keep_checkpoints=args.keep_checkpoints, name=args.name, max_failures=args.max_failures,
                          budget_s=args.budget)
    result = run_purify_job(teacher, job, out, earlier=earlier)
    last = result.history[-1] if result.history else {}
    print(evidence_line(result.evidence))
    same = json.loads(result.manifest_path.read_text()).get("weights_sha256") == teacher.weights_sha256
    print(f"wrote {result.manifest_path} in {result.wall_s:.0f} s on {result.device}"
          + (": the same weights as the input (handed back unchanged)" if same else ""), flush=True)
    print(json_line({"purified": str(result.manifest_path), "device": result.device, "wall_s": round(result.wall_s, 1),
                      "epochs": len(result.history),
                      "synthetic_agreement": last.get("synthetic_agreement"),
                      "trigger_sensitivity": last.get("trigger_sensitivity"), "evidence": result.evidence}))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m deploy.purify")
