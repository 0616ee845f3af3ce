"""The pure per-step functions: initial state, one training step, prediction.

``train_step(setup, state, batch, key) -> (state, metrics)`` is one optimisation step: an
Optax generator optimiser and, when the adversarial weights are on, a discriminator step
with its own optimiser; an EMA of the parameters; non-finite losses never reach the
parameters (the update is skipped and counted). ``predict_ct`` reconstructs a batch
(sliding windows for patch models). Nothing here reads a config, jits or touches the
host: ``xct.experiment`` builds the ``Setup`` from a config and jits these functions once
on its mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xct import geometry, losses
from xct.models import patches

GAN_KINDS = ("lsgan", "hinge")


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    disc_params: Any = None
    disc_stats: Any = None  # spectral-norm power-iteration state of the discriminator
    disc_opt_state: Any = None
    nonfinite_steps: jax.Array = None  # steps whose update was skipped (NaN/inf)


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """Everything static a step needs (hashable modules and transforms, plain numbers).

    Attributes:
      model: the generator (``xct.models``), ``apply(params, drr, angles_deg)``.
      tx: its Optax transform.
      loss_weights: loss name -> weight (``losses.total_generator_loss``).
      ema_decay: decay of the parameters' exponential moving average.
      acquisition: the orbit the projection-consistency loss renders on.
      extra_views: random extra views of the projection-consistency loss.
      disc, disc_tx: the discriminator and its transform (None without GAN terms).
      gan_kind: ``"lsgan"`` or ``"hinge"`` adversarial losses.
      patch_size: > 0: the model reconstructs random ``P^3`` patches while training.
      patch_overlap: sliding-window overlap (voxels) when predicting with a patch model.
      perceptual: ``ct [B, D, D, D] -> feature maps`` of the frozen network of the
        perceptual loss (``losses.perceptual``), or None.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    loss_weights: dict
    ema_decay: float
    acquisition: geometry.Acquisition
    extra_views: int = 0
    disc: nn.Module | None = None
    disc_tx: optax.GradientTransformation | None = None
    gan_kind: str = "lsgan"
    patch_size: int = 0
    patch_overlap: int = 0
    perceptual: Any = None

    def __post_init__(self):
        if self.gan_kind not in GAN_KINDS:
            raise ValueError(f"loss.gan_kind: expected one of {GAN_KINDS}, got {self.gan_kind!r}")


