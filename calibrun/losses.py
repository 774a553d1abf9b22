"""Training objectives (docs/design.md §4). Each is called as ``loss(logits, targets)`` and
returns the mean over the batch; p = softmax(z), K classes, y the label.

The training loop calls two hooks on every loss, whatever it is: ``set_epoch(epoch)``
before each epoch and ``mix(inputs, targets)`` before each forward pass. Both do
nothing by default; losses that need the epoch (λ warm-up) or the inputs (mixup)
override them, so the loop never branches on which loss it runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calibrun import UserError


class Loss(nn.Module):
    """Base class: the hooks the training loop calls for every loss."""

    def set_epoch(self, epoch: int) -> None:
        """Told the 0-based epoch before it starts."""

    def mix(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, object]:
        """May transform a training batch before the forward pass; identity by default."""
        return inputs, targets


class PlainLoss(Loss):
    """Any ``nn.Module`` with ``forward(logits, targets)`` (``torch.nn.CrossEntropyLoss``, a
    user's own) as a calibrun loss: the training loop's hooks do nothing for it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.module(logits, targets)


def as_loss(module: object) -> Loss:
    """``module`` itself if it is a calibrun :class:`Loss`, else wrapped in :class:`PlainLoss`."""
    if isinstance(module, Loss):
        return module
    if not isinstance(module, nn.Module):
        raise UserError(f"loss._target_ built a {type(module).__name__}, not a torch.nn.Module with "
                        "forward(logits, targets).")
    return PlainLoss(module)


class CrossEntropy(Loss):
    """Cross-entropy, −log p_y, averaged over the batch.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks" (the
    uncalibrated baseline).
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


class PenalizedLoss(Loss):
    """A base objective plus λ times a penalty, with an optional linear λ warm-up.

    ``warmup_epochs=0`` (the default) is the papers' constant λ. With W > 0, epoch e
    uses λ·min(1, e/W): training starts on the base loss alone and reaches the full λ
    after W epochs. With λ = 0 the loss equals its base loss exactly.
    """

    def __init__(self, lam: float, warmup_epochs: int = 0) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError(f"loss.lam must be >= 0, got {lam}")
        if warmup_epochs < 0:
            raise ValueError(f"loss.warmup_epochs must be >= 0, got {warmup_epochs}")
        self.lam, self.warmup_epochs = float(lam), warmup_epochs
        self.current_lam = 0.0 if warmup_epochs else self.lam

    def set_epoch(self, epoch: int) -> None:
        self.current_lam = self.lam * min(1.0, epoch / self.warmup_epochs) if self.warmup_epochs else self.lam

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base(logits, targets) + self.current_lam * self.penalty(logits, targets)

    def base(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def penalty(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GapLoss(PenalizedLoss):
    """(Capped) cross-entropy plus λ·|mean_i max_k p_ik − accuracy(batch)|.

    ``cap=None`` (config ``gap``): base = −log p_y. ``cap=c`` (config ``gap_cap``):
    base = −log min(p_y, c), which stops pushing a sample once p_y exceeds c (zero
    gradient there). The batch accuracy is a constant: the gap's gradient flows
    through the mean confidence only.

    ``lam_reading`` names what the paper's λ weighs the gap against, which its text leaves
    open: ``mean_ce`` (λ times the gap beside the batch-mean cross-entropy, the formula as
    calibrun writes it) or ``summed_ce`` (beside a cross-entropy summed over the batch: the
    same objective divided by the batch size B, so calibrun keeps the mean and weighs the
    gap by λ/B, and the learning rate keeps its meaning). README "Reproducing Table 1"
    gives the measurements that chose ``summed_ce`` for the Table 1 presets.

    References: the gap+cap paper reproduced by ``make reproduce-table1`` (its Table 1:
    CE, CE + gap, capped CE + gap, λ = 10); docs/design.md §4, rows ``gap`` and ``gap_cap``.
    """

    READINGS = ("mean_ce", "summed_ce")

    def __init__(self, lam: float = 10.0, cap: float | None = None, warmup_epochs: int = 0,
                 lam_reading: str = "mean_ce") -> None:
        super().__init__(lam, warmup_epochs)
        if cap is not None and not 0 < cap <= 1:
            raise ValueError(f"loss.cap must be in (0, 1] or null, got {cap}")
        if lam_reading not in self.READINGS:
            raise UserError(f"loss.lam_reading={lam_reading!r} is not a reading of λ; allowed: {', '.join(self.READINGS)}.")
        self.cap, self.lam_reading = cap, lam_reading

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lam = self.current_lam / len(targets) if self.lam_reading == "summed_ce" else self.current_lam
        return self.base(logits, targets) + lam * self.penalty(logits, targets)

    def base(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(logits, targets, reduction="none")
        if self.cap is not None:
            # −log min(p_y, c) = max(−log p_y, −log c): clamping keeps it in log space.
            nll = nll.clamp(min=-math.log(self.cap))
        return nll.mean()

    def penalty(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        confidence, predicted = probs.max(dim=1)
        accuracy = (predicted == targets).to(probs.dtype).mean()
        return (confidence.mean() - accuracy).abs()


class NonTargetSmoothing(PenalizedLoss):
    """CE + λ·(1/(K−1))·Σ_{j≠y} −log p′_j: the cross-entropy between the uniform
    distribution over the K−1 non-target classes and p′, "the probabilities of the
    classes other than the target", which the paper leaves open to two readings
    (``p_prime``):

    - ``renormalised`` (the default): p′ = softmax over the non-target logits, a
      log-softmax with the target masked out. The penalty is then independent of the
      target logit (its gradient there is exactly 0) and stays finite as p_y → 1, where
      renormalising p would divide by 1 − p_y ≈ 0.
    - ``raw``: p′_j = p_j, the full softmax's. The loss is then −log p_y − λ/(K−1)·Σ_{j≠y}
      log p_j = (1 + λ) × label smoothing (``spread=others``) with α = λ/(1 + λ): a
      rescaled label smoothing, not a separate objective (a test checks it to 1e-12).

    References: the non-target smoothing paper of the PACS experiments (CE + NTS,
    λ = 0.5); docs/design.md §4, row ``nts``.
    """

    P_PRIMES = ("renormalised", "raw")

    def __init__(self, lam: float = 0.5, warmup_epochs: int = 0, p_prime: str = "renormalised") -> None:
        super().__init__(lam, warmup_epochs)
        if p_prime not in self.P_PRIMES:
            raise UserError(f"loss.p_prime={p_prime!r} is not a reading of p′; allowed: {', '.join(self.P_PRIMES)}.")
        self.p_prime = p_prime

    def penalty(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        if k < 2:
            raise ValueError("non-target smoothing needs at least 2 classes")
        is_target = F.one_hot(targets, k).bool()
        masked = logits.masked_fill(is_target, float("-inf")) if self.p_prime == "renormalised" else logits
        log_q = torch.log_softmax(masked, dim=1)
        # The target's log q is −inf when masked; select it away rather than multiply (0·inf = nan).
        non_target = torch.where(is_target, torch.zeros_like(log_q), log_q)
        return (-non_target.sum(dim=1) / (k - 1)).mean()


class EntropyRegularized(PenalizedLoss):
    """CE + λ·Σ_k p_k log p_k: the confidence penalty (negative entropy).

    References: Pereyra et al. 2017, "Regularizing Neural Networks by Penalizing
    Confident Output Distributions", Eq. 2 (confidence penalty, β = λ).
    """

    def __init__(self, lam: float = 0.1, warmup_epochs: int = 0) -> None:
        super().__init__(lam, warmup_epochs)

    def penalty(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=1)
        # p·log p from log-softmax is finite (0 where p underflows), unlike p·log(p).
        return (log_p.exp() * log_p).sum(dim=1).mean()


class LabelSmoothing(Loss):
    """Cross-entropy against a smoothed target; ``spread`` says where α goes.

    ``spread="others"`` (the default): 1−α on y and α/(K−1) on every other class, so α
    is exactly the mass moved off the true class (docs/design.md §4).
    ``spread="all"``: Müller et al.'s y_LS = (1−α)·y + α/K on every class, y included
    (y gets 1−α+α/K); this equals ``F.cross_entropy(..., label_smoothing=α)``.

    References: Szegedy et al. 2016, "Rethinking the Inception Architecture for
    Computer Vision", §7; Müller et al. 2019, "When Does Label Smoothing Help?"
    (NeurIPS), §2, y_k^LS = y_k(1 − α) + α/K (``spread="all"``).
    """

    SPREADS = ("others", "all")

    def __init__(self, alpha: float = 0.05, spread: str = "others") -> None:
        super().__init__()
        if not 0 <= alpha < 1:
            raise ValueError(f"loss.alpha must be in [0, 1), got {alpha}")
        if spread not in self.SPREADS:
            raise ValueError(f"loss.spread={spread!r} is not supported; allowed: {', '.join(self.SPREADS)}.")
        self.alpha, self.spread = float(alpha), spread

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        log_p = torch.log_softmax(logits, dim=1)
        target_term = log_p.gather(1, targets[:, None]).squeeze(1)
        if self.alpha == 0:
            return -target_term.mean()
        if self.spread == "all":
            # (1−α)·(−log p_y) + (α/K)·Σ_k (−log p_k)
            return -((1 - self.alpha) * target_term + self.alpha / k * log_p.sum(dim=1)).mean()
        other_term = log_p.sum(dim=1) - target_term
        return -((1 - self.alpha) * target_term + self.alpha / (k - 1) * other_term).mean()


class Mixup(Loss):
    """x̃ = βx_a + (1−β)x_b with β ~ Beta(α, α) and b a shuffle of the batch;
    loss = β·CE(z, y_a) + (1−β)·CE(z, y_b).

    Mixing happens in the ``mix`` hook, which the training loop calls on every batch;
    one β per batch, as in the paper.

    References: Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization", Eq. 1;
    Thulasidasan et al. 2019, "On Mixup Training" (its effect on calibration).
    """

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"loss.alpha must be > 0 for mixup, got {alpha}")
        self.alpha = float(alpha)
        self.beta = torch.distributions.Beta(self.alpha, self.alpha)

    def mix(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, object]:
        weight = float(self.beta.sample())
        perm = torch.randperm(len(targets), device=inputs.device)
        return weight * inputs + (1 - weight) * inputs[perm], (targets, targets[perm], weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor | tuple) -> torch.Tensor:
        if isinstance(targets, torch.Tensor):
            return F.cross_entropy(logits, targets)
        y_a, y_b, weight = targets
        return weight * F.cross_entropy(logits, y_a) + (1 - weight) * F.cross_entropy(logits, y_b)


class FocalLoss(Loss):
    """Focal loss, −(1 − p_y)^γ log p_y, averaged over the batch.

    The weight (1 − p_y)^γ shrinks the loss of samples the model already classifies
    confidently, so training stops pushing their logits apart; γ = 0 is cross-entropy.
    ``gamma_schedule=None`` uses the fixed ``gamma`` (the default γ = 3 is the paper's
    FL-3). ``gamma_schedule="sd53"`` is the paper's sample-dependent FLSD-53: γ = 5 for
    p_y ∈ [0, 0.2) and γ = 3 for p_y ∈ [0.2, 1]; ``gamma`` is then unused. The weight is
    part of the graph: the gradient flows through it, as in the paper's code.

    References: Mukhoti et al. 2020, "Calibrating Deep Neural Networks using Focal
    Loss" (NeurIPS), §4: the focal loss L_f = −(1 − p̂_{i,y_i})^γ log p̂_{i,y_i}, FL-3 and
    FLSD-53; Lin et al. 2017, "Focal Loss for Dense Object Detection", Eq. 4 (the
    definition); docs/design.md §4, row ``focal``.
    """

    # FLSD-53: samples with p_y below the threshold get the larger γ.
    SD53_THRESHOLD, SD53_LOW_GAMMA, SD53_HIGH_GAMMA = 0.2, 5.0, 3.0

    def __init__(self, gamma: float = 3.0, gamma_schedule: str | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise UserError(f"loss.gamma must be >= 0, got {gamma}.")
        if gamma_schedule not in (None, "sd53"):
            raise UserError(f"loss.gamma_schedule={gamma_schedule!r} is not supported; allowed: null, sd53.")
        self.gamma, self.gamma_schedule = float(gamma), gamma_schedule

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        if k < 2:
            raise ValueError("focal loss needs at least 2 classes")
        log_p = torch.log_softmax(logits, dim=1)
        is_target = F.one_hot(targets, k).bool()
        # log(1 − p_y) as a log-sum-exp over the other classes: accurate and with a finite
        # gradient where p_y rounds to 1, where 1 − p_y would cancel to 0 (and 0^γ has an
        # infinite derivative for γ < 1).
        log_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1)
        weight = torch.exp(self.sample_gamma(log_p.detach(), is_target) * log_rest)
        # nll_loss over the weighted log-probabilities: at γ = 0 every weight is exactly 1,
        # so the loss equals F.cross_entropy bit for bit.
        return F.nll_loss(weight[:, None] * log_p, targets)

    def sample_gamma(self, log_p: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor | float:
        """γ for each sample: the fixed ``gamma``, or FLSD-53's choice from its p_y."""
        if self.gamma_schedule is None:
            return self.gamma
        p_y = log_p[is_target].exp()
        return torch.where(p_y < self.SD53_THRESHOLD, self.SD53_LOW_GAMMA, self.SD53_HIGH_GAMMA).to(log_p.dtype)


class BrierLoss(Loss):
    """The Brier score as a training loss: Σ_k (p_k − [k = y])², averaged over the batch.

    A proper scoring rule, so its minimiser is the true class distribution; unlike
    cross-entropy it stays bounded (at most 2 per sample) as a wrong prediction becomes
    confident, which is why it trains less overconfident networks.

    References: Brier 1950, "Verification of Forecasts Expressed in Terms of
    Probability", Monthly Weather Review 78(1) (the score); Mukhoti et al. 2020,
    "Calibrating Deep Neural Networks using Focal Loss" (NeurIPS), §3 and Table 1 (the
    Brier loss as a train-time calibration baseline); docs/design.md §4, row ``brier``.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(targets, logits.shape[1]).to(probs.dtype)
        return ((probs - onehot) ** 2).sum(dim=1).mean()
