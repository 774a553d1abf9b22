"""Every loss against a direct computation of its formula (docs/design.md §4)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from calibrun import UserError
from calibrun.compose import config_dir
from calibrun.losses import (
    MDCA,
    MMCE,
    AdaFocal,
    CrossEntropy,
    EntropyRegularized,
    FocalLoss,
    GapLoss,
    LabelSmoothing,
    MarginLabelSmoothing,
    Mixup,
    NonTargetSmoothing,
)

# Every loss a user can pick: the YAML files of conf/loss.
LOSS_NAMES = sorted(p.stem for p in (Path(config_dir()) / "loss").glob("*.yaml"))

# One confident correct sample (p_y > 0.99) and two misclassified ones.
LOGITS = np.array([[10.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [1.0, 0.5, -0.5, 2.0], [0.2, 0.1, 0.0, -0.1]])
LABELS = np.array([0, 0, 3, 1])


def softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def ref_ce():
    return float(np.mean([-math.log(softmax(z)[y]) for z, y in zip(LOGITS, LABELS)]))


def ref_gap_term():
    probs = [softmax(z) for z in LOGITS]
    conf = np.mean([max(p) for p in probs])
    acc = np.mean([int(np.argmax(p) == y) for p, y in zip(probs, LABELS)])
    return abs(conf - acc)


def ref_capped_ce(cap):
    return float(np.mean([-math.log(min(softmax(z)[y], cap)) for z, y in zip(LOGITS, LABELS)]))


def ref_nts():
    total = 0.0
    for z, y in zip(LOGITS, LABELS):
        others = [v for j, v in enumerate(z) if j != y]
        q = softmax(others)
        total += sum(-math.log(qj) for qj in q) / (len(z) - 1)
    return total / len(LABELS)


def ref_neg_entropy():
    return float(np.mean([sum(pk * math.log(pk) for pk in softmax(z)) for z in LOGITS]))


def ref_label_smoothing(alpha):
    k = LOGITS.shape[1]
    total = 0.0
    for z, y in zip(LOGITS, LABELS):
        p = softmax(z)
        total += -sum(((1 - alpha) if j == y else alpha / (k - 1)) * math.log(p[j]) for j in range(k))
    return total / len(LABELS)


def ref_focal(gamma_of_p):
    """−(1 − p_y)^γ log p_y, mean over the batch; γ may depend on p_y (FLSD-53)."""
    terms = []
    for z, y in zip(LOGITS, LABELS):
        p_y = softmax(z)[y]
        terms.append(-((1 - p_y) ** gamma_of_p(p_y)) * math.log(p_y))
    return float(np.mean(terms))


def ref_brier():
    """Σ_k (p_k − [k = y])², mean over the batch (Brier 1950)."""
    return float(np.mean([sum((pk - (k == y)) ** 2 for k, pk in enumerate(softmax(z))) for z, y in zip(LOGITS, LABELS)]))


def top_label(z, y):
    """Top-label confidence r and correctness c (0/1) of each sample of LOGITS."""
    probs = [softmax(row) for row in z]
    return [max(p) for p in probs], [int(int(np.argmax(p)) == label) for p, label in zip(probs, y)]


def ref_mmce_squared(weighted, pair_power=2, width=0.4, z=LOGITS, y=LABELS):
    """Kumar et al. 2018, Eq. 3 (MMCE²) and §4 (MMCE_w²), Laplacian kernel, by loops.
    ``pair_power=4`` divides each pair sum by its group size to the 4th, as Mukhoti et
    al.'s code does (a mean over the pairs, then the square of the group size again)."""
    r, c = top_label(z, y)
    m = len(r)

    def k(a, b):
        return math.exp(-abs(a - b) / width)

    if not weighted:
        return sum((c[i] - r[i]) * (c[j] - r[j]) * k(r[i], r[j]) for i in range(m) for j in range(m)) / m**2
    right, wrong = [i for i in range(m) if c[i]], [i for i in range(m) if not c[i]]
    n = len(right)
    s_ww = sum(r[i] * r[j] * k(r[i], r[j]) for i in wrong for j in wrong) / (m - n) ** pair_power
    s_rr = sum((1 - r[i]) * (1 - r[j]) * k(r[i], r[j]) for i in right for j in right) / n**pair_power
    s_rw = sum((1 - r[i]) * r[j] * k(r[i], r[j]) for i in right for j in wrong) / ((m - n) * n) ** (pair_power // 2)
    return s_ww + s_rr - 2 * s_rw


def ref_mdca(z=LOGITS, y=LABELS):
    """Hebbalaguppe et al. 2022, Eq. 3: (1/K)·Σ_k |mean_i p_ik − mean_i [y_i = k]|."""
    k = z.shape[1]
    probs = [softmax(row) for row in z]
    return sum(abs(np.mean([p[j] for p in probs]) - np.mean([int(label == j) for label in y])) for j in range(k)) / k


def ref_margin_penalty(margin, reduce_classes=np.mean, z=LOGITS):
    """Liu et al. 2022: max(0, max_j z_j − z_k − m) per class k, reduced over k, mean over i."""
    return float(np.mean([reduce_classes([max(0.0, max(row) - v - margin) for v in row]) for row in z]))


def sd53(p_y):
    """FLSD-53 (Mukhoti et al. 2020): γ = 5 for p_y in [0, 0.2), 3 for p_y in [0.2, 1]."""
    return 5.0 if p_y < 0.2 else 3.0


def value(loss, logits=LOGITS, labels=LABELS):
    return float(loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels)))