def create_train_state(setup: Setup, key: jax.Array, batch: dict) -> TrainState:
    """Initial state for ``batch``'s shapes (pure: jit it with ``out_shardings``)."""
    k_model, k_disc = jax.random.split(key)
    params = setup.model.init(k_model, batch["drr"], batch["angles_deg"], train=False)["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=setup.tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )
    if setup.disc is not None:
        dvars = setup.disc.init(k_disc, batch["ct"], train=False)
        state = state.replace(
            disc_params=dvars["params"],
            disc_stats=dvars.get("batch_stats", {}),
            disc_opt_state=setup.disc_tx.init(dvars["params"]),
        )
    return state


def _disc_apply(setup: Setup, params, stats, ct, update: bool):
    out, new = setup.disc.apply(
        {"params": params, "batch_stats": stats}, ct, train=update, mutable=["batch_stats"]
    )
    return out, new["batch_stats"]


def _apply_model(setup: Setup, params, batch: dict, key: jax.Array, train: bool):
    """``(model outputs, batch)``; patch models see a random patch per example and the
    batch's volumes are cropped to it."""
    if not setup.patch_size:
        out = setup.model.apply({"params": params}, batch["drr"], batch["angles_deg"], train=train)
        return out, batch
    p = setup.patch_size
    offsets = patches.random_offsets(key, batch["ct"].shape[0], batch["ct"].shape[1], p)
    batch = {**batch, "ct": patches.crop(batch["ct"], offsets, p)}
    if "labels" in batch:
        batch["labels"] = patches.crop(batch["labels"], offsets, p)
    out = setup.model.apply(
        {"params": params}, batch["drr"], batch["angles_deg"], train=train, patch_offset=offsets
    )
    return out, batch


def _adversarial_terms(setup: Setup, state: TrainState, pred, target) -> dict:
    w = setup.loss_weights
    terms = {}
    (fake_logits, fake_feats), _ = _disc_apply(
        setup, state.disc_params, state.disc_stats, pred, False
    )
    if w.get("adversarial", 0.0):
        gen = losses.hinge_generator if setup.gan_kind == "hinge" else losses.lsgan_generator
        terms["adversarial"] = gen(fake_logits)
    if w.get("feature_matching", 0.0):
        (_, real_feats), _ = _disc_apply(setup, state.disc_params, state.disc_stats, target, False)
        terms["feature_matching"] = losses.feature_matching(
            jax.lax.stop_gradient(real_feats), fake_feats
        )
    return terms


def generator_terms(
    setup: Setup, params, state: TrainState, batch: dict, key: jax.Array, train: bool
):
    """Per-example loss terms ``{name: [B]}``, the prediction and its target."""
    w = setup.loss_weights
    k_patch = None
    if setup.patch_size:
        key, k_patch = jax.random.split(key)
    out, batch = _apply_model(setup, params, batch, k_patch, train)
    pred, target = out["ct"], batch["ct"]
    terms = {}
    for name, fn in (
        ("l1", losses.l1),
        ("mse", losses.mse),
        ("ssim", losses.ssim_loss),
        ("gradient", losses.gradient_loss),
    ):
        if w.get(name, 0.0):
            terms[name] = fn(pred, target)
    if w.get("projection", 0.0):
        terms["projection"] = losses.projection_consistency(
            pred,
            batch["drr"],
            batch["angles_deg"],
            acquisition=setup.acquisition,
            extra_views=setup.extra_views,
            key=key,
            target_ct=target,
        )
    if w.get("seg", 0.0) and "seg_logits" in out and "labels" in batch:
        ce = optax.softmax_cross_entropy_with_integer_labels(out["seg_logits"], batch["labels"])
        terms["seg"] = jnp.mean(ce.reshape(ce.shape[0], -1), axis=-1)
    if w.get("perceptual", 0.0) and setup.perceptual is not None:
        terms["perceptual"] = losses.perceptual(pred, target, setup.perceptual)
    if setup.disc is not None:
        terms.update(_adversarial_terms(setup, state, pred, target))
    return terms, pred, target


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _discriminator_update(setup: Setup, state: TrainState, new: TrainState, pred, target):
    """``(state with the discriminator stepped, its loss, its gradients)``."""
    fake = jax.lax.stop_gradient(pred)
    d_loss = losses.hinge_discriminator if setup.gan_kind == "hinge" else losses.lsgan_discriminator

    def d_loss_fn(dparams):
        (real_logits, _), stats = _disc_apply(setup, dparams, state.disc_stats, target, True)
        (fake_logits, _), stats = _disc_apply(setup, dparams, stats, fake, True)
        return jnp.mean(d_loss(real_logits, fake_logits)), stats

    (loss, stats), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
    updates, opt = setup.disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    new = new.replace(
        disc_params=optax.apply_updates(state.disc_params, updates),
        disc_stats=stats,
        disc_opt_state=opt,
    )
    return new, loss, grads


def train_step(setup: Setup, state: TrainState, batch: dict, key: jax.Array):
    """One optimisation step: ``(state, batch, key) -> (state, metrics)``; pure."""

    def loss_fn(params):
        terms, pred, target = generator_terms(setup, params, state, batch, key, train=True)
        total, parts = losses.total_generator_loss(terms, setup.loss_weights)
        return total, (parts, (pred, target))

    (loss, (parts, (pred, target))), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(
        lambda e, p: setup.ema_decay * e + (1.0 - setup.ema_decay) * p, state.ema_params, params
    )
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}
    metrics["grad_norm"] = optax.tree.norm(grads)
    if setup.disc is not None:
        new, metrics["loss_discriminator"], d_grads = _discriminator_update(
            setup, state, new, pred, target
        )
        grads = (grads, d_grads)

    # NaN/inf guard: a non-finite step leaves the state as it was (and is counted).
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new.params)
    new = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1)
    )
    new = new.replace(nonfinite_steps=state.nonfinite_steps + (1 - finite.astype(jnp.int32)))
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new, metrics


def predict_ct(setup: Setup, params, batch: dict) -> jax.Array:
    """The normalised CT ``[B, D, D, D]`` predicted from ``batch``'s views; patch models
    tile the volume with overlapping patches (``patches.sliding_window``)."""
    drr, angles = batch["drr"], batch["angles_deg"]
    if not setup.patch_size:
        return setup.model.apply({"params": params}, drr, angles, train=False)["ct"]
    return patches.sliding_window(
        lambda offsets: setup.model.apply(
            {"params": params}, drr, angles, train=False, patch_offset=offsets
        )["ct"],
        drr.shape[0],
        drr.shape[-1],
        setup.patch_size,
        setup.patch_overlap,
    )
