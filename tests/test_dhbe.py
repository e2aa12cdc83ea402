import copy
import math

import pytest
import torch
import torch.nn.functional as F

import defense.data as data_module
from defense.dhbe import DHBEConfig, DHBETrainer, Recipe, cpu_recipe, purify, recipe_config
from defense.dhbe.extensions import LambdaStepConfig, PerturbationsConfig, SamplePoolConfig
from defense.priors import BatchNormStatistics, class_imbalance
from defense.dhbe.losses import l1, total_variation_l2
from defense.errors import ConfigError
from defense.generators import SampleGenerator, TriggerGenerator, paste_patches
from defense.models import build_model
from defense.spec import InputSpec

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))


def test_sample_generator_outputs_normalised_images():
    g = SampleGenerator(SPEC, latent_dim=32, width=8)
    x = g(torch.randn(64, 32))
    assert x.shape == (64, 1, 16, 16)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 0.02  # BN(affine=False)


def test_trigger_generator_is_bounded_patch():
    gp = TriggerGenerator(3, patch_size=5, latent_dim=16, width=8, amplitude=0.5)
    p = gp(torch.randn(10, 16) * 100)
    assert p.shape == (10, 3, 5, 5) and float(p.abs().max()) <= 0.5


def test_paste_one_place_per_batch_like_the_official_random_pad():
    images = torch.zeros(4, 1, 16, 16)
    patches = torch.ones(4, 1, 3, 3)
    out = paste_patches(images, patches, per_sample=False, generator=torch.Generator().manual_seed(0))
    nz = [tuple(torch.nonzero(o[0]).min(0).values.tolist()) for o in out]
    assert len(set(nz)) == 1 and all(float(o.sum()) == 9 for o in out)


def test_paste_per_sample_places_and_copies():
    images = torch.zeros(200, 1, 16, 16)
    patches = torch.ones(200, 1, 3, 3)
    out = paste_patches(images, patches, per_sample=True, generator=torch.Generator().manual_seed(0))
    corners = {tuple(torch.nonzero(o[0]).min(0).values.tolist()) for o in out}
    assert len(corners) > 50 and all(float(o.sum()) == 9 for o in out)
    many = paste_patches(images, patches, per_sample=True, max_copies=4, generator=torch.Generator().manual_seed(0))
    sums = many.sum(dim=(1, 2, 3))
    assert set(sums.tolist()) <= {9.0, 18.0, 27.0, 36.0} and len(set(sums.tolist())) == 4


def test_loss_terms_match_hand_computed_values():
    a = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.5, 1.0]])
    assert float(l1(a, b)) == pytest.approx((1 + 2 + 0 + 1) / 4)
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # vertical diffs 2, 3 -> mean of squares 6.5; horizontal diffs 1, 2 -> 2.5
    assert float(total_variation_l2(x)) == pytest.approx(9.0)
    # a batch spread evenly over 4 classes is balanced; all samples sure of one class cost log 4
    assert float(class_imbalance(torch.eye(4) * 50)) == pytest.approx(0.0, abs=1e-6)
    assert float(class_imbalance(torch.tensor([[50.0, 0, 0, 0]] * 3))) == pytest.approx(math.log(4), abs=1e-6)
    # mean softmax (0.5, 0.5, 0, 0): entropy log 2
    assert float(class_imbalance(torch.tensor([[50.0, 0, -50, -50], [0, 50.0, -50, -50]]))) == pytest.approx(math.log(2), abs=1e-5)


def test_batch_norm_prior_covers_all_or_the_first_layers():
    teacher = build_model("small-cnn", SPEC).eval()
    layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    x = torch.rand(4, *SPEC.shape)
    for first, hooked in ((0, layers), (1, 1), (2, 2)):
        prior = BatchNormStatistics(teacher, first)
        teacher(x)
        assert prior.losses == []            # collected only while enabled (T's forward in the G step)
        prior.enabled = True
        teacher(x)
        assert len(prior.losses) == hooked
        assert float(prior.collect()) > 0
        prior.remove()


