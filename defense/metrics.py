"""Backdoor metrics: ACC, ASR (DHBE and BackdoorBench forms), amplified ASR, RA and DER.

These are the experimenter's measuring stick: they need test data and the true trigger, so the
defence itself never calls them.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from defense.data import Split
from defense.triggers import AMPLIFICATIONS, Trigger


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).float().mean()) if len(labels) else float("nan")


def attack_success_rate(clean_pred: torch.Tensor, triggered_pred: torch.Tensor, labels: torch.Tensor,
                        target: int, only_correct: bool = True) -> float:
    """Fraction of non-target images classified as `target` once triggered.

    only_correct=True is the DHBE form (images the model classifies correctly when clean);
    False is the BackdoorBench form (every non-target image)."""
    eligible = labels != target
    if only_correct:
        eligible &= clean_pred == labels
    if not bool(eligible.any()):
        return float("nan")
    return float((triggered_pred[eligible] == target).float().mean())


def robust_accuracy(triggered_pred: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """RA: non-target triggered images still classified as their true label."""
    eligible = labels != target
    return float((triggered_pred[eligible] == labels[eligible]).float().mean()) if bool(eligible.any()) else float("nan")


def defence_effectiveness_rating(before: dict, after: dict, asr: str = "asr_x1") -> float:
    """DER = (max(0, ASR drop) - max(0, ACC drop) + 1) / 2, with rates in [0, 1]. `asr`: which ASR form,
    `asr_x1` (DHBE's: non-target test images the model gets right when clean) or `asr_all_x1`
    (BackdoorBench's: every non-target test image; the form BackdoorBench's DER uses)."""
    asr_drop = before[asr] - after[asr]
    acc_drop = before["acc"] - after["acc"]
    return (max(0.0, asr_drop) - max(0.0, acc_drop) + 1.0) / 2.0


PURIFICATION_BAR = {"asr_x1": 0.05, "asr_x9": 0.10, "acc_drop": 0.02}   # the project's bar (README)


def bar_outcome(before: dict, after: dict) -> tuple[bool, str]:
    """Whether a purification meets the project's bar where the attack is known (the experimenter's
    measurements, never the defence's): ASR x1 <= 5%, x9 <= 10%, ACC drop <= 2 points; and one line."""
    misses = []
    for key, label in (("asr_x1", "ASR x1"), ("asr_x9", "ASR x9")):
        if after.get(key) is not None and after[key] > PURIFICATION_BAR[key]:
            misses.append(f"{label} {100 * after[key]:.1f}% > {100 * PURIFICATION_BAR[key]:.0f}%")
    drop = (before.get("acc") or 0.0) - (after.get("acc") or 0.0)
    if drop > PURIFICATION_BAR["acc_drop"]:
        misses.append(f"ACC drop {100 * drop:.1f} > {100 * PURIFICATION_BAR['acc_drop']:.0f} points")
    line = "bar (ASR x1 <= 5%, x9 <= 10%, ACC drop <= 2 points): " + ("met" if not misses else "missed: " + "; ".join(misses))
    return not misses, line


def evaluate_backdoor(model: nn.Module, test: Split, trigger: Optional[Trigger], target: int) -> dict:
    """acc, asr_x1/x4/x9 (DHBE form), asr_all_x1/x4/x9 (BackdoorBench form) and ra, as floats in [0, 1]
    (None where a trigger cannot be amplified, e.g. a blended one pasted 4 times)."""
    clean = predict(model, test.images)
    result: dict = {"acc": accuracy(clean, test.labels)}
    if trigger is None:
        return result
    for copies in AMPLIFICATIONS:
        triggered_images = trigger.paste_copies(test.images, copies)
        if triggered_images is None:
            result[f"asr_x{copies}"] = result[f"asr_all_x{copies}"] = None
            continue
        triggered = predict(model, triggered_images)
        result[f"asr_x{copies}"] = attack_success_rate(clean, triggered, test.labels, target, only_correct=True)
        result[f"asr_all_x{copies}"] = attack_success_rate(clean, triggered, test.labels, target, only_correct=False)
        if copies == 1:
            result["ra"] = robust_accuracy(triggered, test.labels, target)
    return result


def statistics_refitted(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """A copy of `model` with its batch-norm statistics re-estimated on `images` (the cumulative average
    over batches of `batch_size`, as AdaBN or a fine-tune in train mode would set them); weights as they
    are. The experimenter's check of a purified model: an erasure that lives in the statistics does not
    survive it (docs/research/dhbe-log.md, fifteenth round)."""
    refitted = copy.deepcopy(model)
    norms = [m for m in refitted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    refitted.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            refitted(images[start:start + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return refitted.eval()
