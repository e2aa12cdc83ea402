"""Scaling: wall time of the federated simulation (no purification) against clients and rounds, and
DHBE's speed (CPU recipe, small CNN) against image size.

    python -m benchmarks.scaling [--out STEM] [--tiny]
    python -m benchmarks.scaling --mnist-dir DIR [--write-mnist-standin]   # the sampling rows on MNIST files

Writes STEM.md and STEM.json (with --mnist-dir: STEM_mnist.md and .json); --out STEM, default
runs/bench/scaling (the committed tables: --out benchmarks/results/scaling).
Each federated run is a fresh Flower simulation (Ray start included), so its time is what a user
waits for."""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from defense.data import load_dataset
from defense.dhbe import DHBETrainer, cpu_recipe
from defense.fileio import atomic_write_json, atomic_write_text
from defense.models import build_model
from federated.config import SimulationConfig
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser

FEDERATED_GRID = [(5, 20), (10, 20), (20, 20), (10, 5), (10, 10)]  # (clients, rounds)
SAMPLING_GRID = [(100, 10), (1000, 10), (100, 100), (1000, 100)]    # (registered clients, sampled per round)
SAMPLING_ROUNDS = 5
IMAGE_SIZES = (8, 16, 32)


def time_federated(clients: int, rounds: int, local_epochs: int = 2) -> dict:
    from federated.engine import run_federated

    config = SimulationConfig(clients=clients, malicious=min(2, clients // 4), rounds=rounds, local_epochs=local_epochs)
    spec = load_dataset("digits", None, config.image_size).spec
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run = run_federated(config, Path(folder) / "run", spec, purify=False, quiet=True)
        wall = time.perf_counter() - started
    last = run.rows[-1]
    return {"clients": clients, "rounds": rounds, "wall_s": round(wall, 1),
            "s_per_round": round(wall / rounds, 2), "acc": round(last["acc"], 4), "asr_x1": round(last["asr_x1"], 4)}


def ray_workers_rss() -> int:
    """Bytes resident in Ray's worker processes now (from /proc; 0 where there is no /proc)."""
    total = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"ray::" not in cmdline and b"default_worker.py" not in cmdline:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:   # the process ended meanwhile
            continue
    return total


def time_sampled(registered: int, sampled: int, rounds: int, dataset: str = "digits", data_dir: str | None = None,
                 image_size: int = 16) -> dict:
    """A run with `registered` clients of which `sampled` train each round (2 malicious among the
    registered): wall time and the peak memory of this (server) process and of the Ray workers
    (their resident memory read from /proc while the run lasts; Linux)."""
    import resource
    import threading

    from federated.engine import run_federated

    config = SimulationConfig(clients=registered, sample=sampled, malicious=2, rounds=rounds, local_epochs=1,
                              dataset=dataset, data_dir=data_dir, image_size=image_size)
    spec = load_dataset(dataset, Path(data_dir) if data_dir else None, config.image_size).spec
    peak, done = [0], threading.Event()

    def watch() -> None:   # the Ray workers' resident memory together, sampled every 0.5 s
        while not done.wait(0.5):
            peak[0] = max(peak[0], ray_workers_rss())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run = run_federated(config, Path(folder) / "run", spec, purify=False, quiet=True)
        wall = time.perf_counter() - started
    done.set()
    watcher.join()
    rows = run.rows
    return {"registered": registered, "sampled": sampled, "rounds": rounds, "wall_s": round(wall, 1),
            "s_per_round": round(wall / rounds, 2), "trained_per_round": rows[-1]["clients_trained"] if rows else 0,
            "server_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
            "workers_peak_rss_mb": round(peak[0] / 2**20, 0)}


def time_dhbe(image_size: int, iterations: int, batch_size: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    spec = load_dataset("digits", None, image_size).spec
    config = cpu_recipe().with_overrides({"perturbations.warmup_steps": 0}).replace(batch_size=batch_size, patch_size=min(3, image_size - 1),
                                                          iters_per_epoch=iterations, epochs=2)
    trainer = DHBETrainer(build_model("small-cnn", spec).eval(), spec, config)
    trainer.run_epoch()  # warm-up epoch
    started = time.perf_counter()
    trainer.run_epoch()
    seconds = time.perf_counter() - started
    recipe = cpu_recipe()
    it_per_s = iterations / seconds
    return {"image_size": image_size, "it_per_s": round(it_per_s, 2),
            "recipe_iterations": recipe.dhbe.iterations,
            "recipe_seconds_estimate": round(recipe.dhbe.iterations / it_per_s
                                             + recipe.get("perturbations").warmup_steps / (3 * it_per_s), 0)}


def sampling_table(rows: list[dict]) -> list[str]:
    """The client-sampling rows (time_sampled's) as Markdown table lines."""
    return ["| registered | sampled per round | wall s | s per round | trained per round | server peak RSS MB | "
            "workers peak RSS MB |", "|---|---|---|---|---|---|---|"] + [
        f"| {r['registered']} | {r['sampled']} | {r['wall_s']} | {r['s_per_round']} | {r['trained_per_round']} | "
        f"{r['server_peak_rss_mb']:.0f} | {r['workers_peak_rss_mb']:.0f} |" for r in rows]


def write_mnist_standin(folder: Path, train: int = 60_000, test: int = 10_000, seed: int = 0) -> Path:
    """MNIST's four IDX files, of MNIST's size and format (28x28 unsigned bytes, 60,000 + 10,000),
    drawn from scikit-learn's 8x8 digits (no MNIST can be downloaded here): each image a digit scaled
    to 20x20, placed at a random offset, with random contrast and noise; train images come from the
    first 1,500 digits, test images from the other 297. For the engine's cost, not for accuracy."""
    import numpy as np
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from defense.data import write_idx

    digits = load_digits()
    rng = np.random.default_rng(seed)

    def draw(pool: slice, count: int) -> tuple[np.ndarray, np.ndarray]:
        sources = np.arange(len(digits.images))[pool]
        picks = rng.choice(sources, count)
        small = torch.from_numpy(digits.images[picks] / 16.0).float().unsqueeze(1)
        scaled = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False).squeeze(1).numpy()
        images = np.zeros((count, 28, 28), dtype=np.float32)
        rows, cols = rng.integers(0, 9, count), rng.integers(0, 9, count)
        for i in range(count):
            images[i, rows[i]:rows[i] + 20, cols[i]:cols[i] + 20] = scaled[i]
        images = images * rng.uniform(0.7, 1.0, (count, 1, 1)) + rng.normal(0, 0.03, images.shape)
        return (255 * images.clip(0, 1)).round().astype(np.uint8), digits.target[picks].astype(np.uint8)

    folder = Path(folder)
    train_images, train_labels = draw(slice(0, 1500), train)
    test_images, test_labels = draw(slice(1500, None), test)
    for name, array in (("train-images-idx3-ubyte", train_images), ("train-labels-idx1-ubyte", train_labels),
                        ("t10k-images-idx3-ubyte", test_images), ("t10k-labels-idx1-ubyte", test_labels)):
        write_idx(folder / name, array)
    return folder


def mnist_sampling(data_dir: Path, tiny: bool, stem: Optional[Path] = None) -> None:
    """The sampling grid's rows on MNIST read from local IDX files (28x28), written to STEM_mnist.md and
    .json (not with `tiny`)."""
    grid = [(20, 4)] if tiny else [(100, 10), (1000, 10), (1000, 100)]
    rows = [time_sampled(registered, per_round, 2 if tiny else SAMPLING_ROUNDS, "mnist", str(data_dir), 28)
            for registered, per_round in grid]
    lines = ["# Client sampling on MNIST from local files", "",
             f"`python -m benchmarks.scaling --mnist-dir {data_dir}`: {rows[0]['rounds']} rounds, 1 local epoch, "
             "FedAvg, 2 malicious among the registered, 28x28, small CNN; the data set read from MNIST's four IDX "
             "files in the folder (60,000 train images: 60 per client at 1,000 clients). The files here were written "
             "by `--write-mnist-standin` (scikit-learn's digits drawn into MNIST's format and size: no MNIST can be "
             "downloaded on this machine), so the figures are the engine's cost on a data set of MNIST's size, not "
             "accuracy. Memory as in scaling.md.", "",
             ] + sampling_table(rows)
    print("\n".join(lines))
    if not tiny and stem is not None:
        atomic_write_text(out_file(stem, "_mnist.md"), "\n".join(lines) + "\n")
        atomic_write_json(out_file(stem, "_mnist.json"), {"rows": rows, "cpus": os.cpu_count(),
                                                          "torch": torch.__version__})
        print(f"wrote {out_file(stem, '_mnist.md')} and .json")


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="one small setting each, printed, not written")
    parser.add_argument("--mnist-dir", type=Path, default=None,
                        help="instead: the sampling rows on MNIST read from the IDX files in this folder "
                             "(written to STEM_mnist.md and .json)")
    parser.add_argument("--write-mnist-standin", action="store_true",
                        help="with --mnist-dir: first write MNIST-format files drawn from the digits set there")
    add_out_argument(parser, "scaling")
    args = parser.parse_args()
    if args.mnist_dir is not None:
        if args.write_mnist_standin:
            write_mnist_standin(args.mnist_dir, *((600, 100) if args.tiny else ()))
        mnist_sampling(args.mnist_dir, args.tiny, None if args.tiny else out_stem(args))
        return
    grid = [(4, 2)] if args.tiny else FEDERATED_GRID
    federated = [time_federated(c, r, local_epochs=1 if args.tiny else 2) for c, r in grid]
    sampled = [time_sampled(registered, per_round, 2 if args.tiny else SAMPLING_ROUNDS)
               for registered, per_round in ([(20, 4)] if args.tiny else SAMPLING_GRID)]
    sizes = (8,) if args.tiny else IMAGE_SIZES
    dhbe = [time_dhbe(size, 2 if args.tiny else 20, 16 if args.tiny else 128) for size in sizes]
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    lines = [f"# Scaling ({machine['cpus']} CPUs, torch {machine['torch']})", "",
             "Federated simulation, digits 16x16, small CNN, 2 local epochs, FedAvg, min(2, clients // 4) malicious clients, no purification "
             "(fresh Ray each run, start included):", "",
             "| clients | rounds | wall s | s per round | final ACC % | final ASR x1 % |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['rounds']} | {r['wall_s']} | {r['s_per_round']} | {100 * r['acc']:.1f} | "
              f"{100 * r['asr_x1']:.1f} |" for r in federated]
    lines += ["", f"Client sampling (`--sample`), {sampled[0]['rounds']} rounds, 1 local epoch, FedAvg, 2 malicious among the "
              "registered; server peak RSS is this process's (it grows over the runs of this script), workers' the Ray "
              "workers' resident memory together at its peak. On digits 1,000 clients hold 1-2 images each: a client "
              "whose partition is one image takes no step (batch norm needs two samples per batch) and returns the "
              "global model, so the point is the engine's cost, not accuracy. The same rows on MNIST read from local "
              "files (60 images per client at 1,000): scaling_mnist.md.", "",
              ] + sampling_table(sampled)
    lines += ["", "DHBE, CPU recipe (batch 128, 5 student steps per iteration), small CNN, against image size:", "",
              "| image | iterations/s | recipe iterations | recipe estimate s (incl. Gp warm-up) |", "|---|---|---|---|"]
    lines += [f"| {r['image_size']}x{r['image_size']} | {r['it_per_s']} | {r['recipe_iterations']} | "
              f"{r['recipe_seconds_estimate']:.0f} |" for r in dhbe]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.tiny:
        stem = out_stem(args)
        atomic_write_json(out_file(stem, ".json"), {"federated": federated, "sampled": sampled, "dhbe": dhbe, "machine": machine})
        atomic_write_text(out_file(stem, ".md"), text)
        print(f"wrote {out_file(stem, '.md')} and .json")


if __name__ == "__main__":
    main()
