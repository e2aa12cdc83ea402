"""The run folder: config, per-round models and metrics, final model, summary with a plot.

Everything is written atomically (temporary name, then rename); `status.json` says whether the run
completed, so an interrupted run is recognisable and never leaves a half-written file."""
from __future__ import annotations

import contextlib
import datetime as dt
import math
from pathlib import Path
from typing import Any, Optional

import torch

from defense.fileio import atomic_path, atomic_write_json, atomic_write_text
from defense.errors import ConfigError, shown
from defense.modelio import LoadedModel, load_model, read_json_object, save_model
from defense.dhbe.loop import evidence_line  # noqa: F401  (the run's one line on the evidence)
from defense.scan.versions import round_model_file
from defense.report import figure, markdown_table
from defense.spec import InputSpec

ROUND_COLUMNS = ["round", "acc", "asr_x1", "asr_x4", "asr_x9", "asr_all_x1", "ra", "clients_sampled", "clients_trained",
                 "client_failures", "client_timeouts", "updates_rejected", "malicious_clients", "updates_excluded",
                 "malicious_excluded", "wall_time_s"]
INT_COLUMNS = ("round", "clients_sampled", "clients_trained", "client_failures", "malicious_clients", "epoch", "trial",
               "updates_rejected", "client_timeouts", "updates_excluded", "malicious_excluded", "lifespan_rounds")


def fresh_run_dir(base: str | Path = "runs") -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"sim-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(base) / f"sim-{stamp}-{suffix}"
    return path


def _read_json(path: Path, name: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path.parent} is not a run folder: no {name}")
    return read_json_object(path, name)


def _fmt(value: Any) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:5.1f}"


