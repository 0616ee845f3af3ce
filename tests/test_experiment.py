"""Experiment.from_config: every config field reaches its use (or raises), the hinge GAN
loss is the one trained, and prediction on a spatial mesh splits volumes along z and
equals the single-device result (4 fake CPU devices)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from xct import losses, steps
from xct.configs import default
from xct.experiment import Experiment

# Fields read outside Experiment.from_config, with the test that shows them taking effect.
READ_ELSEWHERE = {
    "distributed": "sharding.maybe_initialize_distributed (tests/test_multihost.py)",
    "train.stages": "train.train_progressive (tests/test_train.py, progressive stages)",
}
# Non-default values a string field can take (others: numbers doubled or set, bools flipped).
STRINGS = {
    "data.source": "render",
    "data.dataset": "synthetic_chest/res64_views8",
    "data.data_dir": "/nonexistent/elsewhere",
    "data.real_ct_dir": "/nonexistent/cts",
    "data.real_fov": "body",
    "data.view_selection": "random",
    "model.name": "baseline",
    "model.lifting": "expand",
    "model.fusion": "attention",
    "model.attention": "gates",
    "disc.name": "unet",
    "loss.gan_kind": "hinge",
    "loss.perceptual_net": "/nonexistent/segmenter",
    "eval.split": "validation",
    "init_from": "/nonexistent/run",
    "train.stages": "32:1",
    "train.on_nonfinite": "skip",
}
SPECIAL = {
    "mesh.data": 2,
    "mesh.spatial": 2,
    "train.patch_size": 16,
    "geometry.resolution": 16,
    "logical_axis_rules": (("batch", "data"), ("z", None)),
    "data.split_sizes": {"train": 3},
    "data.batch_size": 8,
    "eval.report_ids": ("chest.nii.gz",),
    "data.real_exclude": ("chest_*",),
}
RENDER_ONLY = (
    "pool_size",
    "flip",
    "elastic_mm",
    "photons",
    "curriculum_steps",
    "complexity_curriculum",
    "real_ct_dir",
    "real_fraction",
    "real_exclude",
    "real_scale",
    "real_rotation_deg",
    "real_hu_gain",
    "real_fov",
    "phantom_version",
)
TFDS_ONLY = (
    "dataset",
    "data_dir",
    "split_sizes",
    "view_selection",
    "intensity_jitter",
    "drr_noise_std",
    "worker_count",
)


def _base(source: str = "tfds"):
    c = default.get_config("smoke")
    c.data.source = source
    c.loss.adversarial = 0.01  # the discriminator's fields take effect only with a GAN term
    c.train.patch_overlap = 4
    c.train.num_steps = 1000  # a schedule long enough for its warm-up to show
    c.optim.warmup_steps = 1  # full learning rate from the second update: weight decay shows
    c.data.curriculum_steps = 10  # the complexity curriculum takes effect only with a ramp
    return c


def _leaves(c, prefix=""):
    for k, v in c.items():
        path = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict) and len(v) and path != "data.split_sizes":
            yield from _leaves(v, path + ".")
        else:
            yield path, v


def _other_value(path, v):
    if path in SPECIAL:
        return SPECIAL[path]
    if path in STRINGS:
        return STRINGS[path]
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return 2 * v if v > 0 else 1
    if isinstance(v, float):
        return 2 * v if v > 0 else 0.5
    raise AssertionError(f"no alternative value for {path}={v!r}: add it to the tables")


def _set(c, path, value):
    node, _, leaf = path.rpartition(".")
    target = c
    for part in node.split(".") if node else []:
        target = target[part]
    with c.unlocked():
        target[leaf] = value


def _optimizer_trace(tx):
    """Parameters after a few updates whose gradient norms straddle the clipping norm."""
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    out = []
    for i, scale in enumerate((0.05, 3.0, 40.0, 0.3, 1.5, 7.0)):
        grads = {"w": scale * jnp.asarray([1.0, -2.0, 0.5 + 0.3 * i])}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["w"]))
    return np.concatenate(out).tolist()


def _fingerprint(exp: Experiment):
    s = exp.setup
    return repr(
        (
            exp.acquisition,
            s.model,
            s.disc,
            sorted(s.loss_weights.items()),
            s.ema_decay,
            s.extra_views,
            s.gan_kind,
            s.patch_size,
            s.patch_overlap,
            _optimizer_trace(s.tx),
            _optimizer_trace(s.disc_tx) if s.disc_tx else None,
            exp.data,
            exp.loop,
            exp.eval,
            exp.seed,
            exp.init_from,
            dict(exp.mesh.shape),
            exp.rules,
            exp.batch_size,
            exp.num_views,
        )
    )


def test_every_config_field_takes_effect_or_raises():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    bases = {src: _fingerprint(Experiment.from_config(_base(src))) for src in ("tfds", "render")}
    checked, silent = [], []
    for path, value in _leaves(_base()):
        if path in READ_ELSEWHERE:
            continue
        field = path.removeprefix("data.")
        source = "render" if field in RENDER_ONLY else "tfds"
        c = _base(source)
        _set(c, path, _other_value(path, value))
        try:
            fp = _fingerprint(Experiment.from_config(c))
        except ValueError:
            checked.append(path)  # refused with a clear error: fine
            continue
        (checked if fp != bases[source] else silent).append(path)
    assert not silent, f"config fields with no effect: {silent}"
    assert len(checked) > 60, checked


def _tiny_gan_setup(gan_kind):
    c = _base("render")
    c.geometry.resolution = 8
    c.model.lifting = "expand"
    c.model.num_levels = 2
    c.model.base_features = 2
    c.model.attention = "none"
    c.loss.ssim = 0.0
    c.disc.base_features = 2
    c.disc.num_layers = 1
    c.loss.gan_kind = gan_kind
    c.loss.projection = 0.0
    c.mesh.data = 1
    return Experiment.from_config(c)


def test_hinge_gan_kind_trains_with_the_hinge_losses():
    rng = np.random.default_rng(0)
    exp = _tiny_gan_setup("hinge")
    setup = exp.setup
    batch = {
        k: jnp.asarray(rng.uniform(0, 1, v.shape), v.dtype) for k, v in exp.dummy_batch(1).items()
    }

    @jax.jit
    def run(batch):
        state = steps.create_train_state(setup, jax.random.key(0), batch)
        terms, pred, target = steps.generator_terms(
            setup, state.params, state, batch, jax.random.key(1), train=True
        )
        disc = functools.partial(steps._disc_apply, setup, state.disc_params)
        (fake_logits, _), _ = disc(state.disc_stats, pred, False)
        _, d_loss, _ = steps._discriminator_update(setup, state, state, pred, target)
        (real_logits, _), stats = disc(state.disc_stats, target, True)
        (fake2, _), _ = disc(stats, pred, True)
        return terms["adversarial"], fake_logits, d_loss, real_logits, fake2

    adversarial, fake_logits, d_loss, real_logits, fake2 = run(batch)
    np.testing.assert_allclose(adversarial, losses.hinge_generator(fake_logits), rtol=1e-6)
    assert not np.allclose(adversarial, losses.lsgan_generator(fake_logits))
    np.testing.assert_allclose(
        d_loss, jnp.mean(losses.hinge_discriminator(real_logits, fake2)), rtol=1e-5
    )
    assert _tiny_gan_setup("lsgan").setup.gan_kind == "lsgan"
    with pytest.raises(ValueError, match="gan_kind"):
        _tiny_gan_setup("wasserstein")


@pytest.mark.parametrize("lifting", ["backproject"])
def test_prediction_on_a_spatial_mesh_splits_z_and_equals_one_device(lifting):
    """What --mode=evaluate and --mode=predict run (Experiment.predict_hu through the
    evaluator) on spatial=2 and spatial=4 meshes: volumes split along z, same result."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")

    def experiment(data, spatial):
        c = _base("render")
        c.geometry.resolution = 16
        c.model.lifting = lifting
        c.model.num_levels = 2
        c.model.attention = "none"
        c.loss.adversarial = 0.0
        c.mesh.data, c.mesh.spatial = data, spatial
        c.eval.batch_size = 4
        return Experiment.from_config(c)

    ref_exp = experiment(1, 1)
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), ref_exp.abstract_state.params
    )
    drr = rng.uniform(0, 1, (4, 2, 16, 16)).astype(np.float32)
    angles = np.tile(np.float32([[0.0, 90.0]]), (4, 1))
    ref = ref_exp.evaluator.reconstruct([params], drr, angles)
    for data, spatial in ((2, 2), (1, 4)):
        exp = experiment(data, spatial)
        batch = exp.shard({"drr": drr, "angles_deg": angles})
        out = exp.predict_hu(params, batch["drr"], batch["angles_deg"])
        z_slices = {s.index[1].indices(16) for s in out.addressable_shards}
        assert len(z_slices) == spatial, (data, spatial, z_slices)  # split along z
        hu = exp.evaluator.reconstruct([params], drr, angles)
        # Equal up to float reduction order (HU, about 1e-6 relative).
        np.testing.assert_allclose(hu, ref, rtol=1e-5, atol=1e-2, err_msg=str((data, spatial)))
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-2)


def test_config_differences_names_changed_fields_and_forgives_fields_a_run_predates():
    """A stored config.json that lacks a field added later (the run predates it) matches a
    config holding that field's default; any other value, or a changed field, is named."""
    import json

    from xct import experiment

    config = default.get_config()
    stored = json.loads(config.to_json_best_effort())
    del stored["data"]["real_fov"]  # written before the field existed
    assert experiment.config_differences(config, json.dumps(stored)) == []
    config.data.real_fov = "body"
    config.data.num_views = config.data.num_views + 1
    diffs = experiment.config_differences(config, json.dumps(stored))
    assert [d.split(":")[0] for d in diffs] == ["data.num_views", "data.real_fov"]