def one_student_step_by_hand(overrides=None):
    """A one-step game (lambda 0.7, batch 8) with `overrides`: its x, Gp's fully patched x, the batch the
    student step perturbs, Eq. 8 computed by hand on them, and the trainer's own student step."""
    torch.manual_seed(0)
    teacher = build_model("small-cnn", SPEC).eval()
    config = cpu_recipe().without("student_ema").replace(
        batch_size=8, lam=0.7, student_steps=1, iters_per_epoch=1, epochs=1).with_overrides(
        {"perturbations.warmup_steps": 0, **(overrides or {})})
    trainer = DHBETrainer(teacher, SPEC, config)
    torch.manual_seed(5)
    trainer.rng.manual_seed(5)
    with torch.no_grad():
        student = copy.deepcopy(trainer.student)
        trainer.student.train()
        x = trainer.synthesise(trainer.latent(config.dhbe.latent_dim))
        z = trainer.latent(config.dhbe.trigger_latent_dim)
        placement = trainer.rng.get_state()
        xp = trainer.perturb(x, z, "diagnostics")      # Gp's patches on every row
        trainer.rng.set_state(placement)
        perturbed = trainer.perturb(x, z, "student")   # the same patches, by the mixing rule
        s = student.train()(x)
        expected = F.l1_loss(s, trainer.teacher(x)) + 0.7 * F.l1_loss(student(perturbed), s)
    torch.manual_seed(5)
    trainer.rng.manual_seed(5)
    return x, xp, perturbed, float(expected), tuple(trainer.student_step().tolist())


def test_student_step_minimises_equation_8():
    _, xp, perturbed, expected, (loss, distill, regulariser) = one_student_step_by_hand()
    assert torch.equal(perturbed, xp)   # officially every sample is patched
    assert loss == pytest.approx(expected, rel=1e-4)
    assert loss == pytest.approx(distill + 0.7 * regulariser, rel=1e-5)


def test_the_mixing_rule_leaves_a_share_of_each_perturbed_batch_clean_in_the_student_step():
    x, xp, mixed, expected, (loss, _, _) = one_student_step_by_hand({"perturbations.perturbed_share": 0.25})
    changed = (mixed != x).flatten(1).any(1)
    assert changed.tolist() == [False, False, False, True, False, False, False, True]
    assert torch.equal(mixed[changed], xp[changed])
    assert loss == pytest.approx(expected, rel=1e-4)
    for share in (0.0, 1.5):
        with pytest.raises(ConfigError, match="perturbed_share"):
            recipe_config("cpu", {"perturbations.perturbed_share": share})


def test_lambda_steps_to_lam_after_once_its_share_of_the_epochs_is_done():
    teacher = build_model("small-cnn", SPEC).eval()
    config = cpu_recipe().replace(batch_size=8, epochs=15, lam=1.0).with_extension(
        LambdaStepConfig(after=0.3, at=0.5))
    trainer = DHBETrainer(teacher, SPEC, config)
    seen = {}
    for epoch in range(config.dhbe.epochs):
        trainer.epoch = epoch  # completed epochs, as run_epoch counts them
        seen[epoch + 1] = trainer.current_lambda()
    assert {e for e, lam in seen.items() if lam == 1.0} == set(range(1, 9))  # round(0.5 * 15) = 8 epochs
    assert {e for e, lam in seen.items() if lam == 0.3} == set(range(9, 16))
    plain = DHBETrainer(teacher, SPEC, config.without("lambda_step"))
    plain.epoch = 14   # the same late epoch: without the step, lambda stays as the recipe has it
    assert plain.current_lambda() == 1.0


