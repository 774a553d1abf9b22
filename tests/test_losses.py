"""Every loss against a direct computation of its DESIGN §4 formula."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibrun.losses import CrossEntropy, EntropyRegularized, GapLoss, LabelSmoothing, Mixup, NonTargetSmoothing

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


def value(loss, logits=LOGITS, labels=LABELS):
    return float(loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels)))


def test_batch_has_a_confident_and_a_misclassified_sample():
    assert softmax(LOGITS[0])[0] > 0.99 and np.argmax(LOGITS[1]) != LABELS[1]


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (CrossEntropy(), ref_ce),
        (GapLoss(lam=10), lambda: ref_ce() + 10 * ref_gap_term()),
        (GapLoss(lam=10, cap=0.5), lambda: ref_capped_ce(0.5) + 10 * ref_gap_term()),
        (GapLoss(lam=2.5, cap=0.9), lambda: ref_capped_ce(0.9) + 2.5 * ref_gap_term()),
        (NonTargetSmoothing(lam=0.5), lambda: ref_ce() + 0.5 * ref_nts()),
        (EntropyRegularized(lam=0.1), lambda: ref_ce() + 0.1 * ref_neg_entropy()),
        (LabelSmoothing(alpha=0.05), lambda: ref_label_smoothing(0.05)),
        (LabelSmoothing(alpha=0.3), lambda: ref_label_smoothing(0.3)),
    ],
    ids=["ce", "gap", "gap_cap", "gap_cap_0.9", "nts", "erl", "ls_0.05", "ls_0.3"],
)
def test_loss_matches_design_formula(loss, expected):
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
    assert value(GapLoss(lam=0, cap=0.5)) == pytest.approx(ref_capped_ce(0.5), abs=1e-12)


def test_torch_label_smoothing_differs_as_documented():
    k, alpha = LOGITS.shape[1], 0.05
    torch_value = float(F.cross_entropy(torch.tensor(LOGITS), torch.tensor(LABELS), label_smoothing=alpha))
    # torch's α spreads α/K over all classes; ours spreads α over the K−1 others.
    assert torch_value == pytest.approx(ref_label_smoothing(alpha * (k - 1) / k), abs=1e-10)
    assert torch_value != pytest.approx(value(LabelSmoothing(alpha)), abs=1e-6)


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
