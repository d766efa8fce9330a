import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax.config import ModelConfig
from mnist_jax.errors import ConfigError
from mnist_jax.model import build_model, count_params, init_params


@pytest.mark.parametrize("conv, expected", [((32, 32), 113_386), ((32, 32, 64), 37_674)])
def test_parameter_counts_match_keras(conv, expected):
    model = build_model(ModelConfig(conv_features=conv))
    assert count_params(init_params(model, jax.random.PRNGKey(0))) == expected


def test_flatten_width_follows_depth():
    assert ModelConfig(conv_features=(32, 32)).flatten_width == 5 * 5 * 32
    assert ModelConfig(conv_features=(32, 32, 64)).flatten_width == 64


def test_too_deep_is_refused_when_the_config_is_made():
    with pytest.raises(ConfigError, match="feature map vanishes after 3 conv blocks"):
        ModelConfig(conv_features=(32, 32, 64, 64))


@pytest.mark.parametrize("bad", [dict(conv_features=()), dict(dropout_rate=1.0),
                                 dict(conv_impl="fft"), dict(conv_features=(32, 0))])
def test_bad_model_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**bad)


@pytest.mark.parametrize("conv", [(32, 32), (32, 32, 64)])
def test_fast_formulations_equal_the_plain_ones(conv):
    """patches conv + reshape pool compute the same function and gradients as XLA's
    convolution + reduce_window pooling, on random (tie-free) inputs."""
    plain = build_model(ModelConfig(conv_features=conv, conv_impl="xla", pool_impl="window"))
    fast = build_model(ModelConfig(conv_features=conv, conv_impl="patches", pool_impl="reshape"))
    params = init_params(plain, jax.random.PRNGKey(1))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(fast, jax.random.PRNGKey(1)))
    images = jax.random.uniform(jax.random.PRNGKey(2), (8, 28, 28, 1))
    labels = jnp.arange(8) % 10

    def loss(model, p):
        logits = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), logits

    (l_plain, logits_plain), g_plain = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(params)
    (l_fast, logits_fast), g_fast = jax.value_and_grad(lambda p: loss(fast, p), has_aux=True)(params)
    np.testing.assert_allclose(logits_fast, logits_plain, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l_fast, l_plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_formulation_depends_on_backend():
    from mnist_jax.model import resolve_impls

    cfg = ModelConfig()
    assert (resolve_impls(cfg, "cpu").conv_impl, resolve_impls(cfg, "cpu").pool_impl) == ("patches", "reshape")
    # Measured on an H100: shifted slices and reshape pooling beat cuDNN in the scanned epoch.
    assert (resolve_impls(cfg, "gpu").conv_impl, resolve_impls(cfg, "gpu").pool_impl) == ("patches", "reshape")
    assert resolve_impls(cfg, "gpu", purpose="eval").conv_impl == "patches"
    assert resolve_impls(dataclasses.replace(cfg, conv_impl="xla"), "cpu").conv_impl == "xla"


def test_evaluation_uses_the_formulation_fast_without_gradients():
    from mnist_jax.model import resolve_impls

    cfg = ModelConfig()
    ev = resolve_impls(cfg, "cpu", purpose="eval")
    assert (ev.conv_impl, ev.pool_impl) == ("xla", "window")
    assert resolve_impls(ModelConfig(conv_impl="patches"), "cpu", purpose="eval").conv_impl == "patches"


def test_forward_flops_counted_by_hand():
    def forward_flops_per_image(config):
        return config.forward_flops

    # 2-conv: conv 26*26*9*1*32 + conv 10*10*9*32*32 (of its 11x11 outputs, the 2x2
    # pooling reads 10x10) + dense 800*128 + logits 128*10 multiply-adds, 2 FLOPs each.
    two = 2 * (26 * 26 * 9 * 32 + 10 * 10 * 9 * 32 * 32 + 800 * 128 + 128 * 10)
    assert forward_flops_per_image(ModelConfig()) == two == 2_439_936
    # 3-conv adds conv 2*2*9*32*64 (of 3x3 outputs, 2x2 pooled) and flattens 64 features
    # instead of 800.
    three = 2 * (26 * 26 * 9 * 32 + 10 * 10 * 9 * 32 * 32 + 2 * 2 * 9 * 32 * 64 + 64 * 128 + 128 * 10)
    assert forward_flops_per_image(ModelConfig(conv_features=(32, 32, 64))) == three


@pytest.mark.parametrize("conv", [(32, 32), (32, 32, 64)])
@pytest.mark.parametrize("impls", [("patches", "reshape"), ("xla", "window")])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside Keras
def test_the_model_and_its_gradients_are_keras_own(conv, impls):
    """The Flax model, in either formulation, is the notebook's Keras model (Keras 3 on
    JAX, benchmarks/keras_reference.py) with the same weights: the same probabilities and
    the same gradients of the cross-entropy, every layer's. The model leaves out the
    convolution outputs its pooling drops; Keras computes them all."""
    import keras

    from benchmarks.keras_reference import build_model as build_keras_model

    cfg = ModelConfig(conv_features=conv, conv_impl=impls[0], pool_impl=impls[1])
    ours = build_model(cfg)
    params = init_params(ours, jax.random.PRNGKey(1))
    names = [f"conv{i}" for i in range(len(conv))] + ["dense0", "logits"]
    reference = build_keras_model(cfg, keras=keras)
    weights = [np.asarray(params[n][w]) for n in names for w in ("kernel", "bias")]
    reference.set_weights(weights)
    images = jax.random.uniform(jax.random.PRNGKey(2), (16, 28, 28, 1))
    labels = jnp.arange(16) % 10

    fixed = [v.value for v in reference.non_trainable_variables]  # Dropout's seed state

    def keras_loss(w):
        probs, _ = reference.stateless_call(w, fixed, images, training=False)
        return -jnp.mean(jnp.log(probs[jnp.arange(16), labels])), probs

    def our_loss(p):
        logits = ours.apply({"params": p}, images, train=False)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels]), logits

    (l_keras, probs), g_keras = jax.value_and_grad(keras_loss, has_aux=True)(
        [jnp.asarray(w) for w in weights])
    (l_ours, logits), g_ours = jax.value_and_grad(our_loss, has_aux=True)(params)
    np.testing.assert_allclose(jax.nn.softmax(logits), probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(l_ours, l_keras, rtol=1e-5)
    g_ours = [g_ours[n][w] for n in names for w in ("kernel", "bias")]
    assert [g.shape for g in g_ours] == [g.shape for g in g_keras]
    for ours_g, keras_g in zip(g_ours, g_keras):
        np.testing.assert_allclose(ours_g, keras_g, rtol=1e-4, atol=1e-6)


def test_relu_pool_routes_the_gradient_to_the_first_maximum_as_keras_does():
    """Worked by hand, 2x2 windows of a 5x5 map (its last row and column dropped): the
    output is ReLU of each window's maximum; the gradient goes to the window's first
    maximum in row-major order (Keras' MaxPoolGrad; tied maxima at (0,1) and (1,0) of the
    last window), and to nothing where the ReLU is off (all-negative or all-zero windows)."""
    from mnist_jax.model import relu_max_pool

    x = np.array([[2, 2, -1, -3, 7],
                  [1, 0, -2, -1, 7],
                  [0, 0, 1, 3, 7],
                  [0, 0, 3, 2, 7],
                  [7, 7, 7, 7, 7]], np.float32)[None, :, :, None]
    out, vjp = jax.vjp(lambda v: relu_max_pool(v, 2, "reshape"), jnp.asarray(x))
    np.testing.assert_array_equal(out[0, :, :, 0], [[2, 0], [0, 3]])
    (grad,) = vjp(jnp.array([[10, 20], [30, 40]], jnp.float32)[None, :, :, None])
    expected = np.zeros((5, 5), np.float32)
    expected[0, 0], expected[2, 3] = 10, 40
    np.testing.assert_array_equal(grad[0, :, :, 0], expected)


def test_the_single_channel_convolution_has_xlas_gradients():
    """The one-channel patches convolution's own VJP (kernel gradient from the stacked
    shifted images) gives XLA's convolution's output and both gradients."""
    from mnist_jax.model import single_channel_patches_conv

    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 9, 8, 1))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 5))
    g = jax.random.normal(jax.random.PRNGKey(2), (4, 7, 6, 5))

    def xla(v, w):
        return jax.lax.conv_general_dilated(v, w, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out, vjp = jax.vjp(single_channel_patches_conv, x, kernel)
    out_xla, vjp_xla = jax.vjp(xla, x, kernel)
    np.testing.assert_allclose(out, out_xla, rtol=1e-5, atol=1e-6)
    for ours, reference in zip(vjp(g), vjp_xla(g)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
