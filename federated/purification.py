"""The server-side purification hook: wraps any Flower strategy and purifies the aggregated global
model with the DHBE Ray Train job every K rounds and/or after the final round: the scan first, then,
when it finds a backdoor, the erasing game (a clean verdict hands the model back unchanged).

In your own ServerApp (a runnable quickstart-style app is examples/hook_quickstart.py, and
tests/test_purify_hook.py runs it):

    from flwr.serverapp.strategy import FedAvg
    from defense.spec import InputSpec
    from federated.purification import PurifyingStrategy

    spec = InputSpec(channels=1, height=8, width=8, num_classes=10, mean=(0.3,), std=(0.3,))
    strategy = PurifyingStrategy(FedAvg(), model_name="small-cnn", spec=spec, final_round=num_rounds)
    result = strategy.start(grid, initial_arrays, num_rounds)     # as before

`model_name` names a network in `defense.models.MODELS`; to purify your own network, register its
factory (a function of the InputSpec) once, before building the strategy:

    from defense.models import MODELS

    @MODELS.register("my-net")
    def my_net(spec: InputSpec) -> torch.nn.Module: ...

Inside a Flower simulation, Flower owns the Ray runtime and its client actors hold every CPU, so a
purification job started there asks for zero CPUs (it shares the cores instead of waiting for ever)
and for the simulation's reserved "server_job" slot (`python -m federated.simulate` adds one) or a
little memory (`flwr run .`, whose Ray options cannot add one): see deploy.ray_job.shared_ray_resources.
On the deployment engine the ServerApp has no Ray, and the job starts its own (or joins RAY_ADDRESS).
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Strategy

from defense.dhbe import DEFAULT_RECIPE, Recipe, recipe_config
from defense.errors import ConfigError
from defense.modelio import LoadedModel, load_model
from defense.models import MODELS, build_model
from defense.spec import InputSpec
from deploy.ray_job import PurifyJobConfig, PurifyResult, run_purify_job
from federated.apps import arrays_to_model, model_to_arrays
from defense.scan.versions import EARLIER_VERSIONS, earlier_rounds, round_model_file  # noqa: F401
from federated.run_folder import evidence_line
from federated.strategies import DelegatingStrategy

class GlobalModelHistory:
    """The aggregated global models of the rounds since the last purification, at most `keep` of them:
    when full, every other one is dropped and from then on only every other round is kept (so any
    number of rounds fits, evenly spaced)."""

    def __init__(self, keep: int = 16) -> None:
        self.keep, self.stride = keep, 1
        self.models: dict[int, ArrayRecord] = {}

    def add(self, server_round: int, arrays: ArrayRecord) -> None:
        if server_round % self.stride:
            return
        self.models[server_round] = ArrayRecord(arrays.to_torch_state_dict())   # a copy, not a view
        while len(self.models) > self.keep:
            self.stride *= 2
            self.models = {r: a for r, a in self.models.items() if r % self.stride == 0}

    def earlier(self, server_round: int) -> list[ArrayRecord]:
        return [self.models[r] for r in earlier_rounds(server_round, self.models)]

    def clear(self) -> None:
        self.models, self.stride = {}, 1


def purify_arrays(arrays: ArrayRecord, model_name: str, spec: InputSpec, job: PurifyJobConfig,
                  out: Path, earlier: Iterable[ArrayRecord] = ()) -> tuple[ArrayRecord, PurifyResult]:
    loaded = [LoadedModel(arrays_to_model(build_model(model_name, spec), a).eval(), model_name, spec, {},
                          weights_sha256="in-memory global model") for a in (*earlier, arrays)]
    result = run_purify_job(loaded[-1], job, out, earlier=loaded[:-1])
    return model_to_arrays(result.model), result


class PurifyingStrategy(DelegatingStrategy):
    """Purifies the aggregated model after rounds `every`, 2*`every`, ... and after `final_round`;
    the purified model becomes the next round's global model (or the final one). `out_dir`: where the
    purified model files are kept (default: none kept; each job works in a temporary folder that is
    removed when its model has been read back)."""

    def __init__(self, inner: Strategy, model_name: str, spec: InputSpec, every: int = 0,
                 final_round: Optional[int] = None, recipe: Optional[Recipe] = None,
                 out_dir: Optional[Path] = None, share_running_ray: bool = True, progress: bool = True) -> None:
        super().__init__(inner)
        self.progress = progress   # the job's per-epoch lines
        MODELS.get(model_name)   # an unknown network is refused now, not at the purification round
        if every < 0 or (final_round is not None and final_round < 1) or (every == 0 and final_round is None):
            raise ConfigError(f"PurifyingStrategy purifies nothing with every={every}, final_round={final_round}; "
                              "give every >= 1 and/or final_round >= 1")
        self.model_name, self.spec, self.every, self.final_round = model_name, spec, every, final_round
        self.recipe = recipe or recipe_config(DEFAULT_RECIPE)
        self.recipe.validate_for(spec)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.share_running_ray = share_running_ray
        self.purifications: list[dict] = []
        self.history = GlobalModelHistory()   # earlier global models, for the scan

    def due(self, server_round: int) -> bool:
        return (self.every > 0 and server_round % self.every == 0) or server_round == self.final_round

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        if not self.due(server_round):
            if self.recipe.scan is not None:   # only the scan reads earlier global models
                self.history.add(server_round, arrays)
            return arrays, metrics
        started = time.perf_counter()
        job = PurifyJobConfig(recipe=self.recipe, share_running_ray=self.share_running_ray, progress=self.progress)
        with contextlib.ExitStack() as stack:
            folder = self.out_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="purified-")))
            arrays, result = purify_arrays(arrays, self.model_name, self.spec, job,
                                           folder / f"purified-round-{server_round:03d}", self.history.earlier(server_round))
        print(f"round {server_round}: {evidence_line(result.evidence)}", flush=True)
        self.history.clear()   # the purified model starts a new line of global models
        self.purifications.append({"round": server_round, "model": str(result.manifest_path) if self.out_dir else None,
                                   "wall_s": time.perf_counter() - started, "evidence": result.evidence})
        return arrays, metrics


class FederatedPurification:
    """What `python -m federated.simulate` plugs in: in-run purification every K rounds, and the
    final purification with a before/after report once the simulation has released Ray."""

    def __init__(self, config, run, spec: InputSpec, recipe: Recipe, every: int = 0,
                 budget_s: Optional[float] = None) -> None:
        self.config, self.run, self.spec, self.every, self.budget_s = config, run, spec, every, budget_s
        self.recipe = recipe

    def wrap(self, strategy: Strategy) -> Strategy:
        if self.every <= 0:
            return strategy
        return PurifyingStrategy(strategy, self.config.model, self.spec, every=self.every, recipe=self.recipe,
                                 out_dir=self.run.root / "models", progress=not self.run.quiet)

    def finish(self) -> list[dict]:
        from defense.scenario import model_file_scenario

        self.run.check_still_there()   # a folder removed during the run is not recreated by the job's outputs
        backdoored = load_model(self.run.root / "final.json")
        earlier = self.earlier_global_models()
        print(f"purifying the global model with DHBE on Ray Train ({self.recipe.dhbe.iterations} iterations; "
              f"{self.recipe.describe()}; {len(earlier)} earlier global models as evidence) ...", flush=True)
        job = PurifyJobConfig(recipe=self.recipe, budget_s=self.budget_s, share_running_ray=True, progress=not self.run.quiet)
        result = run_purify_job(backdoored, job, self.run.root / "purified", earlier=earlier)
        # the experimenter's measuring stick: the global model's experiment record (its trigger and target)
        scenario = model_file_scenario(self.run.root / "final.json", data_dir=self.config.data_dir)
        before, after = scenario.evaluate(backdoored.model), scenario.evaluate(result.model)
        print(evidence_line(result.evidence), flush=True)
        self.run.add_evidence(result.evidence)
        rows = [{"model": "global (after training)", **before},
                {"model": f"purified (DHBE, {result.wall_s:.0f} s)", **after}]
        self.run.add_purification(before, after, result.wall_s)
        plot_before_after(rows, self.run.root / "purification.png")
        from federated.run_folder import comparison_table

        print("\n".join(comparison_table(rows)))
        print(f"purification {self.run.bar}", flush=True)
        return rows

    def earlier_global_models(self) -> list[LoadedModel]:
        """The run's global models at 1/4, 1/2 and 3/4 of its rounds (from its models/ folder) when the
        recipe has a scan to weigh them; with in-run purification, of the rounds since the last one."""
        if self.recipe.scan is None:
            return []
        last = len(self.run.rows)   # every recorded round has its model file (RunFolder.record_round)
        since = ((last - 1) // self.every) * self.every if self.every > 0 else 0
        return [load_model(round_model_file(self.run.root, r))
                for r in earlier_rounds(last, range(since + 1, last))]


def federated_purification(config, run, spec: InputSpec, every: int = 0, budget_s: Optional[float] = None,
                           recipe: Optional[Recipe] = None) -> FederatedPurification:
    """The hook `federated.simulate` plugs in (`recipe`: default the default recipe, seeded by the run)."""
    recipe = recipe or purification_recipe(DEFAULT_RECIPE, {}, config.seed)
    recipe.validate_for(spec)
    return FederatedPurification(config, run, spec, recipe, every, budget_s)


def purification_recipe(name: str, overrides: dict, seed: int) -> Recipe:
    """The recipe a federated run purifies with: `name` seeded by the run, then the user's overrides."""
    return recipe_config(name, {"seed": seed, **overrides})


def plot_before_after(rows: list[dict], path: Path) -> None:
    """Grouped bars of every tabled metric (ACC, ASR x1/x4/x9, RA) per model, each bar labelled with
    its value (a 0.6% bar is otherwise invisible), the legend below the axes (never over a bar)."""
    from defense.report import figure

    keys = [("acc", "ACC"), ("asr_x1", "ASR x1"), ("asr_x4", "ASR x4"), ("asr_x9", "ASR x9"), ("ra", "RA")]
    width = 0.8 / len(rows)
    with figure(path, figsize=(7, 4)) as ax:
        for i, row in enumerate(rows):
            bars = ax.bar([k + i * width for k in range(len(keys))], [100 * (row.get(key) or 0) for key, _ in keys],
                          width=width, label=row["model"])
            ax.bar_label(bars, labels=[f"{100 * row[key]:.1f}" if row.get(key) is not None else "n/a" for key, _ in keys],
                         fontsize=7, padding=1)
        ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(keys))], [label for _, label in keys])
        ax.set_title("Before and after purification (%)", fontsize=10)
        ax.set_ylabel("%"), ax.set_ylim(0, 112), ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(rows), frameon=False)