@pytest.mark.parametrize("key,value,message", [
    ("lam", "-1", "lambda"), ("batch_size", "1", "batch_size"), ("student_lr", "0", "student_lr"),
    ("lr_milestones", "1.5", "lr_milestones"), ("lam", "nan", "lam expects a float"),
    ("epochs", "2.5", "epochs expects a int"), ("lamb", "1", "unknown DHBE field 'lamb'"),
    ("class_balance.weight", "-0.5", "class_balance.weight"), ("bn_prior.layers", "-1", "bn_prior.layers"),
    ("lambda_step.after", "-0.1", "lambda_step.after"), ("lambda_step.at", "1", "lambda_step.at"),
    ("sample_pool.capacity", "10", "at least batch_size"), ("perturbations.scan_triggers", "maybe", "scan_triggers expects"),
    ("perturbations.replay_fraction", "2", "replay_fraction"), ("student_ema.decay", "1", "student_ema.decay"),
    ("perturbations.patch_copies", "0", "patch_copies"), ("perturbations.refresh_success", "0", "refresh_success"),
    ("nope.field", "1", "unknown DHBE extension 'nope'"), ("perturbations.depth", "1", "unknown DHBE extension 'perturbations' field"),
    ("student_ema", "perhaps", "takes on or off"), ("sample_pool.capacity", "1000000000000", "sample_pool.capacity"),
    ("perturbations.bank_size", "1000000000", "bank_size"), ("perturbations.perturbed_share", "0.001", "perturbs no row"), ("perturbations.refresh_steps", "1e9", "refresh_steps"),
])
def test_every_override_is_typed_and_validated_with_a_message_naming_it(key, value, message):
    with pytest.raises(ConfigError, match=message):
        recipe_config("cpu", {key: value})


def test_overrides_change_add_and_remove_extensions_and_round_trip_as_plain_data():
    recipe = recipe_config("cpu", {"lam": "0.5", "lr_milestones": "0.5,0.7", "student_ema": "off",
                                   "sample_pool.capacity": "2560", "perturbations.patch_copies": "3"})
    assert recipe.dhbe.lam == 0.5 and recipe.dhbe.lr_milestones == (0.5, 0.7)
    assert "student_ema" not in recipe and recipe.get("sample_pool").capacity == 2560
    assert recipe.get("perturbations").patch_copies == 3
    assert recipe.extension_names[-1] == "sample_pool"          # added at the end, the others keep their order
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ConfigError, match="extensions entry"):
        Recipe.from_dict({"dhbe": {}, "extensions": {"student_ema": {}}})
    with pytest.raises(ConfigError, match="keys dhbe, extensions"):
        Recipe.from_dict({"dhbe": {}, "__class__": "os.system"})


def test_the_official_recipe_has_no_extension_and_the_paper_defaults():
    official = recipe_config("official")
    assert official.extensions == () and official.dhbe == DHBEConfig()
    assert (DHBEConfig().lam, DHBEConfig().student_steps, DHBEConfig().patch_size) == (0.1, 5, 5)


def test_impossible_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="smaller than"):
        DHBEConfig(patch_size=16).validate_for(SPEC)
    with pytest.raises(ConfigError, match="divisible by 4"):
        DHBEConfig(patch_size=3).validate_for(InputSpec(1, 10, 10, 10, (0.3,), (0.4,)))


def test_purify_is_data_free(monkeypatch, badnets_scenario):
    """Every data-set loader raises while DHBE runs: it never touches data."""
    def refuse(*args, **kwargs):
        raise AssertionError("DHBE touched a data set")

    for name in data_module.DATASETS.names():
        monkeypatch.setitem(data_module.DATASETS._entries, name, refuse)
    monkeypatch.setattr(data_module, "load_dataset", refuse)
    config = cpu_recipe().replace(epochs=1, iters_per_epoch=2, batch_size=16)
    student, history = purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    assert len(history) == 1 and history[0].evaluation == {}
    assert any(not torch.equal(p, q) for p, q in zip(student.state_dict().values(),
                                                     badnets_scenario.teacher.state_dict().values()))