# Each configured loss at its YAML defaults (the README's "defaults" column) on LOGITS.
# Mixup without its mix hook sees plain targets and is CE.
CONFIG_DEFAULTS = {
    "ce": ref_ce,
    "gap": lambda: ref_ce() + 10 * ref_gap_term(),
    "gap_cap": lambda: ref_capped_ce(0.5) + 10 * ref_gap_term(),
    "nts": lambda: ref_ce() + 0.5 * ref_nts(),
    "erl": lambda: ref_ce() + 0.1 * ref_neg_entropy(),
    "label_smoothing": lambda: ref_label_smoothing(0.05),
    "mixup": ref_ce,
    "focal": lambda: ref_focal(lambda p: 3.0),
    "brier": ref_brier,
    "dca": lambda: ref_ce() + 1.0 * ref_gap_term(),
    "mmce": lambda: ref_ce() + 2.0 * math.sqrt(ref_mmce_squared(weighted=True)),
    "mdca": lambda: ref_ce() + 1.0 * ref_mdca(),
    "mbls": lambda: ref_ce() + 0.1 * ref_margin_penalty(10.0),
    # Before its first validation every bin has γ = 1: focal loss with γ = 1.
    "adafocal": lambda: ref_focal(lambda p: 1.0),
}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_configured_loss_matches_its_formula_at_its_defaults(compose_cfg, name):
    assert name in CONFIG_DEFAULTS, f"conf/loss/{name}.yaml has no reference formula in this file"
    loss = instantiate(compose_cfg([f"loss={name}"]).loss)
    assert value(loss) == pytest.approx(CONFIG_DEFAULTS[name](), abs=1e-10, rel=0)


