"""The CNN, built from a ModelConfig. Depth is data: a 3-conv model is a longer tuple.

Two formulations of the same function exist for convolution and for max-pooling, because
XLA:CPU runs them at very different speeds (benchmarks/epoch_speed.py measures them):
- conv "xla": `lax.conv_general_dilated` (cuDNN on GPU). conv "patches": the k*k shifted
  slices of the input concatenated on the channel axis, then one matmul with the same
  kernel reshaped; XLA:CPU keeps this fast inside loops, where its convolution is not.
- pool "window": `nn.max_pool` (reduce_window, whose gradient is select-and-scatter, slow
  on XLA:CPU). pool "reshape": crop to a multiple of the window, reshape to
  [B, H/p, p, W/p, p, C] and take the max over the two window axes, then the ReLU; its
  gradient is computed in one pass, routed to each window's first maximum as in Keras.
Both pairs share parameter names and shapes, so one set of parameters runs under either.
Each convolution reads only the rows and columns whose outputs its VALID pooling keeps
(`pooled_extent`): an odd-sized map's last row and column, which the pooling drops, are
never computed (for 2-conv, conv1 computes 10x10 outputs, not 11x11: 17% less of the
step's largest layer, the same function and gradients).
Initialisers follow Keras (glorot_uniform kernels, zero biases) so runs are comparable.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from mnist_jax.config import ModelConfig

kernel_init = nn.initializers.glorot_uniform()  # Keras' default
bias_init = nn.initializers.zeros


def resolve_impls(config: ModelConfig, backend: str | None = None,
                  purpose: str = "train") -> ModelConfig:
    """Replace "auto" formulations by the fastest measured one for `backend` and `purpose`.

    Training on CPU: shifted-slice convolution and reshape pooling, whose gradients XLA:CPU
    runs fast, also inside the scanned epoch. Evaluation on CPU (forward only, one top-level
    call per batch): XLA's own convolution and pooling, about 18x faster there than the
    shifted slices at batch 1000. GPU: shifted slices and reshape pooling for both (an
    H100 epoch, train + validation: 0.18 s against 0.25 s with cuDNN's convolution and
    reduce-window pooling for 2-conv, 0.19 s against 0.35 s for 3-conv;
    benchmarks/results/epoch_speed-gpu-h100-*.json).
    """
    backend = backend or jax.default_backend()
    shifted = backend != "cpu" or purpose == "train"
    conv = config.conv_impl if config.conv_impl != "auto" else ("patches" if shifted else "xla")
    pool = config.pool_impl if config.pool_impl != "auto" else ("reshape" if shifted else "window")
    return dataclasses.replace(config, conv_impl=conv, pool_impl=pool)


class Conv(nn.Module):
    """A square VALID convolution with stride 1, in one of two formulations."""

    features: int
    kernel_size: int
    impl: str  # "xla" | "patches"

    @nn.compact
    def __call__(self, x):  # [B, H, W, Cin] float32
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", kernel_init, (k, k, cin, self.features))  # HWIO
        bias = self.param("bias", bias_init, (self.features,))
        if self.impl == "xla":
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1, 1), padding="VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif self.impl == "patches":
            y = (single_channel_patches_conv if cin == 1 else patches_conv)(x, kernel)
        else:
            raise ValueError(f"unresolved conv impl {self.impl!r}: call resolve_impls first")
        return y + bias


def _patches(x, k: int):
    """The k*k shifted slices of x [B, H, W, C] on the channel axis: [B, ho, wo, k*k*C],
    channel order (i, j, c) as kernel.reshape(k*k*C, F)."""
    ho, wo = x.shape[1] - k + 1, x.shape[2] - k + 1
    return jnp.concatenate([x[:, i:i + ho, j:j + wo, :] for i in range(k) for j in range(k)],
                           axis=-1)


def patches_conv(x, kernel):
    """VALID, stride-1 convolution as shifted slices and one matmul: [B, ho, wo, F]."""
    k, _, cin, features = kernel.shape
    return _patches(x, k) @ kernel.reshape(k * k * cin, features)


@jax.custom_vjp
def single_channel_patches_conv(x, kernel):
    """patches_conv of a one-channel input, with the kernel gradient computed from the k*k
    shifted images stacked as rows ([k*k, B*ho*wo] @ g): XLA:CPU otherwise transposes the
    output gradient (2.8 MB for conv0 at batch 32) to [F, B*ho*wo] first, at 18x its
    memory floor. Measured side by side on a Zen 3: the training step x0.74."""
    return patches_conv(x, kernel)


def _single_channel_forward(x, kernel):
    return patches_conv(x, kernel), (x, kernel)


def _single_channel_backward(residuals, g):
    x, kernel = residuals
    k, _, _, features = kernel.shape
    ho, wo = x.shape[1] - k + 1, x.shape[2] - k + 1
    shifted = jnp.stack([x[:, i:i + ho, j:j + wo, 0] for i in range(k) for j in range(k)])
    d_kernel = (shifted.reshape(k * k, -1) @ g.reshape(-1, features)).reshape(kernel.shape)
    _, patches_vjp = jax.vjp(lambda v: _patches(v, k), x)
    (d_x,) = patches_vjp(g @ kernel.reshape(k * k, features).T)  # unused (and not computed)
    return d_x, d_kernel                                         # for the input images


single_channel_patches_conv.defvjp(_single_channel_forward, _single_channel_backward)


def pooled_extent(size: int, kernel_size: int, pool_size: int) -> int:
    """Input rows (or columns) of a VALID convolution whose outputs a following VALID,
    stride-`pool_size` pooling reads: the rest only feed outputs the pooling drops."""
    used_outputs = (size - kernel_size + 1) // pool_size * pool_size
    return used_outputs + kernel_size - 1


def relu_max_pool(x, size: int, impl: str):
    """ReLU, then size x size max-pooling with stride size and VALID padding (odd edges
    dropped): the activation and pooling of a conv block."""
    if impl == "window":
        return nn.max_pool(nn.relu(x), (size, size), strides=(size, size), padding="VALID")
    if impl == "reshape":
        b, h, w, c = x.shape
        return _relu_pool_windows(x[:, :h // size * size, :w // size * size, :], size)
    raise ValueError(f"unresolved pool impl {impl!r}: call resolve_impls first")


def _windows(x, size: int):
    """[B, H, W, C] -> [B, H/size, size, W/size, size, C]."""
    b, h, w, c = x.shape
    return x.reshape(b, h // size, size, w // size, size, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _relu_pool_windows(x, size: int):
    # max commutes with ReLU: pool first, then ReLU on the size^2 times smaller map.
    return jax.nn.relu(_windows(x, size).max(axis=(2, 4)))


def _relu_pool_forward(x, size):
    out = _relu_pool_windows(x, size)
    return out, (x, out)


def _relu_pool_backward(size, residuals, g):
    """The gradient goes to each window's first maximum in row-major order (as Keras'
    MaxPoolGrad routes it; JAX's own max splits it among tied maxima, which differs only
    at exact ties), where the ReLU passes. Recomputed from the block's input and output
    in one fused pass: XLA:CPU then stores no mask (measured: 4-7% less time per step)."""
    x, out = residuals
    windows = _windows(x, size)
    peak = out[:, :, None, :, None, :]
    seen, rows = None, []
    for i in range(size):
        row = []
        for j in range(size):
            hit = windows[:, :, i:i + 1, :, j:j + 1, :] == peak
            row.append(hit if seen is None else hit & ~seen)
            seen = hit if seen is None else seen | hit
        rows.append(jnp.concatenate(row, axis=4))
    first = jnp.concatenate(rows, axis=2) & (peak > 0)
    grad = jnp.where(first, g[:, :, None, :, None, :], 0.0)
    return (grad.reshape(x.shape),)


_relu_pool_windows.defvjp(_relu_pool_forward, _relu_pool_backward)


class CNN(nn.Module):
    """Conv blocks (conv, ReLU, max-pool), flatten, dense head with dropout, logits."""

    config: ModelConfig

    @nn.compact
    def __call__(self, images, *, train: bool):  # images: [B, H, W, C] float32 in [0, 1]
        cfg = self.config
        x = images
        k, p = cfg.kernel_size, cfg.pool_size
        for i, features in enumerate(cfg.conv_features):
            x = x[:, :pooled_extent(x.shape[1], k, p), :pooled_extent(x.shape[2], k, p), :]
            x = Conv(features, cfg.kernel_size, cfg.conv_impl, name=f"conv{i}")(x)
            x = relu_max_pool(x, cfg.pool_size, cfg.pool_impl)
        x = x.reshape(x.shape[0], -1)  # [B, flatten_width], NHWC row-major as Keras' Flatten
        for j, features in enumerate(cfg.dense_features):
            x = nn.Dense(features, kernel_init=kernel_init, name=f"dense{j}")(x)
            x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(nn.relu(x))
        return nn.Dense(cfg.num_classes, kernel_init=kernel_init, name="logits")(x)  # [B, K]


def build_model(config: ModelConfig, backend: str | None = None, purpose: str = "train") -> CNN:
    """The CNN of `config`, its "auto" formulations resolved for `purpose` ("train" or
    "eval"). Every formulation takes the same parameters."""
    return CNN(resolve_impls(config, backend, purpose))


def formulations(model: nn.Module | ModelConfig, backend: str | None = None
                 ) -> tuple[nn.Module, nn.Module]:
    """(training, evaluation) formulations of `model`: a ModelConfig (or a CNN) gives the
    CNN with its "auto" formulations resolved for each purpose; any other module is its own
    evaluation formulation."""
    if isinstance(model, CNN):
        model = model.config
    if isinstance(model, ModelConfig):
        return build_model(model, backend, "train"), build_model(model, backend, "eval")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a Flax module or a ModelConfig, not "
                        f"{type(model).__name__}")
    return model, model


@dataclasses.dataclass(frozen=True)
class Apply:
    """`module.apply` as the steps call it: `(variables, images, mask, *, train, **kw)`.
    The batch's mask [B] (1 real, 0 padding) is passed to a module whose `__call__` takes
    `mask`, so that batch statistics can leave the padding out; other modules never see it.
    A frozen dataclass, so two of the same module are equal (one compiled program)."""

    module: nn.Module

    @property
    def takes_mask(self) -> bool:
        return "mask" in inspect.signature(type(self.module).__call__).parameters

    def __call__(self, variables, images, mask, *, train: bool, **kwargs):
        if self.takes_mask:
            kwargs["mask"] = mask
        return self.module.apply(variables, images, train=train, **kwargs)


INIT_DROPOUT = 1  # the dropout stream of an init key (a module may draw at init)


def init_variables(module: nn.Module, key, image_shape: tuple[int, ...]) -> dict:
    """Every variable collection of `module` ({"params": ..., "batch_stats": ...}), from
    `key` alone and the input shape."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    rngs = {"params": key, "dropout": jax.random.fold_in(key, INIT_DROPOUT)}
    mask = {"mask": jnp.ones((1,), jnp.float32)} if Apply(module).takes_mask else {}
    return dict(module.init(rngs, dummy, train=False, **mask))