def test_deterministic_for_a_seed(badnets_scenario):
    config = cpu_recipe().replace(epochs=1, iters_per_epoch=2, batch_size=16, seed=3)
    runs = [purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config) for _ in range(2)]
    for p, q in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
        assert torch.equal(p, q)
    assert runs[0][1][0].loss_student == runs[1][1][0].loss_student


@pytest.mark.parametrize("sample_pool", [0, 1280])
def test_dhbe_erases_most_of_a_planted_backdoor_in_a_short_run(badnets_scenario, sample_pool):
    """A short run of the CPU recipe, with fresh samples per student step and with the sample pool:
    ASR x1 falls from >= 90% and clean ACC mostly holds."""
    before = badnets_scenario.evaluate(badnets_scenario.teacher)
    config = cpu_recipe().without("student_ema").replace(epochs=4, iters_per_epoch=10).with_overrides(
        {"perturbations.warmup_steps": 100, **({"sample_pool.capacity": sample_pool} if sample_pool else {})})
    student, history = purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    after = badnets_scenario.evaluate(student)
    print("before", before, "after", after)
    assert before["asr_x1"] >= 0.9
    assert after["asr_x1"] <= 0.3
    assert after["acc"] >= before["acc"] - 0.08


def test_lambda_zero_keeps_the_backdoor(badnets_scenario):
    """The ablation: without the regulariser, distillation from a teacher copy keeps the backdoor."""
    config = cpu_recipe().without("student_ema").replace(epochs=2, iters_per_epoch=10, lam=0.0)
    student, _ = purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    assert badnets_scenario.evaluate(student)["asr_x1"] >= 0.8


def test_divergence_is_detected_not_returned(badnets_scenario):
    config = cpu_recipe().replace(epochs=1, iters_per_epoch=2, batch_size=16, student_lr=1e30,
                                  max_recoveries=1).with_overrides({"perturbations.warmup_steps": 10})
    from defense.errors import DivergenceError

    with pytest.raises(DivergenceError, match="non-finite"):
        purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)


def test_warm_up_fills_the_patch_bank_and_ema_is_handed_back(badnets_scenario):
    config = cpu_recipe().replace(epochs=1, iters_per_epoch=2, batch_size=16).with_extension(
        PerturbationsConfig(warmup_steps=5, bank_size=24, scan_triggers=False, perturbed_share=1.0))
    trainer = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    trainer.run_epoch()
    bank = trainer.extension("perturbations").sources[0].bank
    assert bank.rows[0].shape == (24, 1, 3, 3)  # 5 steps x 8 patches, capped at 24
    assert trainer.output_model() is trainer.extension("student_ema").averaged.module
    student_state = trainer.student.state_dict()
    assert any(not torch.equal(v, student_state[k]) for k, v in trainer.output_model().state_dict().items()
               if v.is_floating_point())


def test_paper_scale_configuration_runs_a_few_iterations():
    """ResNet-18 on 32x32x3 with the official defaults (batch shrunk so CPU CI stays fast)."""
    spec = InputSpec(3, 32, 32, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    config = recipe_config("official").replace(epochs=1, iters_per_epoch=1, batch_size=8, student_steps=2)
    assert DHBEConfig().iterations == 15_000 and DHBEConfig().patch_size == 5
    student, history = purify(build_model("resnet18", spec).eval(), spec, config)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0].loss_student))


def prior_only_generator_steps(trainer, steps: int) -> None:
    """G steps before the game: S is still T, so with the prior-only generator G follows its priors."""
    for _ in range(steps):
        trainer.generator_step()


def test_the_batch_norm_prior_fits_g_to_the_teachers_statistics_and_leaves_s_as_t(badnets_scenario):
    """G's steps on its priors alone: the BN-statistics mismatch on T falls, and S (still a copy of
    T) is not updated by them."""
    config = cpu_recipe().replace(batch_size=32, generator_lr=1e-2)
    trainer = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    trainer.student.eval()  # BN running statistics of S untouched by its forwards in the G step
    statistics = trainer.extension("bn_prior").statistics

    def mismatch() -> float:
        torch.manual_seed(11)
        statistics.enabled = True
        with torch.no_grad():
            trainer.teacher(trainer.synthesise(trainer.latent(config.dhbe.latent_dim)))
        statistics.enabled = False
        return float(statistics.collect())

    before = mismatch()
    prior_only_generator_steps(trainer, 40)
    assert mismatch() < 0.7 * before
    for p, q in zip(trainer.student.state_dict().values(), trainer.teacher.state_dict().values()):
        assert torch.equal(p, q)