def test_cap_and_gap_act_on_the_samples_they_should():
    """On LOGITS, samples 0 and 2 have p_y > 0.5 and samples 1 and 3 are misclassified."""
    z, y = torch.tensor(LOGITS), torch.tensor(LABELS)
    p = [softmax(row)[label] for row, label in zip(LOGITS, LABELS)]
    # Capping at c = 0.5 raises exactly the terms of samples 0 and 2, from −log p_y to −log c.
    raised = (math.log(p[0]) - math.log(0.5) + math.log(p[2]) - math.log(0.5)) / 4
    assert value(GapLoss(lam=0, cap=0.5)) - value(CrossEntropy()) == pytest.approx(raised, abs=1e-12)
    # The gap compares the mean top-label confidence with the batch accuracy, 2/4.
    mean_confidence = np.mean([max(softmax(row)) for row in LOGITS])
    assert float(GapLoss(lam=1).penalty(z, y)) == pytest.approx(abs(mean_confidence - 0.5), abs=1e-12)


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (GapLoss(lam=2.5), lambda: ref_ce() + 2.5 * ref_gap_term()),
        (GapLoss(lam=2.5, cap=0.9), lambda: ref_capped_ce(0.9) + 2.5 * ref_gap_term()),
        (NonTargetSmoothing(lam=2), lambda: ref_ce() + 2 * ref_nts()),
        (EntropyRegularized(lam=1), lambda: ref_ce() + ref_neg_entropy()),
        (LabelSmoothing(alpha=0.3), lambda: ref_label_smoothing(0.3)),
        (FocalLoss(gamma=1), lambda: ref_focal(lambda p: 1.0)),
        (FocalLoss(gamma=0.5), lambda: ref_focal(lambda p: 0.5)),
        (FocalLoss(gamma_schedule="sd53"), lambda: ref_focal(sd53)),
        (MMCE(lam=0.5, weighted=False), lambda: ref_ce() + 0.5 * math.sqrt(ref_mmce_squared(weighted=False))),
        (MMCE(lam=1.0, kernel_width=0.2), lambda: ref_ce() + math.sqrt(ref_mmce_squared(weighted=True, width=0.2))),
        (MMCE(lam=2.0, normalisation="focal_calibration"),
         lambda: ref_ce() + 2.0 * math.sqrt(ref_mmce_squared(weighted=True, pair_power=4))),
        (MDCA(beta=3.0), lambda: ref_ce() + 3.0 * ref_mdca()),
        (MDCA(beta=1.0, base=FocalLoss(gamma=1)), lambda: ref_focal(lambda p: 1.0) + ref_mdca()),
        (MDCA(beta=1.0, base=LabelSmoothing(alpha=0.1)), lambda: ref_label_smoothing(0.1) + ref_mdca()),
        (MarginLabelSmoothing(margin=2.0, lam=0.5), lambda: ref_ce() + 0.5 * ref_margin_penalty(2.0)),
        (MarginLabelSmoothing(margin=2.0, lam=0.5, class_reduction="sum"),
         lambda: ref_ce() + 0.5 * ref_margin_penalty(2.0, reduce_classes=np.sum)),
    ],
    ids=["gap_2.5", "gap_cap_0.9", "nts_2", "erl_1", "ls_0.3", "focal_1", "focal_0.5", "flsd_53", "mmce_unweighted",
         "mmce_width_0.2", "mmce_focal_calibration", "mdca_3", "mdca_focal", "mdca_ls", "mbls_m2", "mbls_sum"],
)
def test_loss_matches_its_formula_away_from_the_defaults(loss, expected):
    assert value(loss) == pytest.approx(expected(), abs=1e-10, rel=0)


def test_mixup_loss_matches_formula_and_mixes_inputs():
    torch.manual_seed(0)
    loss = Mixup(alpha=0.2)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor(LABELS)
    mixed, (y_a, y_b, beta) = loss.mix(x, y)
    assert torch.equal(y_a, y)
    assert 0 <= beta <= 1
    # Every mixed input is β·x_i + (1−β)·x_j for the j whose label is y_b[i].
    for i in range(4):
        assert any(torch.allclose(mixed[i], beta * x[i] + (1 - beta) * x[j]) for j in range(4) if y[j] == y_b[i])
    z = torch.tensor(LOGITS)
    expected = beta * F.cross_entropy(z, y_a) + (1 - beta) * F.cross_entropy(z, y_b)
    assert float(loss(z, (y_a, y_b, beta))) == pytest.approx(float(expected), abs=1e-10)
    assert value(loss) == pytest.approx(ref_ce(), abs=1e-10), "unmixed targets give plain CE"


