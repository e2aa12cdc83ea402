import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import defense.data as data_module
from defense.dhbe import (BatchNormStatistics, DHBEConfig, DHBETrainer, class_imbalance, cpu_recipe, distillation, l1,
                          purify, total_variation_l2)
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


def test_distillation_variants_match_hand_computed_values():
    teacher = torch.zeros(4, 2)
    student = torch.tensor([[0.1, 0.1], [0.2, -0.2], [5.0, 5.0], [0.3, 0.3]])  # per-sample L1 .1 .2 5 .3
    assert float(distillation(student, teacher)) == pytest.approx(float(l1(student, teacher)))
    # trimming a quarter leaves the largest error (5.0) out: mean of .1, .2, .3
    assert float(distillation(student, teacher, trim_fraction=0.25)) == pytest.approx(0.2)
    # KL(T || S) with T = (1/2, 1/2) and S = (1/4, 3/4): 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    kl = distillation(torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2), "kl")
    assert float(kl) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert float(distillation(teacher, teacher, "kl")) == pytest.approx(0.0, abs=1e-7)


def test_batch_norm_prior_covers_all_or_the_first_layers():
    teacher = build_model("small-cnn", SPEC).eval()
    layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    x = torch.rand(4, *SPEC.shape)
    for first, hooked in ((0, layers), (1, 1), (2, 2)):
        prior = BatchNormStatistics(teacher, first)
        prior.enabled = True
        teacher(x)
        assert len(prior.losses) == hooked
        assert float(prior.collect()) > 0
        for handle in prior.handles:
            handle.remove()


def test_batch_norm_prior_weighs_the_deeper_layers_by_deep_weight():
    teacher = build_model("small-cnn", SPEC).eval()
    x = torch.rand(4, *SPEC.shape)

    def per_layer(first: int, deep_weight: float) -> list[float]:
        prior = BatchNormStatistics(teacher, first, deep_weight)
        prior.enabled = True
        teacher(x)
        losses = [float(loss) for loss in prior.losses]
        for handle in prior.handles:
            handle.remove()
        return losses

    full = per_layer(0, 0.0)
    assert per_layer(1, 0.25) == pytest.approx([full[0]] + [0.25 * v for v in full[1:]])
    assert per_layer(1, 0.0) == pytest.approx(full[:1])


def test_student_step_minimises_equation_8():
    torch.manual_seed(0)
    teacher = build_model("small-cnn", SPEC).eval()
    config = replace(cpu_recipe(), batch_size=8, lam=0.7, student_steps=1, iters_per_epoch=1, epochs=1,
                     trigger_warmup_steps=0, student_ema=0.0)
    trainer = DHBETrainer(teacher, SPEC, config)
    torch.manual_seed(5)
    trainer.rng.manual_seed(5)
    with torch.no_grad():
        student = copy.deepcopy(trainer.student)
        trainer.set_student_mode()
        x = trainer.synthesise(trainer.latent(config.latent_dim))
        xp = trainer.patch(x, trainer.latent(config.trigger_latent_dim))
        s = student.train()(x)
        expected = F.l1_loss(s, trainer.teacher(x)) + 0.7 * F.l1_loss(student(xp), s)
    torch.manual_seed(5)
    trainer.rng.manual_seed(5)
    loss, distill, regulariser = trainer.student_step()
    assert loss == pytest.approx(float(expected), rel=1e-4)
    assert loss == pytest.approx(distill + 0.7 * regulariser, rel=1e-5)


def test_lambda_steps_to_lam_after_once_its_share_of_the_epochs_is_done():
    teacher = build_model("small-cnn", SPEC).eval()
    config = replace(cpu_recipe(), batch_size=8, epochs=15, lam=1.0, lam_after=0.3, lam_step_at=0.5,
                     trigger_warmup_steps=0)
    trainer = DHBETrainer(teacher, SPEC, config)
    seen = {}
    for epoch in range(config.epochs):
        trainer.epoch = epoch  # completed epochs, as run_epoch counts them
        seen[epoch + 1] = trainer.current_lambda()
    assert {e for e, lam in seen.items() if lam == 1.0} == set(range(1, 9))  # round(0.5 * 15) = 8 epochs
    assert {e for e, lam in seen.items() if lam == 0.3} == set(range(9, 16))
    assert DHBETrainer(teacher, SPEC, replace(config, lam_after=None)).current_lambda() == 1.0


