"""The loss terms of Eq. 8 and the official image prior, with the paper's names."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from defense.priors import total_variation_l2  # noqa: F401  (the official image prior, shared with the scanner)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error on logits: the |.|_1 of Eq. 8 (in fp32 whatever the inputs' precision: the
    L1 between nearly equal logits vanishes in bf16)."""
    return F.l1_loss(a.float(), b.float())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 8's first term, L1(S(x), T(x)): adversarial distillation (S minimises it, G maximises it)."""
    return l1(student_logits, teacher_logits)


def backdoor_regulariser(patched_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 8's second term, L1(S(x + delta), S(x)): adversarial backdoor regularisation (S minimises
    its sensitivity to Gp's patch delta, Gp maximises it)."""
    return l1(patched_logits, clean_logits)
