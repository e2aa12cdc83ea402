"""DHBE as a Ray Train job (TorchTrainer): GPU when Ray sees one, CPU otherwise; data-parallel over
K workers (gloo on CPU); a checkpoint every epoch so a failed worker resumes where it stopped.

On a fresh local Ray by default; on an existing cluster when RAY_ADDRESS (or `address`) names one.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from defense.dhbe import DHBETrainer, EpochRecord, Recipe, scanned_trainer, train_epochs
from defense.dhbe.parallel import SINGLE_PROCESS, DataParallel, require_even_split
from defense.errors import ConfigError, shown
from defense.modelio import LoadedModel, load_model, save_model
from defense.scan.versions import check_earlier_versions
from defense.spec import InputSpec, require

STATE_FILE = "trainer_state.pt"
RESULT_NAME = "purified"
# A custom Ray resource that a Flower simulation started by `federated.simulate` reserves and no
# client actor claims: server-side jobs (in-run purification) run on it instead of waiting for CPUs.
SERVER_JOB_RESOURCE = "server_job"


def quiet_ray_environment() -> None:
    """Ray's usage stats, log dedup and Train v2 migration warnings: nothing a user can act on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray Data's own deprecation notices, raised inside Ray when Train starts: not the user's code
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data(\..*)?")