def init_params(model: nn.Module, key):
    """Parameters for `model`, from `key` alone (no data needed beyond the input shape)."""
    return init_variables(model, key, model.config.image_shape)["params"]


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def uses_xla_conv(apply: Apply, variables: dict, image_shape: tuple[int, ...]) -> bool:
    """Whether the module's training program holds XLA's convolution (what decides the
    engine on CPU), found in its traced program rather than from any field of the model."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    mask = jax.ShapeDtypeStruct((1,), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x, m: apply(
        v, x, m, train=True, rngs={"dropout": jax.random.PRNGKey(0)},
        mutable=[c for c in variables if c != "params"]))(variables, images, mask)
    return any(eqn.primitive.name == "conv_general_dilated" for eqn in _equations(jaxpr.jaxpr))


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def describe(module: nn.Module, params) -> dict:
    """What config.json records of a model: its class and fields, parameter count and
    variable collections, and forward FLOPs per image where known."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.name not in ("parent", "name")}
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "fields": {k: jsonable(v) for k, v in fields.items()},
        "num_params": count_params(params),
        "forward_flops_per_image": (module.config.forward_flops if isinstance(module, CNN)
                                    else "unknown"),
    }


def jsonable(value: Any) -> Any:
    """A JSON-ready form of a field or argument: dataclasses as dicts, functions by their
    qualified name, partials with their arguments, anything else by repr."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, nn.Module):
            return {"class": type(value).__qualname__, **{
                f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in ("parent", "name")}}
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {"function": jsonable(value.func), **{k: jsonable(v) for k, v in value.keywords.items()},
                **({"args": jsonable(value.args)} if value.args else {})}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)