@pytest.mark.parametrize("field,value,message", [
    ("lam", -1.0, "lambda"), ("batch_size", 1, "batch_size"), ("student_lr", 0.0, "student_lr"),
    ("lr_milestones", (1.5,), "lr_milestones"), ("patch_copies", 2, "patch_per_sample"),
    ("generator_warmup_steps", -1, "generator_warmup_steps"), ("class_balance_weight", -0.5, "class_balance_weight"),
    ("distill_loss", "mse", "distill_loss"), ("bn_prior_layers", -1, "bn_prior_layers"),
    ("bn_prior_deep_weight", 1.5, "bn_prior_deep_weight"), ("lam_after", -0.1, "lam_after"),
    ("lam_step_at", 1.0, "lam_step_at"),
    ("distill_trim_fraction", 1.0, "distill_trim_fraction"), ("sample_pool", 10, "sample_pool"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ConfigError, match=message):
        replace(DHBEConfig(), **{field: value})


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
    config = replace(cpu_recipe(), epochs=1, iters_per_epoch=2, batch_size=16)
    student, history = purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    assert len(history) == 1 and 0.0 <= history[0].synthetic_agreement <= 1.0
    assert history[0].trigger_sensitivity >= 0.0 and history[0].evaluation == {}


def test_deterministic_for_a_seed(badnets_scenario):
    config = replace(cpu_recipe(), epochs=1, iters_per_epoch=2, batch_size=16, seed=3)
    runs = [purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config) for _ in range(2)]
    for p, q in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
        assert torch.equal(p, q)
    assert runs[0][1][0].loss_student == runs[1][1][0].loss_student


@pytest.mark.parametrize("sample_pool", [0, 1280])
def test_dhbe_erases_most_of_a_planted_backdoor_in_a_short_run(badnets_scenario, sample_pool):
    """A short run of the CPU recipe, with fresh samples per student step and with the sample pool:
    ASR x1 falls from >= 90% and clean ACC mostly holds."""
    before = badnets_scenario.evaluate(badnets_scenario.teacher)
    config = replace(cpu_recipe(), epochs=4, iters_per_epoch=10, trigger_warmup_steps=100, student_ema=0.0,
                     sample_pool=sample_pool)
    student, history = purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    after = badnets_scenario.evaluate(student)
    print("before", before, "after", after)
    assert before["asr_x1"] >= 0.9
    assert after["asr_x1"] <= 0.3
    assert after["acc"] >= before["acc"] - 0.08


def test_lambda_zero_keeps_the_backdoor(badnets_scenario):
    """The ablation: without the regulariser, distillation from a teacher copy keeps the backdoor."""
    config = replace(cpu_recipe(), epochs=2, iters_per_epoch=10, lam=0.0, trigger_warmup_steps=0, student_ema=0.0)
    student, _ = purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    assert badnets_scenario.evaluate(student)["asr_x1"] >= 0.8


def test_divergence_is_detected_not_returned(badnets_scenario):
    config = replace(cpu_recipe(), epochs=1, iters_per_epoch=2, batch_size=16, student_lr=1e30, max_recoveries=1,
                     trigger_warmup_steps=10)
    from defense.errors import DivergenceError

    with pytest.raises(DivergenceError, match="non-finite"):
        purify(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)


def test_warm_up_fills_the_trigger_bank_and_ema_is_handed_back(badnets_scenario):
    config = replace(cpu_recipe(), epochs=1, iters_per_epoch=2, batch_size=16, trigger_warmup_steps=5,
                     patch_memory=24)
    trainer = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
    trainer.run_epoch()
    assert trainer.memory.shape == (24, 1, 3, 3)  # 5 steps x 8 patches, capped at 24
    assert trainer.output_model() is trainer.averaged.module
    student_state = trainer.student.state_dict()
    assert any(not torch.equal(v, student_state[k]) for k, v in trainer.output_model().state_dict().items()
               if v.is_floating_point())


def test_paper_scale_configuration_runs_a_few_iterations():
    """ResNet-18 on 32x32x3 with the official defaults (batch shrunk so CPU CI stays fast)."""
    spec = InputSpec(3, 32, 32, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    config = replace(DHBEConfig(), epochs=1, iters_per_epoch=1, batch_size=8, student_steps=2)
    assert DHBEConfig().iterations == 15_000 and DHBEConfig().patch_size == 5
    student, history = purify(build_model("resnet18", spec).eval(), spec, config)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0].loss_student))


