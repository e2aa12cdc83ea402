"""DHBE's game (Yan et al., AsiaCCS 2023, Algorithm 1), Eq. 8:

    min_S max_{G, Gp}  E_z |S(G(z)) - T(G(z))|_1  +  lambda * E_{z,z'} |S(G(z) + pad(Gp(z'))) - S(G(z))|_1

T is the frozen backdoored teacher, S the student (initialised as a copy of T), G the sample
generator and Gp the trigger generator. One iteration = `student_steps` student updates (the
official code uses 5), one G step (adversarial distillation: G maximises the teacher/student
discrepancy) and one Gp step (adversarial backdoor regularisation: Gp maximises the student's
sensitivity to a small patch).

The defence sees the model and its input spec only: no data set, no trigger, no target class.
`DHBEConfig` holds the official fields only; every departure is an extension (defense/dhbe/extensions/)
asked at the named points of `Extension`; with no extension this is the official loop.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from defense.dhbe.config import DHBEConfig, Recipe
from defense.dhbe.extensions.base import Extension
from defense.dhbe.losses import backdoor_regulariser, distillation_loss, l1, total_variation_l2
from defense.dhbe.parallel import SINGLE_PROCESS, SingleProcess
from defense.dhbe.precision import game_precision, keep_logits_fp32, searches_in_fp32
from defense.errors import ConfigError, DivergenceError
from defense.generators import SampleGenerator, TriggerGenerator, paste_patches
from defense.models import frozen
from defense.scan import ScanReport
from defense.spec import InputSpec


@dataclass
class EpochRecord:
    """Data-free diagnostics a defender can see (no data, no trigger), plus optional evaluation."""

    epoch: int
    iteration: int
    student_updates: int
    loss_student: float
    loss_distill: float
    loss_regulariser: float
    synthetic_agreement: float       # argmax S == argmax T on fresh synthetic samples
    synthetic_discrepancy: float     # L1(S, T) on those samples
    trigger_sensitivity: float       # L1(S(x + Gp patch), S(x)): the strongest trigger Gp found
    trigger_flip_rate: float         # fraction of synthetic samples whose S-label Gp's patch flips
    teacher_flip_rate: float         # the same patch on T: how much of T's backdoor Gp still finds
    student_lr: float
    seconds: float
    recoveries: int = 0
    evaluation: dict = field(default_factory=dict)   # experimenter's ACC/ASR, never used by DHBE

    def as_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "evaluation"}
        row.update({f"eval_{k}": v for k, v in self.evaluation.items()})
        return row


class DHBETrainer:
    """Holds T, S, G, Gp, their optimisers and schedules, and the recipe's extensions; `run_epoch`
    advances training by one epoch. `state_dict`/`load_state_dict` capture everything (RNG
    included) so a job resumes exactly."""

    def __init__(self, teacher: nn.Module, spec: InputSpec, recipe: Recipe | DHBEConfig,
                 device: torch.device | str = "cpu", scan: Optional[ScanReport] = None,
                 parallel: SingleProcess = SINGLE_PROCESS) -> None:
        """`scan`: what the scan stage found on the teacher (defense.scan; `defense.dhbe.scan_stage`
        runs it), read by the extensions that need it (the verdict, the searches), never changed.
        `parallel`: this process's part in a data-parallel game (defense/dhbe/parallel.py); every
        process is built with the same recipe and seed."""
        recipe = recipe if isinstance(recipe, Recipe) else Recipe(recipe)
        recipe.validate_for(spec)
        if scan is None and any(ext.reads_scan for ext in recipe.extensions):
            raise ConfigError("the recipe's game reads the scan's report: run its scan first "
                              "(defense.dhbe.scan_stage) and pass the report as `scan`")
        config = recipe.dhbe
        parallel.check_batch(config.batch_size)
        self.parallel = parallel
        self.recipe, self.config, self.spec, self.device = recipe, config, spec, torch.device(device)
        torch.manual_seed(config.seed)
        self.teacher = copy.deepcopy(teacher).to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = copy.deepcopy(teacher).to(self.device)
        self.student.requires_grad_(True)
        self.scan_report = scan
        self.sample_generator = SampleGenerator(spec, config.latent_dim, config.generator_width).to(self.device)
        if config.channels_last:
            for module in (self.teacher, self.student, self.sample_generator):
                module.to(memory_format=torch.channels_last)
        if config.precision != "fp32":
            for model in (self.teacher, self.student):
                keep_logits_fp32(model)
        if config.compile:
            for model in (self.teacher, self.student):
                model.compile()
        self.trigger_generator = TriggerGenerator(spec.channels, config.patch_size, config.trigger_latent_dim,
                                                  config.trigger_width).to(self.device)
        self.opt_student = torch.optim.SGD(self.student.parameters(), lr=config.student_lr,
                                           momentum=config.student_momentum, weight_decay=config.student_weight_decay)
        self.opt_generator = torch.optim.Adam(self.sample_generator.parameters(), lr=config.generator_lr)
        self.opt_trigger = torch.optim.Adam(self.trigger_generator.parameters(), lr=config.trigger_lr)
        self.optimisers = [self.opt_student, self.opt_generator, self.opt_trigger]
        milestones = sorted({max(1, int(round(m * config.epochs))) for m in config.lr_milestones})
        self.schedules = [torch.optim.lr_scheduler.MultiStepLR(o, milestones, config.lr_decay)
                          for o in self.optimisers]
        self.epoch = 0
        self.rng = torch.Generator(device=self.device).manual_seed(config.seed + 1)  # patch placement, other draws
        self.history: list[EpochRecord] = []
        self.stop_reason: Optional[str] = None   # set by `stop`: the game ends before the next iterations
        # seconds per phase of this process's game (on a GPU, without synchronisation: where the host waited)
        self.seconds_by_phase: dict[str, float] = {}
        self.extensions: list[Extension] = [ext.build(self) for ext in recipe.extensions]
        for ext in self.extensions:
            ext.setup(self)
        # after the extensions' copies (S's average, the search's G): those run replicated, unsynchronised
        parallel.synchronise_batch_norm(self.student, self.sample_generator)

    def precision(self):
        return game_precision(self.config.precision, self.device)

    def clocked(self, phase: str, since: float) -> float:
        """Add the seconds since `since` to `phase` (where the game's time goes); returns now."""
        now = time.perf_counter()
        self.seconds_by_phase[phase] = self.seconds_by_phase.get(phase, 0.0) + now - since
        return now

    def stop(self, reason: str) -> None:
        """End the game: no more iterations (e.g. a verdict that there is nothing to erase)."""
        self.stop_reason = reason

    def evidence(self) -> dict[str, Any]:
        """What the scan and the extensions found, data-free, by name (for the purified manifest and the report)."""
        found = {name: rep for name, rep in ((e.name, e.report(self)) for e in self.extensions) if rep}
        scanned = {"scan": self.scan_report.to_dict()} if self.scan_report is not None else {}
        clock = {"seconds_by_phase": {k: round(v, 2) for k, v in self.seconds_by_phase.items()}}
        return {**scanned, **found, **clock, **({"stopped": self.stop_reason} if self.stop_reason else {})}

    def extension(self, name: str) -> Optional[Extension]:
        return next((e for e in self.extensions if e.name == name), None)

    def first_answer(self, point: str, *args: Any) -> Any:
        """The first extension's answer at `point`, or None (the official behaviour)."""
        for ext in self.extensions:
            answer = getattr(ext, point)(self, *args)
            if answer is not None:
                return answer
        return None

    # --- the players of Eq. 8 ----------------------------------------------------------------------
    def latent(self, dim: int) -> torch.Tensor:
        return torch.randn(self.config.batch_size, dim, device=self.device)

    def synthesise(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) mapped to pixel space (G works in normalised space, like the official code)."""
        return self.spec.denormalise(self.sample_generator(z))

    def perturb(self, pixels: torch.Tensor, z_trigger: torch.Tensor, use: str = "student") -> torch.Tensor:
        """The batch S meets perturbed: officially x + pad(Gp(z')), Gp's patch added at one random place
        (`random_pad`); the `perturbations` part draws it from its sources instead (`use`: the student
        step, Gp's step or the diagnostics)."""
        patches = self.trigger_generator(z_trigger)
        perturbed = self.first_answer("perturb", pixels, patches, use)
        return perturbed if perturbed is not None else paste_patches(pixels, patches, per_sample=False, generator=self.rng)

    def current_lambda(self) -> float:
        lam = self.config.lam
        for ext in self.extensions:
            lam = ext.lambda_at(self, lam)
        return lam

    def seen(self, pixels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None) -> None:
        for ext in self.extensions:
            ext.samples_seen(self, pixels, teacher_logits)

    @torch.no_grad()
    def student_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x and T(x) for a student step, the whole batch: fresh from G (official; G and T run on this
        process's slice), or what an extension supplies."""
        supplied = self.first_answer("sample_batch")
        if supplied is not None:
            return supplied
        x = self.synthesise(self.parallel.shard(self.latent(self.config.latent_dim)))
        t_logits = self.teacher(x)
        x, t_logits = self.parallel.gather(x), self.parallel.gather(t_logits)
        self.seen(x, t_logits)
        return x, t_logits

    def student_step(self) -> torch.Tensor:
        """min over S: L1(S(x), T(x)) + lambda * L1(S(x + delta), S(x)), x and delta detached.
        x, T(x) and the patches are the whole batch; S runs on this process's slice of them."""
        cfg, own = self.config, self.parallel.shard
        with torch.no_grad():
            x, t_logits = self.student_batch()
            x_patched = self.perturb(x, self.latent(cfg.trigger_latent_dim), "student")
        s_logits = self.student(own(x))
        distill = distillation_loss(s_logits, own(t_logits))
        lam = self.current_lambda()
        regulariser = (backdoor_regulariser(self.student(own(x_patched)), s_logits.detach()) if lam > 0
                       else torch.zeros((), device=self.device))
        loss = distill + lam * regulariser
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        self.parallel.average_gradients(self.student)
        self.opt_student.step()
        for ext in self.extensions:
            ext.after_student_step(self)
        return torch.stack([loss.detach(), distill.detach(), regulariser.detach()]).double()

    def generator_step(self, generator: Optional[nn.Module] = None,
                       optimiser: Optional[torch.optim.Optimizer] = None) -> float:
        """max over G: L1(S(G(z)), T(G(z))) with the image prior (and the extensions' priors).
        `generator` and `optimiser`: another sample generator than G (an extension's own copy, run
        replicated in every process). G, T and S run on this process's slice; the priors see it too
        and take their batch means with `parallel.mean`."""
        own_copy = generator is not None and generator is not self.sample_generator
        generator, optimiser = generator or self.sample_generator, optimiser or self.opt_generator
        with self.parallel.replicated() if own_copy else contextlib.nullcontext():
            return self._generator_step(generator, optimiser)

    def _generator_step(self, generator: nn.Module, optimiser: torch.optim.Optimizer) -> float:
        cfg = self.config
        normalised = generator(self.parallel.shard(self.latent(cfg.latent_dim)))
        pixels = self.spec.denormalise(normalised)
        for ext in self.extensions:
            ext.watch_teacher(self, True)
        t_logits = self.teacher(pixels)
        for ext in self.extensions:
            ext.watch_teacher(self, False)
        with frozen(self.student) as student:
            s_logits = student(pixels)
        weight = self.first_answer("generator_adversarial_weight")
        weight = 1.0 if weight is None else weight
        loss = -weight * distillation_loss(s_logits, t_logits) + cfg.image_prior_weight * total_variation_l2(normalised)
        for ext in self.extensions:
            prior = ext.generator_prior(self, normalised, t_logits)
            if prior is not None:
                loss = loss + prior
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.parallel.average_gradients(generator)
        optimiser.step()
        if generator is self.sample_generator:
            self.seen(self.parallel.gather(pixels), self.parallel.gather(t_logits))
        return float(loss.detach())

    def trigger_step(self) -> float:
        """max over Gp: L1(S(x + pad(Gp(z'))), S(x)), x detached. Gp and the paste: the whole batch
        (Gp is small); S: this process's slice."""
        cfg, own = self.config, self.parallel.shard
        with torch.no_grad():
            x = self.parallel.gather(self.synthesise(own(self.latent(cfg.latent_dim))))
            self.seen(x)
        with frozen(self.student) as student:
            patched_logits = student(own(self.perturb(x, self.latent(cfg.trigger_latent_dim), "trigger_step")))
            with torch.no_grad():
                clean_logits = student(own(x))
            loss = -backdoor_regulariser(patched_logits, clean_logits)
        self.opt_trigger.zero_grad(set_to_none=True)
        loss.backward()
        self.parallel.average_gradients(self.trigger_generator)
        self.opt_trigger.step()
        return float(loss.detach())

    # --- Algorithm 1: epochs, with divergence rollback ------------------------------------------------
    def run_epoch(self) -> EpochRecord:
        snapshot = self.state_dict()
        for attempt in range(self.config.max_recoveries + 1):
            start = time.perf_counter()
            with self.precision():
                totals = self._train_iterations()
            if all(math.isfinite(v) for v in totals) and self._weights_finite():
                break
            if attempt == self.config.max_recoveries:
                raise DivergenceError(f"DHBE diverged (non-finite loss) in epoch {self.epoch + 1} "
                                      f"after {attempt} recoveries; lower the learning rates")
            self.load_state_dict(snapshot)
            for opt in self.optimisers:
                for group in opt.param_groups:
                    group["lr"] *= 0.5
            for schedule in self.schedules:
                schedule.base_lrs = [lr * 0.5 for lr in schedule.base_lrs]
        if self.stop_reason is None:  # a stopped game took no optimiser step
            for schedule in self.schedules:
                schedule.step()
        self.epoch += 1
        loss, distill, regulariser = totals
        clock = time.perf_counter()
        with self.precision(), self.parallel.replicated():
            diagnostics = self.diagnostics()
        self.clocked("diagnostics", clock)
        record = EpochRecord(
            epoch=self.epoch, iteration=self.epoch * self.config.iters_per_epoch,
            student_updates=self.epoch * self.config.iters_per_epoch * self.config.student_steps,
            loss_student=loss, loss_distill=distill, loss_regulariser=regulariser,
            student_lr=self.opt_student.param_groups[0]["lr"], seconds=time.perf_counter() - start,
            recoveries=attempt, **diagnostics,
        )
        self.history.append(record)
        for ext in self.extensions:
            ext.epoch_end(self, record)
        return record

    def _train_iterations(self) -> tuple[float, float, float]:
        cfg, clock = self.config, time.perf_counter()
        # the warm-up and the trigger refreshes: full precision, replicated in every process
        with searches_in_fp32(cfg.precision, self.device), self.parallel.replicated():
            if self.epoch == 0:
                for ext in self.extensions:
                    if self.stop_reason is None:   # a verdict that there is nothing to erase skips the rest
                        ext.probe(self)
            for ext in self.extensions:
                if self.stop_reason is None:
                    ext.epoch_start(self)
        clock = self.clocked("warm-up and trigger refreshes", clock)
        if self.stop_reason is not None:
            return 0.0, 0.0, 0.0
        self.sample_generator.train()
        self.trigger_generator.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)   # on the device: no host sync per step
        for _ in range(cfg.iters_per_epoch):
            self.student.train()
            for _ in range(cfg.student_steps):
                sums += self.student_step()
            clock = self.clocked("student steps", clock)
            self.generator_step()
            clock = self.clocked("G steps", clock)
            self.trigger_step()
            clock = self.clocked("Gp steps", clock)
        totals = self.parallel.average((sums / (cfg.iters_per_epoch * cfg.student_steps)).tolist())
        return totals[0], totals[1], totals[2]

    def output_model(self) -> nn.Module:
        """The purified model: S, or what an extension hands back instead (e.g. S's moving average)."""
        model = self.first_answer("output_model")
        return model if model is not None else self.student

    def _weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.student.parameters())

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Data-free: measured on fresh synthetic samples and Gp's patches, models in eval mode."""
        cfg = self.config
        output = self.output_model()
        output.eval()
        self.sample_generator.eval()
        self.trigger_generator.eval()
        x = self.synthesise(self.latent(cfg.latent_dim))
        x_patched = self.perturb(x, self.latent(cfg.trigger_latent_dim), "diagnostics")
        t, s, s_patched, t_patched = (self.teacher(x), output(x), output(x_patched), self.teacher(x_patched))
        self.sample_generator.train()
        self.trigger_generator.train()
        return {
            "synthetic_agreement": float((s.argmax(1) == t.argmax(1)).float().mean()),
            "synthetic_discrepancy": float(l1(s, t)),
            "trigger_sensitivity": float(l1(s_patched, s)),
            "trigger_flip_rate": float((s_patched.argmax(1) != s.argmax(1)).float().mean()),
            "teacher_flip_rate": float((t_patched.argmax(1) != t.argmax(1)).float().mean()),
        }

    # --- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "student": copy.deepcopy(self.student.state_dict()),
            "sample_generator": copy.deepcopy(self.sample_generator.state_dict()),
            "trigger_generator": copy.deepcopy(self.trigger_generator.state_dict()),
            "optimisers": [copy.deepcopy(o.state_dict()) for o in self.optimisers],
            "schedules": [s.state_dict() for s in self.schedules],
            "torch_rng": torch.get_rng_state(),
            "placement_rng": self.rng.get_state(),
            "history": [asdict(r) for r in self.history],
            "stop_reason": self.stop_reason,
            "extensions": {ext.name: ext.state_dict() for ext in self.extensions},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.student.load_state_dict(state["student"])
        self.sample_generator.load_state_dict(state["sample_generator"])
        self.trigger_generator.load_state_dict(state["trigger_generator"])
        for opt, opt_state in zip(self.optimisers, state["optimisers"]):
            opt.load_state_dict(opt_state)
        for schedule, schedule_state in zip(self.schedules, state["schedules"]):
            schedule.load_state_dict(schedule_state)
        torch.set_rng_state(state["torch_rng"])
        self.rng.set_state(state["placement_rng"])
        for ext in self.extensions:
            ext.load_state_dict(state["extensions"].get(ext.name, {}))
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.stop_reason = state.get("stop_reason")