def test_class_balance_prior_spreads_gs_samples_over_the_teachers_classes(badnets_scenario):
    """With BN statistics alone, T labels G's samples unevenly (on a backdoored T, often its target
    class); the information-entropy prior spreads them out."""
    def imbalance_after_steps(weight: float) -> float:
        config = cpu_recipe().replace(batch_size=64, generator_lr=1e-2).with_overrides(
            {"class_balance.weight": weight} if weight else {"class_balance": "off"})
        trainer = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
        trainer.student.train()
        prior_only_generator_steps(trainer, 60)
        torch.manual_seed(3)
        with torch.no_grad():
            return float(class_imbalance(trainer.teacher(trainer.synthesise(torch.randn(512, config.dhbe.latent_dim)))))

    assert imbalance_after_steps(5.0) < 0.5 * imbalance_after_steps(0.0)


def test_sample_pool_is_a_ring_buffer_of_samples_and_their_logits():
    from defense.dhbe.extensions.sample_pool import SamplePool

    pool = SamplePool(10)
    for batch in range(3):  # 12 samples into 10 slots: the first two are overwritten
        pixels = torch.arange(4.0).add(4 * batch).view(4, 1, 1, 1).expand(4, 1, 2, 2)
        pool.add(pixels, pixels.flatten(1)[:, :1] * 10)
    assert len(pool) == 10
    assert sorted(pool.pixels[:, 0, 0, 0].tolist()) == [float(v) for v in range(2, 12)]
    pixels, logits = pool.draw(64, torch.Generator().manual_seed(0))
    assert torch.equal(logits[:, 0], pixels[:, 0, 0, 0] * 10)  # each sample keeps its own logits
    assert set(pixels[:, 0, 0, 0].tolist()) <= set(range(2, 12))
    restored = SamplePool(10)
    restored.load_state_dict(pool.state_dict())
    assert torch.equal(restored.pixels, pool.pixels) and restored.cursor == pool.cursor


def test_with_a_sample_pool_student_steps_reuse_the_g_and_gp_steps_samples_and_resume_exactly():
    """The student steps run neither G nor T (but the first, on an empty pool): the G and Gp steps'
    fresh samples, with T's logits on them, fill the pool; a run resumed from a checkpoint matches
    an uninterrupted one."""
    teacher = build_model("small-cnn", SPEC).eval()
    config = cpu_recipe().replace(batch_size=8, epochs=2, iters_per_epoch=3).with_overrides(
        {"perturbations.warmup_steps": 2, "sample_pool.capacity": 64})
    counts = {"G": 0, "T": 0}
    trainer = DHBETrainer(teacher, SPEC, config)
    trainer.sample_generator.register_forward_hook(lambda *_: counts.__setitem__("G", counts["G"] + 1))
    trainer.teacher.register_forward_hook(lambda *_: counts.__setitem__("T", counts["T"] + 1))
    trainer.student.train()
    pool = trainer.extension("sample_pool").pool
    for iteration in range(3):
        counts.update(G=0, T=0)
        for _ in range(config.dhbe.student_steps):
            trainer.student_step()
        assert counts == ({"G": 1, "T": 1} if iteration == 0 else {"G": 0, "T": 0})  # first: pool empty
        trainer.generator_step()
        trainer.trigger_step()
    assert len(pool) == 7 * 8  # the first student batch, three G-step and three Gp-step batches
    with torch.no_grad():
        kept = slice(0, len(pool))
        assert torch.allclose(pool.logits[kept], trainer.teacher(pool.pixels[kept]), atol=1e-5)

    straight = DHBETrainer(teacher, SPEC, config)
    straight.run_epoch(), straight.run_epoch()
    first = DHBETrainer(teacher, SPEC, config)
    first.run_epoch()
    checkpoint = first.state_dict()  # before another trainer re-seeds the process's RNG
    resumed = DHBETrainer(teacher, SPEC, config)
    resumed.load_state_dict(checkpoint)
    resumed.run_epoch()
    for p, q in zip(straight.output_model().state_dict().values(), resumed.output_model().state_dict().values()):
        assert torch.equal(p, q)
    # and the resumed run is not trivially equal: one more epoch changes the model
    assert any(not torch.equal(p, q) for p, q in zip(first.output_model().state_dict().values(),
                                                     resumed.output_model().state_dict().values()))


