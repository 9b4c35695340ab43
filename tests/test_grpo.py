"""GRPO math: group advantages and the clipped surrogate + k3 KL loss, checked against hand arithmetic."""
import math

import numpy as np
import paddle
import pytest

from ppiad.rl.grpo import group_advantages, grpo_loss, weighted_advantages


def t(x, grad=False):
    out = paddle.to_tensor(np.asarray(x, dtype=np.float32))
    out.stop_gradient = not grad
    return out


# ---------------------------------------------------------------- advantages
def test_group_advantages_std_is_unbiased():
    r = [1, 0, 0, 0, 1, 1, 0, 0]
    # group 1: mean 0.25, unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25 -> std 0.5
    # group 2: mean 0.5,  unbiased var = 4 * 0.25 / 3 = 1/3             -> std 0.57735
    eps = 1e-4
    s2 = math.sqrt(1 / 3)
    want = [0.75 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps),
            0.5 / (s2 + eps), 0.5 / (s2 + eps), -0.5 / (s2 + eps), -0.5 / (s2 + eps)]
    got = group_advantages(r, 4, "std", eps)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_group_advantages_mean_only_keeps_the_reward_scale():
    r = np.array([3.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(group_advantages(r, 4, "mean_only"), [2.0, 0.0, -1.0, -1.0])
    # scaling the rewards scales mean_only advantages but not std ones (up to eps)
    np.testing.assert_allclose(group_advantages(10 * r, 4, "mean_only"), 10 * group_advantages(r, 4, "mean_only"),
                               rtol=1e-6)
    np.testing.assert_allclose(group_advantages(10 * r, 4, "std"), group_advantages(r, 4, "std"), rtol=1e-3)


def test_group_advantages_degenerate_groups_are_zero():
    assert np.all(group_advantages([1, 1, 1, 1, 0, 0, 0, 0], 4) == 0)
    assert np.all(group_advantages([1.0, 0.0, 2.0], 1) == 0)  # G=1: nothing to compare against
    assert np.all(np.isfinite(group_advantages([1.0, 0.0, 2.0], 1)))


def test_group_advantages_accepts_paddle_and_rejects_ragged():
    np.testing.assert_allclose(group_advantages(t([1, 0]), 2, "mean_only"), [0.5, -0.5])
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages([1, 0, 1], 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages([1, 0], 2, norm="max")


def test_weights_apply_after_normalisation():
    r = [1, 0, 0, 0]
    w = [3, 3, 3, 3]
    # a weight constant within the group survives because it is applied after the std division
    np.testing.assert_allclose(weighted_advantages(r, w, 4), 3 * group_advantages(r, 4), rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        weighted_advantages(r, [1, 1], 4)


# ---------------------------------------------------------------- loss
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]
OLD = [[-1.0, -0.7, -1.5], [-0.3, -1.0, 5.0]]   # logp - old = [0, 0.2, -0.5], [0, -0.2, (pad)]
REF = [[-1.0, -0.4, -2.1], [-0.1, -1.2, 9.0]]   # ref - logp = [0, 0.1, -0.1], [0.2, 0, (pad)]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -2.0]


def k3(d):
    return math.exp(d) - d - 1


def hand_values(beta=0.1, eps=0.2):
    # row 0, A = +1: min(r, clip(r)) with r = 1, e^0.2 = 1.2214 (clipped to 1.2), e^-0.5 = 0.6065 (not clipped)
    s0 = [-1.0, -min(math.exp(0.2), 1 + eps), -math.exp(-0.5)]
    # row 1, A = -2: min(-2r, -2clip(r)) with r = 1, e^-0.2 = 0.8187 (inside [0.8, 1.2])
    s1 = [2.0, 2.0 * math.exp(-0.2)]
    k0 = [k3(0.0), k3(0.1), k3(-0.1)]
    k1 = [k3(0.2), k3(0.0)]
    l0 = [s + beta * k for s, k in zip(s0, k0)]
    l1 = [s + beta * k for s, k in zip(s1, k1)]
    token = (sum(l0) + sum(l1)) / 5
    sequence = (sum(l0) / 3 + sum(l1) / 2) / 2
    kl = (sum(k0) + sum(k1)) / 5
    return token, sequence, kl


def test_loss_matches_hand_arithmetic_token_and_sequence():
    token, sequence, kl = hand_values()
    loss, stats = grpo_loss(t(LOGP, True), t(OLD), t(REF), ADV, t(MASK), epsilon=0.2, beta=0.1)
    assert float(loss) == pytest.approx(token, rel=1e-5)           # 0.166814
    assert stats["kl"] == pytest.approx(kl, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(1 / 5)          # only row 0 token 1 is clipped
    ratio_mean = (1 + math.exp(0.2) + math.exp(-0.5) + 1 + math.exp(-0.2)) / 5
    assert stats["ratio"] == pytest.approx(ratio_mean, rel=1e-5)
    loss_s, _ = grpo_loss(t(LOGP, True), t(OLD), t(REF), ADV, t(MASK), epsilon=0.2, beta=0.1,
                          loss_type="grpo")
    assert float(loss_s) == pytest.approx(sequence, rel=1e-5)      # 0.442312
    assert abs(token - sequence) > 0.1  # the two averagings really differ here


def test_normalizer_divides_by_the_given_token_count():
    token, _, _ = hand_values()
    loss, _ = grpo_loss(t(LOGP, True), t(OLD), t(REF), ADV, t(MASK), epsilon=0.2, beta=0.1, normalizer=10)
    assert float(loss) == pytest.approx(token * 5 / 10, rel=1e-5)


def test_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = t(LOGP, True)
    _, stats = grpo_loss(logp, None, t(LOGP), ADV, t(MASK), beta=0.1)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)
    _, stats = grpo_loss(t(LOGP, True), None, t(REF), ADV, t(MASK), beta=0.1)
    assert stats["kl"] > 0


def test_masked_tokens_do_not_matter():
    a, _ = grpo_loss(t(LOGP, True), t(OLD), t(REF), ADV, t(MASK), beta=0.1)
    old, ref, logp = np.array(OLD), np.array(REF), np.array(LOGP)
    old[1, 2], ref[1, 2], logp[1, 2] = -50.0, 30.0, -7.0  # garbage at the padded position
    b, _ = grpo_loss(t(logp, True), t(old), t(ref), ADV, t(MASK), beta=0.1)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_gradient_sign_follows_the_advantage():
    logp = t([[-1.0, -1.0], [-1.0, -1.0]], True)
    loss, stats = grpo_loss(logp, None, None, [1.0, -1.0], t([[1, 1], [1, 1]]), beta=0.0)
    loss.backward()
    g = logp.grad.numpy()
    # descent (-grad) raises the log-probs of the positive-advantage row and lowers the negative one
    assert np.all(g[0] < 0) and np.all(g[1] > 0)
    np.testing.assert_allclose(g, [[-0.25, -0.25], [0.25, 0.25]], rtol=1e-6)  # -A / n_tokens, ratio 1
    assert stats["ratio"] == pytest.approx(1.0)


def test_clipping_stops_the_gradient_only_where_it_should():
    # logp - old: row 0 (A>0) = +0.5 -> ratio 1.65 > 1.2: clipped, no gradient;
    #             row 1 (A<0) = +0.5 -> ratio 1.65, but min() keeps the unclipped (more pessimistic) term;
    #             row 2 (A<0) = -0.5 -> ratio 0.61 < 0.8: clipped, no gradient;
    #             row 3 (A>0) = -0.5 -> unclipped term kept.
    old = t([[-1.5], [-1.5], [-0.5], [-0.5]])
    logp = t([[-1.0], [-1.0], [-1.0], [-1.0]], True)
    adv = [1.0, -1.0, -1.0, 1.0]
    loss, stats = grpo_loss(logp, old, None, adv, t([[1], [1], [1], [1]]), epsilon=0.2, beta=0.0)
    loss.backward()
    g = logp.grad.numpy()[:, 0]
    assert g[0] == 0 and g[2] == 0
    assert g[1] == pytest.approx(math.exp(0.5) / 4) and g[3] == pytest.approx(-math.exp(-0.5) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_kl_gradient_pulls_towards_the_reference():
    logp = t([[-1.0]], True)
    loss, _ = grpo_loss(logp, None, t([[-2.0]]), [0.0], t([[1]]), beta=1.0)
    loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp) > 0 when logp > ref: descent lowers it
    assert logp.grad.numpy()[0, 0] == pytest.approx(1 - math.exp(-1.0), rel=1e-6)


def test_loss_errors_name_the_setting():
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(t(LOGP, True), None, t(REF), ADV, t(MASK), loss_type="token")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(t(LOGP, True), None, None, ADV, t(MASK), beta=0.04)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(t(LOGP, True), None, t(REF), [1.0], t(MASK))


def test_empty_rows_do_not_divide_by_zero():
    loss, _ = grpo_loss(t([[-1.0, -1.0], [-1.0, -1.0]], True), None, None, [1.0, 1.0], t([[1, 1], [0, 0]]),
                        beta=0.0, loss_type="grpo")
    assert float(loss) == pytest.approx(-1.0)  # the empty row is left out of the sequence mean
