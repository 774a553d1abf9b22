"""Training objectives (docs/design.md §4). Each is called as ``loss(logits, targets)`` and
returns the mean over the batch; p = softmax(z), K classes, y the label.

The training loop calls three hooks on every loss, whatever it is: ``set_epoch(epoch)``
before each epoch, ``mix(inputs, targets)`` before each forward pass and
``observe_validation(logits, labels)`` after each epoch's validation. All do nothing by
default; losses that need the epoch (λ warm-up), the inputs (mixup) or the validation
split's calibration (AdaFocal) override them, so the loop never branches on which loss
it runs. A loss's state (its buffers) travels in the run's checkpoint.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibrun import UserError

log = logging.getLogger(__name__)


class Loss(nn.Module):
    """Base class: the hooks the training loop calls for every loss."""

    def set_epoch(self, epoch: int) -> None:
        """Told the 0-based epoch before it starts."""

    def mix(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, object]:
        """May transform a training batch before the forward pass; identity by default."""
        return inputs, targets

    def observe_validation(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Shown the validation split's logits and labels after each epoch (the weights the
        next epoch starts from); a loss that adapts to its calibration (AdaFocal) learns here."""


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
    gap by λ/B, and the learning rate keeps its meaning). docs/reproductions/table1.md
    gives the measurements that chose ``summed_ce`` for the Table 1 presets.

    The gap term is also DCA, the "difference between confidence and accuracy" of Liang et
    al. 2020: config ``dca`` is this class with β = λ = 1 and no cap, one implementation
    for both papers. β = 1 is the DCA baseline of the MDCA authors' CIFAR-10 script; the
    DCA authors' own code defaults to β = 10 (for medical images).

    References: the gap+cap paper reproduced by ``make reproduce-table1`` (its Table 1:
    CE, CE + gap, capped CE + gap, λ = 10); Liang, Zhang, Wang and Zhou 2020, "Improved
    Trainable Calibration Method for Neural Networks on Medical Imaging Classification"
    (BMVC), its loss CE + β·DCA (authors' code: GB-TonyLiang/DCA, loss_fn.py);
    docs/design.md §4, rows ``gap``, ``gap_cap``, ``dca``.
    """

    READINGS = ("mean_ce", "summed_ce")

    def __init__(self, lam: float = 10.0, cap: float | None = None, warmup_epochs: int = 0,
                 lam_reading: str = "mean_ce") -> None:
        super().__init__(lam, warmup_epochs)
        if cap is not None and not 0 < cap <= 1:
            raise ValueError(f"loss.cap must be in (0, 1] or null, got {cap}")
        if lam_reading not in self.READINGS:
            raise UserError(f"loss.lam_reading={lam_reading!r} is not a reading of λ; "
                            f"allowed: {', '.join(self.READINGS)}.")
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


def _top_label_correctness(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's top-label confidence (in the graph) and whether its top label is right
    (a constant 0/1 of the same dtype)."""
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    return confidence, (predicted == targets).to(confidence.dtype)


class MMCE(PenalizedLoss):
    """CE + λ·MMCE: the maximum mean calibration error, a kernel measure of the gap
    between top-label confidence r_i and correctness c_i over the batch.

    ``weighted=False``: MMCE² = Σ_ij (c_i − r_i)(c_j − r_j) k(r_i, r_j) / m² (the paper's
    MMCE_m, m the batch size). ``weighted=True`` (the default, the paper's MMCE_w for training):
    the correct (n of them) and wrong (m − n) samples are averaged separately, so the
    many correct ones do not swamp the few wrong ones:
    MMCE_w² = Σ_{c_i=c_j=0} r_i r_j k/(m−n)² + Σ_{c_i=c_j=1} (1−r_i)(1−r_j) k/n²
    − 2 Σ_{c_i=1, c_j=0} (1−r_i) r_j k/((m−n) n). The penalty is √MMCE², with the
    Laplacian kernel k(r, r′) = exp(−|r − r′|/ω), ω = ``kernel_width`` = 0.4. A batch
    that is all right or all wrong has no weighted penalty (one of the averages is empty).

    ``normalisation`` names a reading of the code the field compares against:
    ``paper`` (the default) is the formula above; ``focal_calibration`` repeats Mukhoti
    et al. 2020's MMCE_w (their repository's Losses/mmce.py), which divides each pair sum
    by the square of its group's size twice (a mean over the pairs, then n² again), so
    its penalty is smaller by about a factor of the batch's group sizes and λ = 2 there is
    a far weaker penalty than λ = 2 here.

    References: Kumar, Sarawagi and Jain 2018, "Trainable Calibration Measures for Neural
    Networks from Kernel Mean Embeddings" (ICML): MMCE_m and MMCE_w as above, the loss
    NLL + λ·MMCE, the Laplacian kernel of width 0.4 (their code, aviralkumar2907/MMCE:
    exp(−|r_i − r_j|/(2·0.2))); λ = 2 is Mukhoti et al. 2020's CIFAR-10 setting (their
    train_scripts/cifar10.sh, with their normalisation); docs/design.md §4, row ``mmce``.
    """

    NORMALISATIONS = ("paper", "focal_calibration")

    def __init__(self, lam: float = 2.0, weighted: bool = True, kernel_width: float = 0.4,
                 normalisation: str = "paper", warmup_epochs: int = 0) -> None:
        super().__init__(lam, warmup_epochs)
        if not kernel_width > 0:
            raise UserError(f"loss.kernel_width must be > 0, got {kernel_width}.")
        if normalisation not in self.NORMALISATIONS:
            raise UserError(f"loss.normalisation={normalisation!r} is not supported; allowed: "
                            f"{', '.join(self.NORMALISATIONS)}.")
        self.weighted, self.kernel_width, self.normalisation = bool(weighted), float(kernel_width), normalisation

    def penalty(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The square root's derivative is infinite at 0; the clamp keeps a perfectly
        # calibrated batch's gradient finite (the paper's code adds 1e-10 likewise).
        return self.squared(*_top_label_correctness(logits, targets)).clamp(min=1e-10).sqrt()

    def squared(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """MMCE² (or MMCE_w²) of confidences ``r`` and 0/1 correctness ``c``."""
        kernel = torch.exp(-(r[:, None] - r[None, :]).abs() / self.kernel_width)
        if self.weighted:
            return self._weighted_squared(r, c, kernel)
        return (c - r) @ kernel @ (c - r) / len(r) ** 2

    def _weighted_squared(self, r: torch.Tensor, c: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        n_right, n_wrong = c.sum(), (1 - c).sum()
        if n_right == 0 or n_wrong == 0:
            return torch.zeros((), dtype=r.dtype, device=r.device)
        # Each sample's weight within its group: 1 − r if right, r if wrong, signed so that
        # the cross term enters with −2.
        right_weight, wrong_weight = c * (1 - r), (1 - c) * r
        power = 4 if self.normalisation == "focal_calibration" else 2
        right_right = right_weight @ kernel @ right_weight / n_right ** power
        wrong_wrong = wrong_weight @ kernel @ wrong_weight / n_wrong ** power
        cross = right_weight @ kernel @ wrong_weight / (n_right * n_wrong) ** (power // 2)
        return right_right + wrong_wrong - 2 * cross


class MDCA(Loss):
    """A base loss plus β·MDCA, the multi-class difference of confidence and accuracy:
    (1/K)·Σ_k |mean_i p_ik − mean_i [y_i = k]|, each class's mean predicted probability
    against its frequency in the batch.

    ``base`` is any loss (a config node with its own ``_target_``): cross-entropy by
    default, or the paper's focal loss or label smoothing
    (``loss.base._target_=calibrun.losses.FocalLoss +loss.base.gamma=1``). The base loss's
    hooks are called through this one.

    References: Hebbalaguppe, Prakash, Madan and Arora 2022, "A Stitch in Time Saves Nine:
    A Train-Time Regularizing Loss for Improved Neural Network Calibration" (CVPR): L_MDCA
    as above and L_C + β·L_MDCA; β = 1 with CE, focal (γ = 1) or label smoothing (α = 0.1)
    in their CIFAR-10 script (mdca-loss/MDCA-Calibration, scripts/cifar10.sh);
    docs/design.md §4, row ``mdca``.
    """

    def __init__(self, beta: float = 1.0, base: nn.Module | None = None) -> None:
        super().__init__()
        if beta < 0:
            raise UserError(f"loss.beta must be >= 0, got {beta}.")
        self.beta = float(beta)
        self.base = as_loss(base) if base is not None else CrossEntropy()

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def observe_validation(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.base.observe_validation(logits, labels)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base(logits, targets) + self.beta * self.penalty(logits, targets)

    def penalty(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        frequency = F.one_hot(targets, logits.shape[1]).to(probs.dtype).mean(dim=0)
        return (probs.mean(dim=0) - frequency).abs().mean()


class MarginLabelSmoothing(PenalizedLoss):
    """MbLS: CE + λ·Σ_k max(0, max_j z_j − z_k − m), a linear penalty on the logit
    distances to the largest logit that exceed the margin m. Below the margin it is plain
    CE; label smoothing is the case that pushes every distance to 0 (m = 0, squared).

    ``class_reduction`` names a difference between the paper and its code: ``mean`` (the
    default, the authors' LogitMarginL1, which produced their numbers: a mean over the
    batch and the K classes) or ``sum`` (the paper's Σ_k, K times larger at the same λ).

    References: Liu, Ben Ayed, Galdran and Dolz 2022, "The Devil is in the Margins:
    Margin-based Label Smoothing for Network Calibration" (CVPR): min L_CE + λ·Σ_k max(0,
    max_j l_j − l_k − m) (Eq. 4 of the authors' poster); m = 10 and λ = 0.1 are their code's
    defaults (by-liu/MbLS, configs/loss/logit_margin.yaml); docs/design.md §4, row ``mbls``.
    """

    REDUCTIONS = ("mean", "sum")

    def __init__(self, margin: float = 10.0, lam: float = 0.1, class_reduction: str = "mean",
                 warmup_epochs: int = 0) -> None:
        super().__init__(lam, warmup_epochs)
        if margin < 0:
            raise UserError(f"loss.margin must be >= 0, got {margin}.")
        if class_reduction not in self.REDUCTIONS:
            raise UserError(f"loss.class_reduction={class_reduction!r} is not supported; allowed: "
                            f"{', '.join(self.REDUCTIONS)}.")
        self.margin, self.class_reduction = float(margin), class_reduction

    def penalty(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        distance = logits.max(dim=1, keepdim=True).values - logits
        excess = F.relu(distance - self.margin)
        per_sample = excess.mean(dim=1) if self.class_reduction == "mean" else excess.sum(dim=1)
        return per_sample.mean()


class AdaFocal(Loss):
    """Focal loss with one γ per confidence bin, adapted after every epoch to the
    validation split's calibration, switching a bin to inverse focal loss where the model
    is underconfident.

    A sample's γ is that of the bin its true-class probability p_y falls in (each edge
    belongs to the bin above it; the end bins are open). γ ≥ 0: −(1 − p_y)^γ log p_y
    (focal); γ < 0: −(1 + p_y)^|γ| log p_y (inverse focal, which pushes confident samples
    harder). After each epoch the validation split's top-label confidences are cut into
    ``n_bins`` equal-mass bins, which become the new bins, and each bin's γ moves by its
    gap E_b = mean confidence − accuracy: γ ← γ·exp(λ·E_b) for γ > 0, γ·exp(−λ·E_b)
    otherwise (an overconfident bin, E_b > 0, grows a focal γ and shrinks an inverse one).
    A γ that ends within ``switch_threshold`` of 0 jumps to the other side (γ > 0 to
    −S_th, γ ≤ 0 to +S_th), then γ is clipped to [``gamma_min``, ``gamma_max``]. Epoch 1
    uses ``gamma_initial`` in ``n_bins`` equal-width bins of [0, 1].

    The state (γ and edges) is part of the module, so a resumed run continues it. The
    validation split steers training here, as in the paper; it still never sees the test
    split, but the calibrators fitted on it afterwards see a split the loss adapted to.
    The authors' code sums over the batch; calibrun averages (the same objective over B).

    References: Ghosh, Schaaf and Gormley 2022, "AdaFocal: Calibration-aware Adaptive
    Focal Loss" (NeurIPS): the γ update and the switch to inverse focal loss; the
    defaults (λ = 1, γ₀ = 1, S_th = 0.2, γ ∈ [−2, 20], 15 bins) and the binning are their
    code's (github.com/3mcloud/adafocal, main.py and losses/adafocal.py); docs/design.md
    §4, row ``adafocal``.
    """

    # Buffers (register_buffer), declared so that they type as tensors, not Tensor | Module.
    gamma: torch.Tensor
    edges: torch.Tensor

    def __init__(self, lam: float = 1.0, gamma_initial: float = 1.0, switch_threshold: float = 0.2,
                 gamma_min: float = -2.0, gamma_max: float = 20.0, n_bins: int = 15) -> None:
        super().__init__()
        if n_bins < 1:
            raise UserError(f"loss.n_bins must be >= 1, got {n_bins}.")
        if not gamma_min <= gamma_initial <= gamma_max:
            raise UserError(f"loss.gamma_initial={gamma_initial} must lie in [loss.gamma_min, loss.gamma_max] = "
                            f"[{gamma_min}, {gamma_max}].")
        if switch_threshold < 0:
            raise UserError(f"loss.switch_threshold must be >= 0, got {switch_threshold}.")
        self.lam, self.switch_threshold = float(lam), float(switch_threshold)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.register_buffer("gamma", torch.full((n_bins,), float(gamma_initial), dtype=torch.float64))
        self.register_buffer("edges", torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=1)
        log_p_y = log_p.gather(1, targets[:, None]).squeeze(1)
        gamma = self.sample_gamma(log_p_y.detach().exp()).to(log_p.dtype)
        is_target = F.one_hot(targets, logits.shape[1]).bool()
        # log(1 − p_y) through the other classes (finite where p_y rounds to 1), log(1 + p_y) directly.
        log_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1)
        log_base = torch.where(gamma >= 0, log_rest, torch.log1p(log_p_y.exp()))
        return -(torch.exp(gamma.abs() * log_base) * log_p_y).mean()

    def sample_gamma(self, p_y: torch.Tensor) -> torch.Tensor:
        """Each sample's γ: that of the bin its p_y falls in."""
        inner = self.edges[1:-1].to(p_y.dtype)
        return self.gamma[torch.searchsorted(inner, p_y.contiguous(), right=True)]

    @torch.no_grad()
    def observe_validation(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        confidence, predicted = torch.softmax(logits.double(), dim=1).max(dim=1)
        correct = (predicted == labels).double()
        edges = self.equal_mass_edges(confidence, len(self.gamma))
        bin_of = torch.searchsorted(edges[1:-1].contiguous(), confidence, right=True)
        count = torch.bincount(bin_of, minlength=len(self.gamma)).double()
        # An empty bin has gap 0 (its γ stays), as in the authors' code.
        gap = (torch.bincount(bin_of, confidence - correct, minlength=len(self.gamma)) / count.clamp(min=1))
        self.gamma.copy_(self.updated_gamma(self.gamma, gap.to(self.gamma.device)))
        self.edges.copy_(edges.to(self.edges.device))
        log.info("AdaFocal γ per validation bin (low to high confidence): %s",
                 " ".join(f"{g:.3g}" for g in self.gamma.tolist()))

    @staticmethod
    def equal_mass_edges(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
        """``n_bins + 1`` edges holding equal numbers of the sorted confidences, interpolated
        between order statistics (Mukhoti et al.'s adaptive-ECE edges)."""
        ordered = confidence.sort().values.cpu().numpy()
        positions = np.linspace(0, len(ordered), n_bins + 1)
        return torch.from_numpy(np.interp(positions, np.arange(len(ordered)), ordered))

    def updated_gamma(self, gamma: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        """The paper's rule: multiplicative step, switch across 0, clip."""
        step = torch.where(gamma > 0, self.lam * gap, -self.lam * gap)
        new = gamma * torch.exp(step)
        threshold = torch.full_like(new, self.switch_threshold)
        flipped = torch.where(new > 0, -threshold, threshold)
        new = torch.where(new.abs() < self.switch_threshold, flipped, new)
        return new.clamp(self.gamma_min, self.gamma_max)
