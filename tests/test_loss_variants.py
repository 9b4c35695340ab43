"""Loss variants, reward scaling, clip-higher and truncated-completion masking (issue 16, items 1, 2, 4),
each against values worked out by hand in the comments."""
import math

import numpy as np
import paddle
import pytest

from ppiad.rl.grpo import (group_advantages, grpo_loss, loss_normalizer_units, truncated_rows, weighted_advantages,
                           zero_spread_groups)


def t(x, grad=False):
    v = paddle.to_tensor(np.asarray(x, dtype=np.float32))
    v.stop_gradient = not grad
    return v


# Two completions, ratio 1 (old None), beta 0: loss_t = -A_i on each token.
# row 0: A = +1, 3 tokens -> token losses -1 -1 -1 (sum -3, mean -1)
# row 1: A = -2, 2 tokens -> token losses +2 +2    (sum +4, mean +2)
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -2.0]
LOGP = [[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]]


@pytest.mark.parametrize("loss_type, want, units, grad00", [
    ("bnpo", (-3 + 4) / 5, 5.0, -1 / 5),        # sum over the 5 tokens / 5
    ("grpo", (-1 + 2) / 2, 2.0, -1 / 3 / 2),     # mean per completion (-1, +2), then mean over the 2
    ("dr_grpo", (-3 + 4) / (2 * 4), 8.0, -1 / 8),  # sum / (2 completions x max_new_tokens 4)
])
def test_loss_types_against_hand_values(loss_type, want, units, grad00):
    logp = t(LOGP, True)
    loss, _ = grpo_loss(logp, None, None, ADV, t(MASK), beta=0.0, loss_type=loss_type, max_new_tokens=4)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert loss_normalizer_units(MASK, loss_type, 4) == units
    loss.backward()
    assert logp.grad.numpy()[0, 0] == pytest.approx(grad00, rel=1e-6)
    assert logp.grad.numpy()[1, 2] == 0.0   # a masked position gets no gradient


def test_a_step_normalizer_replaces_the_micro_batch_own_count():
    # dr_grpo over a step of 2 such micro-batches: the divisor is 2 x 8 = 16, so each loss halves
    loss, _ = grpo_loss(t(LOGP, True), None, None, ADV, t(MASK), beta=0.0, loss_type="dr_grpo", normalizer=16)
    assert float(loss) == pytest.approx(1 / 16, rel=1e-6)
    # grpo over 4 completions: (-1 + 2) / 4
    loss, _ = grpo_loss(t(LOGP, True), None, None, ADV, t(MASK), beta=0.0, loss_type="grpo", normalizer=4)
    assert float(loss) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="max_new_tokens"):
        grpo_loss(t(LOGP, True), None, None, ADV, t(MASK), beta=0.0, loss_type="dr_grpo")


def test_a_fully_masked_row_adds_nothing():
    # mask_truncated_completions zeroes a row's mask: row 1 gone -> bnpo -3/3, grpo -1/1, dr_grpo still /(2 x 4)
    mask = [[1, 1, 1], [0, 0, 0]]
    for loss_type, want in (("bnpo", -1.0), ("grpo", -1.0), ("dr_grpo", -3 / 8)):
        loss, _ = grpo_loss(t(LOGP, True), None, None, ADV, t(mask), beta=0.0, loss_type=loss_type,
                            max_new_tokens=4)
        assert float(loss) == pytest.approx(want, rel=1e-6), loss_type


REWARDS = [1, 0, 0, 0, 2, 2, 0, 0]


def test_scale_rewards_group_batch_none():
    # group 1: mean 0.25, centred (0.75, -0.25, -0.25, -0.25), std (ddof 1) = sqrt(0.75 / 3) = 0.5
    # group 2: mean 1, centred (1, 1, -1, -1), std = sqrt(4 / 3) = 1.1547
    centred = np.array([0.75, -0.25, -0.25, -0.25, 1, 1, -1, -1])
    np.testing.assert_allclose(group_advantages(REWARDS, 4, "group", 0.0),
                               np.concatenate([centred[:4] / 0.5, centred[4:] / math.sqrt(4 / 3)]), rtol=1e-6)
    # batch: mean 0.625, squared deviations 0.140625 + 3 x 0.390625 + 2 x 1.890625 + 2 x 0.390625 = 5.875,
    # std = sqrt(5.875 / 7) = 0.916125
    np.testing.assert_allclose(group_advantages(REWARDS, 4, "batch", 0.0), centred / 0.916125, rtol=1e-5)
    np.testing.assert_allclose(group_advantages(REWARDS, 4, "batch", 0.0, std_of_batch=2.0), centred / 2.0,
                               rtol=1e-6)
    np.testing.assert_allclose(group_advantages(REWARDS, 4, "none"), centred, rtol=1e-6)
    # the old names still reach the same code
    np.testing.assert_array_equal(group_advantages(REWARDS, 4, "std"), group_advantages(REWARDS, 4, "group"))
    np.testing.assert_array_equal(group_advantages(REWARDS, 4, "mean_only"), group_advantages(REWARDS, 4, "none"))


def test_weighted_advantages_use_the_batch_divisor():
    # weights 2 on all of the reward, batch std 2: A = 2 x centred / 2 = centred
    got = weighted_advantages(REWARDS, [2.0] * 8, 4, "batch", 0.0, std_of_batch=2.0)
    np.testing.assert_allclose(got, [0.75, -0.25, -0.25, -0.25, 1, 1, -1, -1], rtol=1e-6)