def test_penalised_losses_equal_their_base_with_lam_zero():
    ce = value(CrossEntropy())
    assert value(GapLoss(lam=0)) == ce
    assert value(NonTargetSmoothing(lam=0)) == ce
    assert value(EntropyRegularized(lam=0)) == ce
    assert value(LabelSmoothing(alpha=0)) == ce
    assert value(FocalLoss(gamma=0)) == ce
    assert value(MMCE(lam=0)) == ce
    assert value(MarginLabelSmoothing(margin=0, lam=0)) == ce
    assert value(MDCA(beta=0)) == ce
    assert value(GapLoss(lam=0, cap=0.5)) == pytest.approx(ref_capped_ce(0.5), abs=1e-12)


def test_torch_label_smoothing_differs_as_documented():
    k, alpha = LOGITS.shape[1], 0.05
    torch_value = float(F.cross_entropy(torch.tensor(LOGITS), torch.tensor(LABELS), label_smoothing=alpha))
    # torch's α spreads α/K over all classes; ours spreads α over the K−1 others.
    assert torch_value == pytest.approx(ref_label_smoothing(alpha * (k - 1) / k), abs=1e-10)
    assert torch_value != pytest.approx(value(LabelSmoothing(alpha)), abs=1e-6)


# K = 3, logits (ln 2, 0, 0): softmax = (2, 1, 1)/4 = (1/2, 1/4, 1/4), so
# −log p = (ln 2, 2 ln 2, 2 ln 2). Two samples: y = 0 and y = 1; α = 0.3.
HAND_LOGITS = np.array([[math.log(2), 0.0, 0.0], [math.log(2), 0.0, 0.0]])
HAND_LABELS = np.array([0, 1])
LN2 = math.log(2)


def test_label_smoothing_spread_others_by_hand():
    # Target 1−α = 0.7 on y, α/(K−1) = 0.15 on each other class.
    # y = 0: 0.7·ln2 + 0.15·(2ln2 + 2ln2) = 0.7 ln2 + 0.6 ln2 = 1.3 ln2
    # y = 1: 0.7·2ln2 + 0.15·(ln2 + 2ln2) = 1.4 ln2 + 0.45 ln2 = 1.85 ln2
    # mean: (1.3 + 1.85)/2 · ln2 = 1.575 ln2
    loss = LabelSmoothing(alpha=0.3, spread="others")
    assert value(loss, HAND_LOGITS, HAND_LABELS) == pytest.approx(1.575 * LN2, abs=1e-12, rel=0)


def test_label_smoothing_spread_all_by_hand():
    # Müller et al.: (1−α)·y + α/K: 0.7 + 0.1 = 0.8 on y, α/K = 0.1 on each other class.
    # y = 0: 0.8·ln2 + 0.1·(2ln2 + 2ln2) = 0.8 ln2 + 0.4 ln2 = 1.2 ln2
    # y = 1: 0.8·2ln2 + 0.1·(ln2 + 2ln2) = 1.6 ln2 + 0.3 ln2 = 1.9 ln2
    # mean: (1.2 + 1.9)/2 · ln2 = 1.55 ln2
    loss = LabelSmoothing(alpha=0.3, spread="all")
    assert value(loss, HAND_LOGITS, HAND_LABELS) == pytest.approx(1.55 * LN2, abs=1e-12, rel=0)


@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_label_smoothing_spread_all_is_torch_label_smoothing(alpha):
    z, y = torch.tensor(LOGITS), torch.tensor(LABELS)
    expected = float(F.cross_entropy(z, y, label_smoothing=alpha))
    assert value(LabelSmoothing(alpha, spread="all")) == pytest.approx(expected, abs=1e-12, rel=0)


def test_label_smoothing_bad_spread_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"loss\.spread='everywhere'.*allowed: others, all"):
        LabelSmoothing(spread="everywhere")


def test_label_smoothing_spread_is_a_config_value(compose_cfg):
    cfg = compose_cfg(["loss=label_smoothing", "loss.spread=all", "loss.alpha=0.3"])
    assert instantiate(cfg.loss).spread == "all"
    assert value(instantiate(cfg.loss), HAND_LOGITS, HAND_LABELS) == pytest.approx(1.55 * LN2, abs=1e-12)