def protect_local_ray() -> None:
    """A Ray this project starts on this machine (deploy's, Tune's, Flower's simulation backend)
    requires Ray's token authentication with a fresh random token held only by this process and
    the Ray processes it starts. Ray 2.55 cannot be told to listen on loopback alone: its GCS,
    raylet and workers bind every interface, and `ray.init` replaces 127.0.0.1 with the node's
    address (ray._private.services.resolve_ip_for_localhost); with the token, a process on the
    network that connects is refused. A user's own cluster (RAY_ADDRESS) keeps its own settings.
    Ray reads the setting when it is first imported: call this before any `import ray`."""
    if os.environ.get("RAY_ADDRESS") or "ray" in sys.modules:
        return   # a user's cluster; or Ray already read its settings in this process (they must agree)
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@dataclass
class PurifyJobConfig:
    recipe: Recipe
    workers: int = 1
    use_gpu: Optional[bool] = None          # None: a GPU if the cluster has one
    address: Optional[str] = None           # None: RAY_ADDRESS, else a fresh local Ray
    storage_path: Optional[str] = None      # None: a hidden folder beside the output
    keep_checkpoints: bool = False          # False: the job's checkpoints are removed once it succeeds
    name: Optional[str] = None              # reusing a name resumes that run
    max_failures: int = 2
    cpus_per_worker: Optional[float] = None  # None: the cluster's CPUs shared among the workers
    budget_s: Optional[float] = None        # stop after the epoch in which this much time has passed
    extra_resources: dict = field(default_factory=dict)  # e.g. the simulation's server-job slot
    share_running_ray: bool = False         # inside a Ray someone else owns: take no CPU (see below)
    progress: bool = True                   # a line per epoch on stdout while the job runs (ProgressLines)

    def __post_init__(self) -> None:
        require(isinstance(self.recipe, Recipe), "the purification job needs a DHBE Recipe")
        require(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        require_even_split(self.recipe.dhbe.batch_size, self.workers)   # before Ray starts
        require(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        require(self.cpus_per_worker is None or self.cpus_per_worker >= 0, "cpus per worker must be >= 0")
        require(self.budget_s is None or self.budget_s > 0, "the time budget must be > 0 seconds")
        require(self.name is None or job_name_ok(self.name), f"{JOB_NAME_RULE}, got {shown(self.name)}")


JOB_NAME_RULE = "a job name is 1-100 letters, digits, '.', '_' or '-' (not '.' or '..')"


def job_name_ok(name: str) -> bool:
    """A job's name names its checkpoint folder (which a successful job removes): a plain name only."""
    return re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name) is not None and name not in (".", "..")


AfterEpoch = Callable[[EpochRecord, DHBETrainer, dict], None]


def train_loop_per_worker(loop_config: dict[str, Any], after_epoch: Optional[AfterEpoch] = None) -> None:
    """Runs on every Ray Train worker. `after_epoch(record, trainer, loop_config)` runs once an epoch's
    checkpoint is reported (tests plant faults there, inside the worker process)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    run_dhbe_loop(loop_config, report=ray.train.report, get_checkpoint=ray.train.get_checkpoint,
                  checkpoint_type=ray.train.Checkpoint, rank=context.get_world_rank(),
                  world=context.get_world_size(), device=ray.train.torch.get_device(), after_epoch=after_epoch)


def run_dhbe_loop(loop_config: dict[str, Any], report: Callable, get_checkpoint: Callable, checkpoint_type: Any,
                  rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                  evaluator: Optional[Callable[[torch.nn.Module], dict]] = None,
                  after_epoch: Optional[AfterEpoch] = None) -> None:
    """The DHBE job body, shared by Ray Train workers (deploy) and Ray Tune trials (tuning):
    resume from the last checkpoint, run the epoch loop, report metrics and a checkpoint after each."""
    from defense.models import MODELS

    torch.set_num_threads(max(1, int(loop_config["threads"])))
    spec = InputSpec.from_dict(loop_config["spec"])
    # the driver's own factory (a model the user registered in their app's process is not in a worker's registry)
    build = loop_config.get("model_factory") or MODELS.get(loop_config["model_name"])
    teacher = build(spec)
    teacher.load_state_dict(loop_config["teacher_state"])
    earlier = []
    for state in loop_config.get("earlier_states", []):
        earlier.append(build(spec))
        earlier[-1].load_state_dict(state)
    recipe = Recipe.from_dict(loop_config["recipe"])
    # the stages: the scan (replicated in every worker: the same seed, the same report), then the game;
    # K workers play one game: the same seed, each on its slice of the batch (defense/dhbe/parallel.py)
    if rank == 0 and recipe.scan is not None:
        tell(loop_config, f"scan: {len(earlier) + 1} version(s) of the model ...")
    trainer = scanned_trainer(teacher, spec, recipe, device, earlier, DataParallel(device) if world > 1 else SINGLE_PROCESS)

    checkpoint = get_checkpoint()
    resumed_from_epoch = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
        trainer.load_state_dict(state)   # rank 0's state, random streams included: every worker's own
        resumed_from_epoch = trainer.epoch

    def report_epoch(record: EpochRecord, trainer: DHBETrainer, last: bool) -> None:
        metrics = {**record.as_row(), "final_epoch": last, "rank": rank}
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                torch.save(trainer.state_dict(), Path(folder) / STATE_FILE)
                if last:
                    save_model(trainer.output_model().cpu(), Path(folder) / RESULT_NAME, loop_config["model_name"], spec,
                               loop_config["produced_by"], {"history": [asdict(r) for r in trainer.history],
                                                            "resumed_from_epoch": resumed_from_epoch,
                                                            "evidence": trainer.evidence()})
                    trainer.output_model().to(device)
                report_checkpoint = checkpoint_type.from_directory(folder)
            report(metrics, checkpoint=report_checkpoint)
        if rank == 0:
            tell(loop_config, epoch_line(record, trainer.config.epochs))
        if after_epoch is not None:
            after_epoch(record, trainer, loop_config)

    train_epochs(trainer, evaluator, report_epoch, loop_config["budget_s"])


def job_loop_config(teacher: LoadedModel, recipe: Recipe, threads: int, storage: Path, name: str,
                    budget_s: Optional[float] = None, produced_by: Optional[dict] = None,
                    earlier: Sequence[LoadedModel] = ()) -> dict[str, Any]:
    """Everything the job body needs, as data Ray can ship to workers: plain data, and the registry's
    factory of the model (a function of this process; Ray pickles it driver to worker, nothing from outside)."""
    from defense.models import MODELS

    return {
        "spec": teacher.spec.to_dict(), "model_name": teacher.model_name, "model_factory": MODELS.get(teacher.model_name),
        "teacher_state": {k: v.cpu() for k, v in teacher.model.state_dict().items()},
        "earlier_states": [{k: v.cpu() for k, v in model.model.state_dict().items()} for model in earlier],
        "recipe": recipe.to_dict(), "threads": threads, "budget_s": budget_s,
        "storage": str(storage), "run_name": name, "produced_by": produced_by or {},
    }


def connect_ray(address: Optional[str] = None) -> None:
    """Join RAY_ADDRESS / `address` when given, else start a local Ray sized to this machine."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        protect_local_ray()
    import ray

    quiet_ray_environment()
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


def worker_resources(cpus: float, use_gpu: bool, extra: dict) -> dict:
    """Ray resources of one worker; a zero CPU request is left out (Ray refuses all-zero bundles)."""
    resources = {"CPU": cpus} if cpus > 0 else {}
    if use_gpu:
        resources["GPU"] = 1
    resources.update(extra)
    return resources


SHARED_JOB_MEMORY = 256 * 2**20  # bytes; a non-zero resource for a job that takes no CPU


def shared_ray_resources() -> dict:
    """Resources of a job that runs inside a Ray whose CPUs someone else holds (Flower's simulation:
    its client actors claim every CPU): no CPU, so it shares the cores instead of waiting for ever,
    plus the simulation's reserved server-job slot when there is one (`python -m federated.simulate`)
    or else a little memory (`flwr run .`, whose Ray we cannot configure), since Ray refuses
    all-zero bundles."""
    import ray

    if ray.cluster_resources().get(SERVER_JOB_RESOURCE, 0) >= 1:
        return {SERVER_JOB_RESOURCE: 1.0}
    return {"memory": SHARED_JOB_MEMORY}


def tell(loop_config: dict, line: str) -> None:
    """A progress line for the driver (ProgressLines), sent and forgotten: a lost queue never fails the job."""
    queue = loop_config.get("progress")
    if queue is not None:
        with contextlib.suppress(Exception):
            queue.actor.put_nowait.remote(line)


def ship_model_code(model_name: str) -> None:
    """A network the user registered in their own module (not this project's) goes to the workers by
    value: a worker cannot import a module from the user's app folder or, on a cluster, from this machine."""
    from ray import cloudpickle

    from defense.models import MODELS

    module = sys.modules.get(MODELS.get(model_name).__module__)
    if module is not None and module.__name__.split(".")[0] not in ("defense", "deploy", "federated", "tuning", "__main__"):
        cloudpickle.register_pickle_by_value(module)


def checkpoint_storage(out: Path, storage_path: Optional[str] = None) -> Path:
    """Where a purification's Ray Train checkpoints live: `storage_path`, else a hidden folder beside
    the output (`.OUT.checkpoints`), never a shared /tmp."""
    return Path(storage_path or out.parent / f".{out.name}.checkpoints").resolve()


def epoch_line(record: EpochRecord, epochs: int) -> str:
    """One progress line: the epoch and the data-free signals a defender can watch."""
    return (f"epoch {record.epoch}/{epochs}: synthetic agreement with the input {100 * record.synthetic_agreement:.0f}%, "
            f"Gp's strongest patch flips {100 * record.trigger_flip_rate:.0f}% of the student's labels, "
            f"{record.seconds:.1f} s")


class ProgressLines:
    """The job's progress on the driver while `fit()` blocks: rank 0 puts one line per epoch into a Ray
    queue (an actor holding no CPU, so it also runs inside Flower's simulation), a daemon thread here
    prints them as `purify: ...`, one plain line each (no carriage returns: a log file reads as a
    terminal does). Ray's own worker output stays off (`log_to_driver=False`)."""

    def __init__(self, loop_config: Optional[dict]) -> None:
        self.loop_config, self.queue, self.thread = loop_config, None, None
        self.done = threading.Event()

    def __enter__(self) -> "ProgressLines":
        if self.loop_config is None:
            return self
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.loop_config["progress"] = self.queue
        self.thread = threading.Thread(target=self._print, daemon=True, name="purify-progress")
        self.thread.start()
        return self

    def _print(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                print(f"purify: {self.queue.get(timeout=0.5)}", flush=True)
            except Empty:
                if self.done.is_set():
                    return
            except Exception:   # the queue is gone (Ray shut down): stop printing, never fail the job
                return

    def __exit__(self, *exc) -> None:
        if self.queue is None:
            return
        self.done.set()
        self.thread.join(timeout=5)
        self.loop_config.pop("progress", None)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


@dataclass
class PurifyResult:
    model: torch.nn.Module
    manifest_path: Path
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    device: str = "cpu"
    resumed_from_epoch: int = 0
    evidence: dict = field(default_factory=dict)   # what the data-free probes found (also in the manifest)


def run_purify_job(teacher: LoadedModel, job: PurifyJobConfig, out: Path,
                   train_loop: Callable[[dict], None] = train_loop_per_worker,
                   earlier: Sequence[LoadedModel] = ()) -> PurifyResult:
    """Purify `teacher` with DHBE on Ray Train; writes `out` (.safetensors + .json) atomically.
    `earlier`: earlier versions of the model, oldest first (a federated run's earlier global models),
    which the scan weighs; `train_loop` is the worker body (tests pass one that plants a fault
    inside the worker)."""
    check_earlier_versions(teacher, earlier)
    if job.address is None:
        protect_local_ray()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job.recipe.validate_for(teacher.spec)
    started = time.perf_counter()
    sharing_ray = ray.is_initialized()
    connect_ray(job.address)
    use_gpu = job.use_gpu if job.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    if use_gpu and ray.cluster_resources().get("GPU", 0) < job.workers:
        raise ConfigError(f"--gpu asks for {job.workers} GPU worker(s) but the Ray cluster has "
                          f"{int(ray.cluster_resources().get('GPU', 0))} GPU(s)")
    cpus = ray.cluster_resources().get("CPU", 1)
    share = max(cpus / job.workers, 0.01)
    cpus_per_worker = share if job.cpus_per_worker is None else min(job.cpus_per_worker, share)
    extra_resources = dict(job.extra_resources)
    if job.share_running_ray and sharing_ray:
        cpus_per_worker = 0.0
        extra_resources.update(shared_ray_resources())
    # checkpoints (weights inside) beside the output, not in a shared /tmp; removed on success
    storage = checkpoint_storage(out, job.storage_path)
    name = job.name or f"dhbe-{uuid.uuid4().hex[:8]}"
    loop_config = job_loop_config(
        teacher, job.recipe, max(1, int(share)), storage, name, job.budget_s,
        {"tool": "deploy.purify", "defence": "dhbe", "input_model": teacher.model_name,
         "input_weights_sha256": teacher.weights_sha256, "recipe": job.recipe.to_dict(),
         "earlier_weights_sha256": [model.weights_sha256 for model in earlier],
         "workers": job.workers, "gpu": bool(use_gpu)}, earlier)
    ship_model_code(teacher.model_name)
    with ProgressLines(loop_config if job.progress else None):   # before the trainer holds the config
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=use_gpu,
                                         resources_per_worker=worker_resources(cpus_per_worker, use_gpu, extra_resources)),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=job.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"the purification job failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("the purification job ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        produced = load_model(Path(folder) / f"{RESULT_NAME}.json")
        extra = produced.manifest.get("extra", {})
        # the input's experiment record goes along as metadata (the job itself never sees it)
        manifest_path = save_model(produced.model, out, produced.model_name, produced.spec,
                                   produced.manifest["produced_by"], extra, teacher.manifest.get("experiment"))
    if not job.keep_checkpoints:
        shutil.rmtree(storage / name, ignore_errors=True)
        if job.storage_path is None:
            shutil.rmtree(storage, ignore_errors=True)
    return PurifyResult(produced.model, manifest_path, extra.get("history", []), time.perf_counter() - started,
                        "gpu" if use_gpu else "cpu", int(extra.get("resumed_from_epoch", 0)), extra.get("evidence", {}))