def test_zero_spread_groups():
    np.testing.assert_array_equal(zero_spread_groups([1, 1, 1, 1, 0, 1, 0, 0, 2, 2, 2, 2], 4), [True, False, True])


def test_clip_higher_lets_a_rising_ratio_through():
    # one token, A = +1, log ratio 0.22 -> ratio 1.2461: above 1 + 0.2 (clipped: no gradient) but below 1 + 0.28
    old = t([[-1.22]])
    for eps_high, clipped in ((None, True), (0.28, False)):
        logp = t([[-1.0]], True)
        loss, st = grpo_loss(logp, old, None, [1.0], t([[1]]), epsilon=0.2, beta=0.0, epsilon_high=eps_high)
        loss.backward()
        if clipped:
            assert logp.grad.numpy()[0, 0] == 0.0 and float(loss) == pytest.approx(-1.2, rel=1e-6)
            assert st["clip_ratio/high_mean"] == 1.0
        else:   # d(-ratio)/dlogp = -ratio
            assert logp.grad.numpy()[0, 0] == pytest.approx(-math.exp(0.22), rel=1e-5)
            assert st["clip_ratio/high_mean"] == 0.0
        assert st["clip_ratio/low_mean"] == 0.0
    # the lower bound stays at 1 - epsilon: ratio e^-0.3 = 0.741 < 0.8 with A < 0 is clipped (low)
    logp = t([[-1.3]], True)
    loss, st = grpo_loss(logp, t([[-1.0]]), None, [-1.0], t([[1]]), epsilon=0.2, beta=0.0, epsilon_high=0.28)
    loss.backward()
    assert logp.grad.numpy()[0, 0] == 0.0 and st["clip_ratio/low_mean"] == 1.0 and st["clip_ratio/high_mean"] == 0


def test_clip_ratio_counts_only_masked_tokens():
    # 4 tokens in the mask: ratios e^0.3 (A>0: high), e^-0.3 (A>0: neither), 1, and a masked e^0.3
    old = t([[-1.3, -0.7], [-1.0, -1.3]])
    logp = t([[-1.0, -1.0], [-1.0, -1.0]], True)
    _, st = grpo_loss(logp, old, None, [1.0, 1.0], t([[1, 1], [1, 0]]), epsilon=0.2, beta=0.0)
    assert st["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert st["clip_ratio/low_mean"] == 0.0


def test_truncated_rows():
    # eos ids 8, 9, max_new_tokens 3: row 0 is full and ends in 7 (truncated), row 1 stopped early (9 then pad),
    # row 2 is full but its last token is a stop token
    seq = [[5, 6, 7], [5, 9, 0], [5, 6, 8]]
    mask = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    np.testing.assert_array_equal(truncated_rows(seq, mask, 3, [8, 9]), [True, False, False])
    np.testing.assert_array_equal(truncated_rows(seq, mask, 4, [8, 9]), [False, False, False])


def test_config_keys_renamed_and_resolved():
    from ppiad.config import ConfigError, load_config
    from ppiad.rl.trainer import check_grpo_objective

    with pytest.raises(ConfigError, match=r"grpo\.loss_type \(token -> bnpo"):
        load_config(None, ["grpo.loss_averaging=token"])
    with pytest.raises(ConfigError, match=r"grpo\.scale_rewards \(std -> group"):
        load_config(None, ["grpo.advantage_norm=std"])
    cfg = load_config(None, [])
    assert check_grpo_objective(cfg.grpo) == ("group", 0.2)
    cfg = load_config(None, ["grpo.loss_type=dr_grpo", "grpo.epsilon_high=0.28"])
    assert check_grpo_objective(cfg.grpo) == ("none", 0.28)
    cfg = load_config(None, ["grpo.loss_type=dr_grpo", "grpo.scale_rewards=batch"])
    assert check_grpo_objective(cfg.grpo)[0] == "batch"
    with pytest.raises(ConfigError, match="grpo.epsilon_high"):
        check_grpo_objective(load_config(None, ["grpo.epsilon_high=0"]).grpo)


def test_token_entropy_against_numpy():
    from ppiad.models.generation import token_entropy

    z = np.random.default_rng(0).normal(size=(3, 4, 7)).astype("float32") * 3
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(token_entropy(t(z)).numpy(), -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-6)
    # uniform over 7 tokens: log 7; one certain token: 0
    assert token_entropy(t(np.zeros((1, 1, 7)))).numpy()[0, 0] == pytest.approx(math.log(7), rel=1e-6)
    assert token_entropy(t([[[0.0, -1e4, -1e4]]])).numpy()[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_batch_std_spans_every_micro_batch_of_the_step():
    from ppiad.rl.trainer import GRPOTrainer
    from ppiad.utils.distributed import DistEnv

    tr = object.__new__(GRPOTrainer)
    tr.scale_rewards = "batch"
    tr.env = DistEnv()   # one process
    buffer = [{"total": np.array([1.0, 0, 0, 0])}, {"total": np.array([2.0, 2, 0, 0])}]
    # the 8 rewards of the step (test_scale_rewards_group_batch_none): std sqrt(5.875 / 7) = 0.916125
    assert tr._step_reward_std(buffer) == pytest.approx(0.916125, rel=1e-5)
    tr.scale_rewards = "group"
    assert tr._step_reward_std(buffer) is None