def test_capped_term_has_no_gradient_for_samples_above_the_cap():
    z = torch.tensor(LOGITS, requires_grad=True)
    GapLoss(lam=0, cap=0.5)(z, torch.tensor(LABELS)).backward()
    assert torch.all(z.grad[0] == 0), "p_y > c: the capped CE must not push this sample"
    assert torch.any(z.grad[1] != 0)


def test_gap_gradient_equals_analytic_form():
    lam = 3.0
    z = torch.tensor(LOGITS, requires_grad=True)
    y = torch.tensor(LABELS)
    (GapLoss(lam=lam)(z, y) - F.cross_entropy(z, y)).backward()
    p = torch.softmax(z.detach(), dim=1)
    conf, top = p.max(dim=1)
    acc = (top == y).double().mean()
    # d max_k p_ik / d z_ij = p_ic (δ_jc − p_ij), c the arg-max; averaged over the batch.
    dconf = conf[:, None] * (F.one_hot(top, 4).double() - p) / len(y)
    expected = lam * torch.sign(conf.mean() - acc) * dconf
    torch.testing.assert_close(z.grad, expected, atol=1e-12, rtol=0)


def test_nts_is_finite_with_a_huge_margin():
    z = torch.tensor([[100.0, 0.0, -1.0, 0.5], [0.0, 0.0, 100.0, 0.0]], dtype=torch.float32, requires_grad=True)
    y = torch.tensor([0, 2])
    loss = NonTargetSmoothing(lam=0.5)(z, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_lam_warmup_ramps_linearly():
    loss = GapLoss(lam=10, warmup_epochs=4)
    seen = []
    for epoch in range(6):
        loss.set_epoch(epoch)
        seen.append(loss.current_lam)
    assert seen == [0.0, 2.5, 5.0, 7.5, 10.0, 10.0]
    constant = NonTargetSmoothing(lam=0.5)
    constant.set_epoch(0)
    assert constant.current_lam == 0.5


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GapLoss(lam=-1), "lam"),
        (lambda: GapLoss(cap=0), "cap"),
        (lambda: GapLoss(cap=1.5), "cap"),
        (lambda: NonTargetSmoothing(lam=-0.1), "lam"),
        (lambda: EntropyRegularized(warmup_epochs=-1), "warmup_epochs"),
        (lambda: LabelSmoothing(alpha=1.0), "alpha"),
        (lambda: LabelSmoothing(alpha=-0.1), "alpha"),
        (lambda: Mixup(alpha=0), "alpha"),
    ],
)
def test_bad_hyperparameters_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_focal_gamma_zero_is_cross_entropy_exactly():
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    assert torch.equal(FocalLoss(gamma=0)(z, y), F.cross_entropy(z, y))


@pytest.mark.parametrize(("p_y", "gamma"), [(0.2 - 1e-9, 5.0), (0.2, 3.0), (0.2 + 1e-9, 3.0), (0.05, 5.0), (0.9, 3.0)])
def test_flsd_53_switches_gamma_at_p_y_0_2(p_y, gamma):
    # Two classes, logits (log(p/(1−p)), 0): the first class has probability p.
    z = torch.tensor([[math.log(p_y / (1 - p_y)), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    expected = -((1 - p_y) ** gamma) * math.log(p_y)
    assert float(FocalLoss(gamma_schedule="sd53")(z, y)) == pytest.approx(expected, rel=1e-9)
    assert float(FocalLoss(gamma=gamma)(z, y)) == pytest.approx(expected, rel=1e-9)


def test_focal_gradient_flows_through_the_weight():
    """The gradient is that of −(1 − p_y)^γ log p_y as a whole, weight included."""
    z = torch.tensor(LOGITS, requires_grad=True)
    y = torch.tensor(LABELS)
    FocalLoss(gamma=3)(z, y).backward()
    direct = torch.tensor(LOGITS, requires_grad=True)
    p_y = torch.softmax(direct, dim=1).gather(1, y[:, None]).squeeze(1)
    (-((1 - p_y) ** 3) * torch.log(p_y)).mean().backward()
    torch.testing.assert_close(z.grad, direct.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("build", [lambda: FocalLoss(gamma=0.5), lambda: FocalLoss(gamma_schedule="sd53")])
def test_focal_is_finite_where_p_y_rounds_to_one(build):
    # float32 rounds p_y to exactly 1 here; (1 − p_y)^0.5 would have an infinite derivative.
    z = torch.tensor([[30.0, 0.0, -1.0], [0.0, 40.0, 0.0]], requires_grad=True)
    loss = build()(z, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"gamma": -0.5}, "loss.gamma must be >= 0"), ({"gamma_schedule": "sd35"}, "loss.gamma_schedule='sd35'")],
)
def test_focal_refuses_bad_hyperparameters_naming_the_key(kwargs, message):
    with pytest.raises(UserError, match=message):
        FocalLoss(**kwargs)


def test_a_plain_torch_module_trains_as_a_loss(compose_cfg, tmp_path):
    """No calibrun base class needed: torch's own CrossEntropyLoss through loss._target_."""
    from conftest import FAST

    from calibrun.config import validate
    from calibrun.train import run

    cfg = validate(compose_cfg([*FAST, "trainer.epochs=1", "calibrator=[temperature]",
                                "loss._target_=torch.nn.CrossEntropyLoss"]))
    run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "DONE").is_file()