def test_the_defence_never_reads_the_experiment_record(monkeypatch, tmp_path, badnets_scenario):
    """A model file carries the attack's record (for the experimenter); the purification gets the
    model and its input spec only: reading the record while it runs fails the test."""
    import defense.experiment as experiment_module
    from defense.modelio import load_model, save_model
    from deploy.ray_job import job_loop_config

    spec = badnets_scenario.bundle.spec
    path = save_model(badnets_scenario.teacher, tmp_path / "teacher", "small-cnn", spec, {"tool": "test"},
                      experiment=badnets_scenario.experiment.to_dict())
    loaded = load_model(path)
    assert loaded.manifest["experiment"]["attack"] == "badnets"

    def refuse(*args, **kwargs):
        raise AssertionError("the defence read the experiment record")

    monkeypatch.setattr(experiment_module, "experiment_of", refuse)
    monkeypatch.setattr(experiment_module.Experiment, "trigger", refuse)
    monkeypatch.setattr(experiment_module.Experiment, "from_dict", refuse)
    recipe = cpu_recipe().replace(epochs=1, iters_per_epoch=1, batch_size=16)
    purify(loaded.model, loaded.spec, recipe)
    shipped = job_loop_config(loaded, recipe, 1, tmp_path, "job")   # what Ray Train workers receive
    assert "experiment" not in repr(sorted(shipped)) and "experiment" not in repr(shipped["produced_by"])


def test_the_default_hands_a_model_without_a_backdoor_back_unchanged(clean_scenario):
    """The scan finds no backdoor in a clean model: the verdict stops the game before any iteration
    and T itself is handed back, with the reason in the evidence."""
    recipe = recipe_config("default", {"perturbations.warmup_steps": 0})
    student, history = purify(clean_scenario.teacher, clean_scenario.bundle.spec, recipe)
    for p, q in zip(student.state_dict().values(), clean_scenario.teacher.state_dict().values()):
        assert torch.equal(p, q)
    assert len(history) == 1 and history[0].loss_student == 0.0


def test_the_default_suspects_a_backdoors_target_and_its_guard_falls_back(badnets_scenario):
    """On a backdoored model the scan names the target class (from the model alone) and the game
    runs; a final model whose synthetic agreement with T is under the guard's floor is not handed
    back: the guard falls back (here to T, as no epoch met a floor of 99.9%) and says so."""
    spec = badnets_scenario.bundle.spec
    recipe = recipe_config("default", {"perturbations.warmup_steps": 0, "epochs": 1, "iters_per_epoch": 3, "student_lr": 1.0,
                                       "verdict.min_agreement": 0.999})
    from defense.dhbe import scanned_trainer, train_epochs

    trainer = scanned_trainer(badnets_scenario.teacher, spec, recipe)

    train_epochs(trainer)
    verdict = trainer.evidence()["verdict"]
    assert verdict["suspected_targets"] == [badnets_scenario.target] and "stopped" not in trainer.evidence()
    assert trainer.history[-1].synthetic_agreement < 0.999
    assert "guard" in verdict and trainer.output_model() is trainer.teacher
