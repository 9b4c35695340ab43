"""ppiad's Linear keeps the checkpoint's [out, in] weight: same outputs as Paddle's nn.Linear with the
transposed weight, and the same random initialisation (so seeded random models keep their weights)."""
import numpy as np
import paddle

from ppiad.models.linear import Linear


def test_linear_equals_paddle_linear_on_the_transposed_weight():
    paddle.seed(0)
    ours = Linear(5, 7)
    ours.bias.set_value(paddle.arange(7, dtype="float32"))
    ref = paddle.nn.Linear(5, 7)
    ref.weight.set_value(ours.weight.T)
    ref.bias.set_value(ours.bias)
    x = paddle.randn([2, 3, 5])
    assert list(ours.weight.shape) == [7, 5]
    np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), rtol=1e-6, atol=1e-6)
    no_bias = Linear(5, 7, bias_attr=False)
    assert no_bias.bias is None and list(no_bias(x).shape) == [2, 3, 7]


def test_random_initialisation_draws_what_nn_linear_draws():
    paddle.seed(3)
    ref = paddle.nn.Linear(6, 10)
    after_ref = paddle.rand([4])
    paddle.seed(3)
    ours = Linear(6, 10)
    after_ours = paddle.rand([4])
    np.testing.assert_array_equal(ours.weight.numpy(), ref.weight.numpy().T)
    np.testing.assert_array_equal(ours.bias.numpy(), ref.bias.numpy())
    np.testing.assert_array_equal(after_ours.numpy(), after_ref.numpy())  # the generator advanced alike


def test_sharing_reuses_the_parameters():
    base = Linear(4, 3)
    shared = Linear.sharing(base.weight, base.bias)
    assert shared.weight is base.weight and shared.bias is base.bias
    assert (shared.in_features, shared.out_features) == (4, 3)
    x = paddle.randn([2, 4])
    np.testing.assert_array_equal(shared(x).numpy(), base(x).numpy())