def test_something_that_is_not_a_module_is_refused_as_a_loss():
    from calibrun import UserError
    from calibrun.losses import as_loss

    with pytest.raises(UserError, match="not a torch.nn.Module"):
        as_loss(lambda logits, targets: 0.0)


@pytest.mark.parametrize("cap", [None, 0.5])
def test_summed_ce_reading_weighs_the_gap_by_lambda_over_the_batch_size(cap):
    """λ = 10 read against a summed cross-entropy is the mean-CE objective with λ/B."""
    torch.manual_seed(0)
    logits, targets = torch.randn(32, 10), torch.randint(0, 10, (32,))
    summed = GapLoss(lam=10, cap=cap, lam_reading="summed_ce")(logits, targets)
    assert summed == pytest.approx(GapLoss(lam=10 / 32, cap=cap)(logits, targets).item(), rel=1e-6)
    assert summed != pytest.approx(GapLoss(lam=10, cap=cap)(logits, targets).item(), rel=1e-3)


def test_an_unknown_lambda_reading_is_refused():
    with pytest.raises(UserError, match="lam_reading"):
        GapLoss(lam_reading="sum")


def test_brier_loss_is_bounded_where_cross_entropy_is_not():
    """A confidently wrong sample costs cross-entropy its logit gap but Brier at most 2,
    and a confidently right one costs Brier nearly 0."""
    from calibrun.losses import BrierLoss

    wrong, right = np.array([[0.0, 50.0]]), np.array([[50.0, 0.0]])
    assert value(BrierLoss(), wrong, np.array([0])) == pytest.approx(2.0, abs=1e-12)
    assert value(CrossEntropy(), wrong, np.array([0])) == pytest.approx(50.0, abs=1e-9)
    assert value(BrierLoss(), right, np.array([0])) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_nts_raw_reading_is_rescaled_label_smoothing(lam):
    """With p′ the full softmax's probabilities, CE + λ·NTS = (1 + λ)·LS(α = λ/(1 + λ))."""
    raw = value(NonTargetSmoothing(lam=lam, p_prime="raw"))
    smoothing = value(LabelSmoothing(alpha=lam / (1 + lam), spread="others"))
    assert raw == pytest.approx((1 + lam) * smoothing, abs=1e-12, rel=0)
    assert value(NonTargetSmoothing(lam=lam)) != pytest.approx(raw, abs=1e-6)


def test_nts_renormalised_penalty_has_no_gradient_on_the_target_logit():
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    NonTargetSmoothing(lam=1.0).penalty(logits, torch.tensor(LABELS)).backward()
    on_target = logits.grad[torch.arange(len(LABELS)), torch.tensor(LABELS)]
    assert torch.equal(on_target, torch.zeros_like(on_target))


def test_nts_unknown_reading_names_the_key():
    with pytest.raises(UserError, match="loss.p_prime='softmax' is not a reading of p′; allowed: renormalised, raw"):
        NonTargetSmoothing(p_prime="softmax")