def test_generator_warm_up_fits_the_teachers_batch_norm_statistics_and_leaves_s_as_t(badnets_scenario):
    """Before the game, G's steps follow its priors alone: the BN-statistics mismatch on T falls,
    and S (still a copy of T) is not updated."""
    config = replace(cpu_recipe(), batch_size=32, generator_warmup_steps=40, trigger_warmup_steps=0,
                     generator_lr=1e-2)
    trainer = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)

    def mismatch() -> float:
        torch.manual_seed(11)
        trainer.bn_prior.enabled = True
        with torch.no_grad():
            trainer.teacher(trainer.synthesise(trainer.latent(config.latent_dim)))
        trainer.bn_prior.enabled = False
        return float(trainer.bn_prior.collect())

    before = mismatch()
    trainer.warm_up()
    assert mismatch() < 0.7 * before
    for p, q in zip(trainer.student.parameters(), trainer.teacher.parameters()):
        assert torch.equal(p, q)


def test_class_balance_prior_spreads_gs_samples_over_the_teachers_classes(badnets_scenario):
    """With BN statistics alone, T labels G's samples unevenly (on a backdoored T, often its target
    class); the information-entropy prior spreads them out."""
    def imbalance_after_warm_up(weight: float) -> float:
        config = replace(cpu_recipe(), batch_size=64, generator_warmup_steps=60, trigger_warmup_steps=0,
                         generator_lr=1e-2, class_balance_weight=weight)
        trainer = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, config)
        trainer.warm_up()
        torch.manual_seed(3)
        with torch.no_grad():
            return float(class_imbalance(trainer.teacher(trainer.synthesise(torch.randn(512, config.latent_dim)))))

    assert imbalance_after_warm_up(5.0) < 0.5 * imbalance_after_warm_up(0.0)


def test_sample_pool_is_a_ring_buffer_of_samples_and_their_logits():
    from defense.sample_pool import SamplePool

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
    config = replace(cpu_recipe(), batch_size=8, epochs=2, iters_per_epoch=3, trigger_warmup_steps=2,
                     sample_pool=64)
    counts = {"G": 0, "T": 0}
    trainer = DHBETrainer(teacher, SPEC, config)
    trainer.sample_generator.register_forward_hook(lambda *_: counts.__setitem__("G", counts["G"] + 1))
    trainer.teacher.register_forward_hook(lambda *_: counts.__setitem__("T", counts["T"] + 1))
    trainer.set_student_mode()
    for iteration in range(3):
        counts.update(G=0, T=0)
        for _ in range(config.student_steps):
            trainer.student_step()
        assert counts == ({"G": 1, "T": 1} if iteration == 0 else {"G": 0, "T": 0})  # first: pool empty
        trainer.generator_step()
        trainer.trigger_step()
    assert len(trainer.pool) == 7 * 8  # the first student batch, three G-step and three Gp-step batches
    with torch.no_grad():
        kept = slice(0, len(trainer.pool))
        assert torch.allclose(trainer.pool.logits[kept], trainer.teacher(trainer.pool.pixels[kept]), atol=1e-5)

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