def write_parquet(path: Path, rows: list[dict], columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = {c: [row.get(c) for row in rows] for c in columns}
    schema = pa.schema([(c, pa.int64() if c in INT_COLUMNS else pa.bool_() if c == "lifespan_censored" else pa.float64())
                        for c in columns])
    table = pa.Table.from_pydict({c: [None if v is None else v for v in data[c]] for c in columns}, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _refuse_links(root: Path) -> None:
    """A folder to resume is read and written in place: it and its `models/` must be real folders and
    hold no links, or a crafted folder could make resume read or delete files elsewhere."""
    if not root.is_dir() or root.is_symlink():
        raise ConfigError(f"{root} is not a run folder (not a plain folder)")
    models = root / "models"
    if models.is_symlink() or (models.exists() and not models.is_dir()):
        raise ConfigError(f"{root}: models is not a plain folder inside the run (a link or a file); refusing to resume")
    for folder in (root, models) if models.exists() else (root,):
        for entry in folder.iterdir():
            if entry.is_symlink():
                raise ConfigError(f"{root}: {entry.relative_to(root)} is a link; a run folder holds none, refusing to resume")


def _check_round_model(path: Path, loaded: LoadedModel, model_name: str, spec: InputSpec,
                       experiment: Optional[dict]) -> None:
    """A round model of the run being resumed must be of the run's network and input spec, and carry the
    run's experiment record (an A3FL run's record differs only in the trigger values it learned)."""
    if loaded.model_name != model_name:
        raise ConfigError(f"{path} holds a {loaded.model_name}, the run's config a {model_name}")
    if loaded.spec != spec:
        differs = [k for k, v in spec.to_dict().items() if loaded.spec.to_dict().get(k) != v]
        raise ConfigError(f"{path} is for another input spec than the run's config ({', '.join(differs) or 'spec'} differ)")
    record = loaded.manifest.get("experiment")
    if experiment is not None and record is not None:
        from defense.experiment import Experiment

        # both through the record's one reader: an older file lacking a newer field reads as its default
        mine = {k: v for k, v in Experiment.from_dict(experiment).to_dict().items() if k != "patch_values"}
        theirs = {k: v for k, v in Experiment.from_dict(record, f"{path}'s experiment record").to_dict().items()
                  if k != "patch_values"}
        differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differs:
            raise ConfigError(f"{path}: its experiment record differs from the run's config in {', '.join(differs[:5])[:200]}")


class RunFolderLost(OSError):
    """The run folder (its config.json) disappeared while the run was writing into it."""


class RunFolder:
    def __init__(self, root: Path, config: dict, model_name: str, spec: InputSpec, quiet: bool = False,
                 experiment: Optional[dict] = None, fresh: bool = True) -> None:
        """`fresh`: a new run folder (config.json and status.json written now); `reopen` passes False."""
        self.root, self.model_name, self.spec, self.quiet = root, model_name, spec, quiet
        self.experiment = experiment  # written into every model file's manifest
        self.evidence: Optional[dict] = None
        self.lifespan: Optional[dict] = None
        self.bar: Optional[str] = None       # the purification against the project's bar (the attack known)
        self.failure: Optional[str] = None   # why the run cannot complete (set by the server)
        self.state = "running"
        self.config, self.progress = config, None
        self.rows: list[dict] = []
        self.extra_columns: list[str] = []
        if fresh:
            created = [p for p in (root, root / "models") if not p.exists()]
            try:
                (root / "models").mkdir(parents=True, exist_ok=True)
                atomic_write_json(root / "config.json", config)
                self.set_status("running")
            except OSError:   # e.g. a full disk: leave no half-made run folder behind
                (root / "config.json").unlink(missing_ok=True)
                for folder in reversed(created):
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise

    @classmethod
    def reopen(cls, root: Path, model_name: str, spec: InputSpec, quiet: bool = False,
               experiment: Optional[dict] = None) -> tuple["RunFolder", Optional[LoadedModel]]:
        """An interrupted run folder, to go on from its last saved round: the rows of metrics.parquet up
        to the last round whose model file loads and verifies (hash, finite weights), and that round's
        model (None: no round was saved). Later rows and files are dropped. Raises ConfigError for a
        folder that is complete or whose files do not fit one another."""
        import pyarrow.parquet as pq

        _refuse_links(root)
        status = _read_json(root / "status.json", "status.json")
        if status.get("state") == "complete":
            raise ConfigError(f"{root} holds a complete run: nothing to resume")
        config = _read_json(root / "config.json", "config.json")
        rows: list[dict] = []
        if (root / "metrics.parquet").exists():
            try:
                rows = pq.read_table(root / "metrics.parquet").to_pylist()
            except Exception as exc:   # a file from outside: any read error is its fault
                raise ConfigError(f"{root / 'metrics.parquet'} is not a readable Parquet table: {exc}"[:300]) from None
        kept, last_model = [], None
        for index, row in enumerate(rows):
            number = row.get("round")
            if number != index + 1:
                raise ConfigError(f"{root / 'metrics.parquet'}: rounds are not 1, 2, ... (row {index} says {shown(number)})")
            path = round_model_file(root, number)
            try:
                loaded = load_model(path)
            except ConfigError:
                break
            _check_round_model(path, loaded, model_name, spec, experiment)
            kept.append({k: v for k, v in row.items() if not k.startswith(("purified_", "purify_", "lifespan_"))})
            last_model = loaded
        run = cls(root, config, model_name, spec, quiet, experiment, fresh=False)
        run.rows = kept
        for stale in (root / "models").glob("round-*"):   # later rounds' files, by the names this class writes
            number, dot, suffix = stale.name[len("round-"):].partition(".")
            if (number.isdigit() and len(number) >= 3 and dot and suffix in ("json", "safetensors")
                    and int(number) > len(kept) and stale.is_file() and not stale.is_symlink()):
                stale.unlink()
        if kept:
            write_parquet(root / "metrics.parquet", kept, ROUND_COLUMNS)
        run.set_status("running", resumed_after_round=len(kept))
        return run, last_model

    def check_still_there(self) -> None:
        """Every write checks that the folder is still this run's: a folder removed during the run is
        not silently recreated (without its config and earlier rounds) and reported complete."""
        if not (self.root / "config.json").is_file():
            import errno

            raise RunFolderLost(errno.ENOENT, "the run folder was removed during the run (its config.json is gone); "
                                "stopped", str(self.root))

    def set_status(self, state: str, **details: Any) -> None:
        self.state = state
        self.check_still_there()
        atomic_write_json(self.root / "status.json", {"state": state, "rounds_done": len(self.rows), **details})

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def record_round(self, row: dict, model: torch.nn.Module) -> None:
        self.check_still_there()
        save_model(model, round_model_file(self.root, row["round"]).with_suffix(""), self.model_name, self.spec,
                   {"tool": "federated.simulate", "round": row["round"]}, experiment=self.experiment)
        self.rows.append(row)   # after its model is saved: rounds_done never counts a round without its model
        write_parquet(self.root / "metrics.parquet", self.rows, ROUND_COLUMNS + self.extra_columns)
        self.set_status("running")
        if not self.quiet:
            from tqdm import tqdm

            self.start_rounds()
            tqdm.write(f"round {row['round']:3d}  acc {_fmt(row['acc'])}  asr x1/x4/x9 {_fmt(row['asr_x1'])}"
                       f" {_fmt(row.get('asr_x4'))} {_fmt(row.get('asr_x9'))}  malicious "
                       f"{row.get('malicious_clients', 0)}  trained {row.get('clients_trained', 0)}  failed "
                       f"{row.get('client_failures', 0)}  {row['wall_time_s']:6.1f}s")
            self.progress.update(1)
            if self.progress.total is not None and self.progress.n >= self.progress.total:
                self.progress.close()

    def start_rounds(self) -> None:
        """The bar over the federated rounds, started when the rounds start (so its clock is right); on a
        terminal only: in a log file the per-round lines alone, without carriage returns."""
        import sys

        from tqdm import tqdm

        if self.progress is None and not self.quiet:
            total = self.config.get("simulation", {}).get("rounds")
            self.progress = tqdm(total=total, initial=len(self.rows), desc="federated rounds", unit="round", leave=False,
                                 disable=not sys.stderr.isatty())

    def write_rejections(self, rejections: list[dict]) -> None:
        """Every rejected client update: round, node and reason."""
        self.check_still_there()
        atomic_write_json(self.root / "rejected_updates.json", rejections)

    def add_purification(self, before: dict, after: dict, wall_s: float) -> None:
        """The purified model's figures, as columns beside the last round's, with DER in both ASR forms:
        `purified_der` from the DHBE form (asr_x1), `purified_der_all` from BackdoorBench's (asr_all_x1),
        the one BackdoorBench's tables use."""
        from defense.metrics import defence_effectiveness_rating

        if not self.rows:
            return
        self.rows[-1].update({f"purified_{k}": after.get(k) for k in ("acc", "asr_x1", "asr_x4", "asr_x9", "ra")})
        self.rows[-1].update({"purified_der": defence_effectiveness_rating(before, after),
                              "purified_der_all": defence_effectiveness_rating(before, after, "asr_all_x1"),
                              "purify_wall_s": wall_s})
        self._add_columns([f"purified_{k}" for k in ("acc", "asr_x1", "asr_x4", "asr_x9", "ra")] +
                          ["purified_der", "purified_der_all", "purify_wall_s"])
        from defense.metrics import bar_outcome

        self.bar = bar_outcome(before, after)[1]
        write_parquet(self.root / "metrics.parquet", self.rows, ROUND_COLUMNS + self.extra_columns)

    def _add_columns(self, columns: list[str]) -> None:
        self.extra_columns += [c for c in columns if c not in self.extra_columns]

    def add_lifespan(self, last_attack_round: int) -> None:
        """The backdoor's lifespan after the last attack (columns beside the last round, and the summary)."""
        if not self.rows or not last_attack_round:
            return
        self.lifespan = backdoor_lifespan(self.rows, last_attack_round)
        self.rows[-1].update(self.lifespan)
        self._add_columns(["lifespan_rounds", "lifespan_censored"])
        write_parquet(self.root / "metrics.parquet", self.rows, ROUND_COLUMNS + self.extra_columns)

    def add_evidence(self, evidence: dict) -> None:
        """What the purification's data-free probes found (evidence.json; a line in the summary)."""
        self.check_still_there()
        self.evidence = evidence
        atomic_write_json(self.root / "evidence.json", evidence)

    def save_final(self, model: torch.nn.Module, name: str = "final", extra: Optional[dict] = None) -> Path:
        self.check_still_there()
        return save_model(model, self.root / f"{name}", self.model_name, self.spec,
                          {"tool": "federated.simulate", "rounds": len(self.rows)}, extra, self.experiment)

    def finish(self, comparison: Optional[list[dict]] = None) -> None:
        self.check_still_there()
        self._plot_rounds()
        lines = ["# Federated run", "", f"Rounds: {len(self.rows)}. Config: `config.json`. Per-round metrics: "
                 "`metrics.parquet`. Final model: `final.json` (+ `.safetensors`).", "", "![ACC and ASR per round](metrics.png)", ""]
        if self.rows:
            last = self.rows[-1]
            lines += [f"After round {last['round']} the global model has ACC {_fmt(last.get('acc')).strip()}% and ASR "
                      f"x1 / x4 / x9 {' / '.join(_fmt(last.get(k)).strip() for k in ('asr_x1', 'asr_x4', 'asr_x9'))}% "
                      "(the trigger stamped 1, 4 or 9 times).", ""]
        if self.lifespan is not None:
            lines += [lifespan_line(self.lifespan), ""]
        if comparison:
            lines += comparison_table(comparison) + [""]
            lines += [f"Purification {self.bar}.", ""] if self.bar else []
            lines += ["![before/after](purification.png)", ""]
        if self.evidence is not None:
            lines += [evidence_line(self.evidence) + " (`evidence.json`)", ""]
        lines += ["ASR is the DHBE form (non-target test images the model classifies correctly when clean).", ""]
        atomic_write_text(self.root / "summary.md", "\n".join(lines))
        self.set_status("complete")

    def _plot_rounds(self) -> None:
        if not self.rows:
            return
        from matplotlib.ticker import MaxNLocator

        with figure(self.root / "metrics.png", figsize=(7, 4)) as ax:
            rounds = [r["round"] for r in self.rows]
            for key, label, style in (("acc", "clean ACC", "-"), ("asr_x1", "ASR x1", "-"), ("asr_x4", "ASR x4", "--"),
                                      ("asr_x9", "ASR x9", ":")):
                ax.plot(rounds, [100 * (r.get(key) or 0) for r in self.rows], style, marker=".", label=label)
            ax.set_title("Global model per round", fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round\nASR x1/x4/x9: the trigger stamped 1/4/9 times; it counts only the non-target images\n"
                          "the model gets right when clean, so while ACC is low it rests on few images", fontsize=8)
            ax.set_ylabel("%"), ax.set_ylim(-2, 102), ax.legend(fontsize=8), ax.grid(alpha=0.3)


ALIVE = 0.5   # the backdoor counts as alive while ASR x1 >= this


def backdoor_lifespan(rows: list[dict], last_attack_round: int) -> dict:
    """Rounds after the last attack round until ASR x1 first falls below 50% (Neurotoxin's durability
    measure). Where it never falls by the last round, the lifespan is censored: at least the rounds run
    since the last attack (`lifespan_censored` True). Where ASR x1 was below 50% at the last attack
    round, no backdoor was alive to outlive it: both are None."""
    at_last = next((row for row in rows if row["round"] == last_attack_round), None)
    if at_last is None or at_last.get("asr_x1") is None or at_last["asr_x1"] < ALIVE:
        return {"lifespan_rounds": None, "lifespan_censored": None}
    after = [row for row in rows if row["round"] > last_attack_round]
    for row in after:
        if row.get("asr_x1") is not None and row["asr_x1"] < ALIVE:
            return {"lifespan_rounds": row["round"] - last_attack_round, "lifespan_censored": False}
    last = rows[-1]["round"] if rows else last_attack_round
    return {"lifespan_rounds": max(last - last_attack_round, 0), "lifespan_censored": True}


def lifespan_line(lifespan: dict) -> str:
    rounds = lifespan["lifespan_rounds"]
    if rounds is None:
        return f"Backdoor lifespan: n/a (ASR x1 was below {100 * ALIVE:.0f}% at the last attack round)."
    if lifespan["lifespan_censored"]:
        return (f"Backdoor lifespan: >= {rounds} rounds after the last attack (censored: ASR x1 stayed >= "
                f"{100 * ALIVE:.0f}% to the last round).")
    return f"Backdoor lifespan: {rounds} rounds after the last attack (ASR x1 fell below {100 * ALIVE:.0f}%)."


def comparison_table(rows: list[dict]) -> list[str]:
    """Markdown table of models side by side (e.g. backdoored vs purified)."""
    return markdown_table(["model", "ACC %", "ASR x1 %", "ASR x4 %", "ASR x9 %", "RA %"],
                          [[row["model"], *(_fmt(row.get(k)) for k in ("acc", "asr_x1", "asr_x4", "asr_x9", "ra"))]
                           for row in rows])