@pytest.mark.parametrize("weighted", [True, False])
def test_mmce_is_zero_when_every_confidence_equals_its_correctness(weighted):
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    assert float(MMCE(weighted=weighted).squared(r, r.clone())) == 0.0
    # Confidence 0.9 on every sample, 3 of 5 right: miscalibrated, so positive.
    assert float(MMCE(weighted=weighted).squared(torch.full((5,), 0.9, dtype=torch.float64), r)) > 0.01


def test_mmce_weighted_has_no_penalty_on_a_batch_that_is_all_right():
    z, y = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.tensor([0, 1])
    assert float(MMCE().squared(*torch.softmax(z, 1).max(1)[0:1], torch.ones(2, dtype=torch.float64))) == 0.0
    assert value(MMCE(), z.numpy(), y.numpy()) == pytest.approx(value(CrossEntropy(), z.numpy(), y.numpy()), abs=1e-4)


def test_mdca_is_zero_when_mean_probabilities_equal_class_frequencies():
    # Uniform predictions (1/4 each, exact in binary) on a batch with every class once.
    z, y = torch.zeros(4, 4, dtype=torch.float64), torch.arange(4)
    assert float(MDCA().penalty(z, y)) == 0.0
    assert float(MDCA().penalty(torch.tensor(LOGITS), torch.tensor(LABELS))) == pytest.approx(ref_mdca(), abs=1e-12)


def test_mbls_is_cross_entropy_where_every_logit_gap_is_within_the_margin():
    # LOGITS' largest gap to the top logit is exactly 10: not above the default margin.
    assert value(MarginLabelSmoothing()) == value(CrossEntropy())
    assert value(MarginLabelSmoothing(margin=9.0)) > value(CrossEntropy())


def test_adafocal_gamma_update_follows_the_papers_rule_on_a_hand_made_bin_table():
    loss = AdaFocal()
    gamma = torch.tensor([1.0, 1.0, -0.5, 0.25, 19.0, -1.9], dtype=torch.float64)
    gap = torch.tensor([0.1, -0.1, 0.1, -0.5, 0.2, -0.1], dtype=torch.float64)  # confidence − accuracy
    expected = [
        math.exp(0.1),  # overconfident bin: the focal γ grows
        math.exp(-0.1),  # underconfident: it shrinks
        -0.5 * math.exp(-0.1),  # inverse focal (γ < 0) in an overconfident bin: |γ| shrinks
        -0.2,  # 0.25·e^−0.5 = 0.152 < S_th = 0.2: switches to inverse focal at −S_th
        20.0,  # 19·e^0.2 = 23.2, clipped to γ_max
        -2.0,  # −1.9·e^0.1 = −2.10, clipped to γ_min
    ]
    np.testing.assert_allclose(loss.updated_gamma(gamma, gap).numpy(), expected, rtol=1e-12, atol=0)


def test_adafocal_learns_its_bins_from_the_validation_split():
    """Four validation samples, two classes, confidences 0.6 (wrong), 0.7, 0.8, 0.9 (right);
    two equal-mass bins [0.6, 0.8) and [0.8, 0.9] with gaps 0.65 − 0.5 and 0.85 − 1."""
    conf = torch.tensor([0.8, 0.6, 0.9, 0.7], dtype=torch.float64)
    logits = torch.stack([torch.log(conf / (1 - conf)), torch.zeros(4, dtype=torch.float64)], dim=1)
    labels = torch.tensor([0, 1, 0, 0])
    loss = AdaFocal(n_bins=2)
    loss.observe_validation(logits, labels)
    np.testing.assert_allclose(loss.edges.numpy(), [0.6, 0.8, 0.9], rtol=1e-12)
    np.testing.assert_allclose(loss.gamma.numpy(), [math.exp(0.15), math.exp(-0.15)], rtol=1e-9)
    # A training sample with p_y = 0.85 takes the upper bin's γ; p_y = 0.3 the lower bin's.
    assert loss.sample_gamma(torch.tensor([0.85, 0.3], dtype=torch.float64)).tolist() == pytest.approx(
        [math.exp(-0.15), math.exp(0.15)], rel=1e-9)


def test_adafocal_inverse_focal_loss_matches_its_formula():
    """With every γ negative the loss is −(1 + p_y)^|γ| log p_y."""
    loss = AdaFocal(gamma_initial=-1.5)
    expected = float(np.mean([-((1 + softmax(z)[y]) ** 1.5) * math.log(softmax(z)[y]) for z, y in zip(LOGITS, LABELS)]))
    assert value(loss) == pytest.approx(expected, abs=1e-12, rel=0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MMCE(kernel_width=0), "loss.kernel_width must be > 0"),
        (lambda: MMCE(normalisation="mean"), "loss.normalisation='mean' is not supported; allowed: paper"),
        (lambda: MDCA(beta=-1), "loss.beta must be >= 0"),
        (lambda: MarginLabelSmoothing(margin=-1), "loss.margin must be >= 0"),
        (lambda: MarginLabelSmoothing(class_reduction="max"), "loss.class_reduction='max'"),
        (lambda: AdaFocal(n_bins=0), "loss.n_bins must be >= 1"),
        (lambda: AdaFocal(gamma_initial=30), r"loss.gamma_initial=30 must lie in \[loss.gamma_min, loss.gamma_max\]"),
    ],
)
def test_new_losses_refuse_bad_hyperparameters_naming_the_key(build, message):
    with pytest.raises(UserError, match=message):
        build()


@pytest.mark.parametrize("batch_size", [64, 128])
@pytest.mark.parametrize("cap", [None, 0.5])
def test_summed_ce_reading_is_summed_cross_entropy_plus_lambda_gap(batch_size, cap):
    """λ = 10 against Σ_i CE_i: calibrun's loss times B is Σ_i CE_i + λ·gap at any batch size."""
    generator = torch.Generator().manual_seed(batch_size)
    logits = torch.randn(batch_size, 10, generator=generator, dtype=torch.float64) * 3
    targets = torch.randint(0, 10, (batch_size,), generator=generator)
    loss = GapLoss(lam=10, cap=cap, lam_reading="summed_ce")
    nll = F.cross_entropy(logits, targets, reduction="none")
    if cap is not None:
        nll = nll.clamp(min=-math.log(cap))
    summed = nll.sum() + 10 * loss.penalty(logits, targets)
    assert float(loss(logits, targets) * batch_size) == pytest.approx(float(summed), rel=1e-12)


# The presets of `make reproduce-baselines`: conf/experiment/baseline_*.yaml.
BASELINES = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("baseline_*.yaml"))


@pytest.mark.parametrize("experiment", BASELINES)
def test_every_baseline_preset_shares_one_recipe_and_has_a_named_row(compose_cfg, experiment):
    """Only the loss differs between the baselines' rows, and each has a name in
    calibrun/papers/baselines.csv (with published numbers only where the CSV gives them)."""
    import pandas as pd

    from calibrun.losses import as_loss
    from calibrun.report import PAPERS

    cfg, reference = compose_cfg([f"experiment={experiment}"]), compose_cfg(["experiment=baseline_ce"])
    for key in ("data", "model", "trainer", "optimizer", "scheduler", "calibrator", "metrics"):
        assert cfg[key] == reference[key], f"{experiment} changes {key}"
    assert isinstance(as_loss(instantiate(cfg.loss)), torch.nn.Module)
    paper = pd.read_csv(PAPERS / "baselines.csv")
    rows = paper[paper.experiment == experiment]
    assert sorted(rows.calibrator) == ["none", "temperature"] and rows.label.notna().all()


@pytest.mark.parametrize("document", ["docs/guide/losses.md", "docs/design.md"])
def test_every_loss_has_a_row_in_the_documented_loss_tables(document):
    text = (Path(__file__).parent.parent / document).read_text()
    missing = [name for name in LOSS_NAMES if f"\n| `{name}` |" not in text]
    assert not missing, f"{document} has no loss-table row for {missing}"
