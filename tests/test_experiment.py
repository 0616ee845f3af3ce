"""Experiment.from_config: every config field reaches the object it configures (or a bad
value raises naming it), the hinge GAN loss is the one trained, and prediction on a spatial
mesh splits volumes along z and equals the single-device result (4 fake CPU devices)."""

import functools
import operator

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
    "distributed": "xct.main: sharding.maybe_initialize_distributed (tests/test_multihost.py)",
}
# Non-default values a string field can take (others: numbers doubled or set, bools flipped).
# "{cts}" and "{net}": a folder (made by the test) for real CTs and a saved segmenter.
STRINGS = {
    "data.source": "render",
    "data.tfds.dataset": "synthetic_chest/res64_views8",
    "data.tfds.data_dir": "/nonexistent/elsewhere",
    "data.render.real_ct_dir": "{cts}",
    "data.render.real_fov": "body",
    "data.tfds.view_selection": "random",
    "model.name": "baseline",
    "model.lifting": "expand",
    "model.fusion": "attention",
    "model.attention": "gates",
    "loss.gan_kind": "hinge",
    "loss.perceptual_net": "{net}",
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
    "geometry.sod_mm": 1200.0,  # doubled it would pass the detector (sdd_mm 1500)
    "logical_axis_rules": (("batch", "data"), ("z", None)),
    "data.tfds.split_sizes": {"train": 3},
    "data.batch_size": 8,
    "eval.report_ids": ("chest.nii.gz",),
    "data.render.real_exclude": ("chest_*",),
    "optim.b1": 0.8,
    "optim.b2": 0.95,
    "optim.ema_decay": 0.9,
}
# Other fields a field needs to take effect (None: the field is removed from the config).
NEEDS = {
    "train.patch_size": {"loss.projection": 0.0},  # the projection loss needs whole volumes
    "data.render.real_fraction": {"data.render.real_ct_dir": "{cts}"},
    "loss.perceptual": {"loss.perceptual_net": "{net}"},
    "loss.perceptual_net": {"loss.perceptual": 0.1},  # held by the loss only when weighted
    # the U-Net's own fields are no keywords of the baseline
    "model.name": {
        f"model.{k}": None
        for k in ("lifting", "fusion", "attention", "num_levels", "num_res_blocks")
    },
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
    c.data.render.curriculum_steps = 10  # the complexity curriculum takes effect only with a ramp
    return c


def _leaves(c, prefix=""):
    for k, v in c.items():
        path = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict) and len(v) and path != "data.tfds.split_sizes":
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
        if value is None:
            del target[leaf]
        else:
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


def _reference_tx(c):
    """The optimiser as configs/default.py's comments describe it, built here with optax
    (not with experiment.make_optimizer): global-norm clipping, then AdamW whose learning
    rate warms up linearly from 0 and decays (cosine) to 1 % at train.num_steps."""
    o = c.optim
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, c.train.num_steps, end_value=0.01 * o.learning_rate
    )
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)


def _at(*places, want=None):
    """A field's check: ``(value held at each place, value expected there)`` pairs; a place
    is an attribute path on the Experiment or a function of it; ``want(new)`` converts
    the config's value to the form the places hold (default: equal to it)."""
    getters = [operator.attrgetter(p) if isinstance(p, str) else p for p in places]

    def pairs(exp, config, new):
        expected = new if want is None else want(new)
        return [(get(exp), expected) for get in getters]

    return pairs


def _trained_with(*places):
    """A field of the optimiser: its traced updates equal the reference optimiser's of the
    config (``_reference_tx``), besides the values at ``places``."""

    def pairs(exp, config, new):
        fixed = _at(*places)(exp, config, new) if places else []
        return fixed + [(_optimizer_trace(exp.setup.tx), _optimizer_trace(_reference_tx(config)))]

    return pairs


_ACQUISITIONS = (
    "acquisition",
    "setup.acquisition",
    "setup.model.acquisition",
    "data.acquisition",
    "evaluator.acquisition",
)
_LOSS_WEIGHTS = (
    "l1",
    "mse",
    "ssim",
    "gradient",
    "projection",
    "seg",
    "adversarial",
    "feature_matching",
)
_MODEL = ("base_features", "num_levels", "num_res_blocks", "lifting", "fusion", "attention")
_LOOP = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_seconds")

# Where each config field lands in the built Experiment: the test sets the field to
# another value (_other_value) and checks every (held, expected) pair: equal with the new
# value, different with the base config.
REACHES = {
    "seed": _at("seed", "data.seed"),
    "init_from": _at("init_from"),
    "mesh.data": _at(lambda e: e.mesh.shape["data"]),
    "mesh.spatial": _at(lambda e: e.mesh.shape["spatial"]),
    "logical_axis_rules": _at("rules", "evaluator.rules"),
    **{
        f"geometry.{f}": _at(*(f"{place}.{f}" for place in _ACQUISITIONS))
        for f in ("resolution", "fov_mm", "sod_mm", "sdd_mm", "pixel_mm", "arc_deg")
    },
    "data.source": _at(lambda e: type(e.data).__name__, want=lambda v: f"{v.title()}Source"),
    "data.batch_size": _at("batch_size", "data.batch_size"),
    "data.num_views": _at("num_views", "data.num_views", "eval.num_views", "evaluator.num_views"),
    "data.tfds.split_sizes": _at("data.split_sizes", want=lambda v: tuple(sorted(v.items()))),
    "data.render.real_exclude": _at("data.real_exclude", want=tuple),
    # config.data.<section>.<field> -> the data source's field of that name
    **{
        f"data.{section}.{f}": _at(f"data.{f}")
        for section, names in (("tfds", TFDS_ONLY), ("render", RENDER_ONLY))
        for f in names
        if f not in ("split_sizes", "real_exclude")
    },
    "model.name": _at(lambda e: type(e.setup.model).__name__, want=str.title),
    **{f"model.{f}": _at(f"setup.model.{f}") for f in _MODEL},
    "model.seg_classes": lambda e, c, new: [
        (e.setup.model.seg_classes, new),
        (e.data.labels, new > 0),  # the data source hands the organ labels to the step
    ],
    "disc.base_features": _at("setup.disc.base_features"),
    **{f"loss.{f}": _at(lambda e, f=f: e.setup.loss_weights[f]) for f in _LOSS_WEIGHTS},
    "loss.projection_extra_views": _at("setup.extra_views"),
    "loss.gan_kind": _at("setup.gan_kind"),
    "loss.perceptual": lambda e, c, new: [
        (e.setup.loss_weights["perceptual"], new),
        (e.setup.perceptual is not None, True),
    ],
    # the segmenter loaded from that folder is the one whose features the loss compares
    "loss.perceptual_net": _at(
        lambda e: e.setup.perceptual and e.setup.perceptual.args[0]["loaded_from"]
    ),
    **{
        f"optim.{f}": _trained_with()
        for f in ("learning_rate", "warmup_steps", "weight_decay", "b1", "b2", "grad_clip")
    },
    "optim.ema_decay": _at("setup.ema_decay"),
    "optim.disc_learning_rate": lambda e, c, new: [
        (
            _optimizer_trace(e.setup.disc_tx),
            _optimizer_trace(optax.adam(new, b1=0.5, b2=0.999)),
        )
    ],
    "train.num_steps": _trained_with("loop.num_steps"),
    **{f"train.{f}": _at(f"loop.{f}") for f in _LOOP},
    "train.on_nonfinite": _at("loop.on_nonfinite"),
    "train.stages": _at("loop.stages"),  # run by train.train_progressive (tests/test_train.py)
    "train.patch_size": _at("setup.patch_size", "setup.model.patch_size"),
    "train.patch_overlap": _at("setup.patch_overlap"),
    "eval.batch_size": _at("eval.batch_size", "evaluator.batch_size"),
    "eval.num_views": _at("eval.num_views", "evaluator.num_views"),
    "eval.report_ids": _at("eval.report_ids", want=tuple),
    **{f"eval.{f}": _at(f"eval.{f}") for f in ("split", "save_volumes", "report_volumes")},
}
# Values refused, with the error that must name the field: (field, value, message).
REFUSED = [
    ("disc.name", "unet", "config.disc.name: 'unet' is not a discriminator"),
    ("data.source", "hdf5", "config.data.source: expected 'tfds' or 'render'"),
    ("data.render.real_ct_dir", "/nonexistent/cts", "config.data.render.real_ct_dir: /nonexist"),
    ("data.render.real_fraction", 0.5, r"render.real_fraction > 0 needs config.data.render.real"),
    ("data.render.real_fov", "lungs", "config.data.render.real_fov: expected '' or 'body'"),
    ("data.render.phantom_version", 3, "config.data.render.phantom_version: expected 1 or 2"),
    ("data.batch_size", 6, "config.data.batch_size: 6 is not divisible"),
    ("loss.gan_kind", "wasserstein", "gan_kind"),
    ("loss.perceptual", 0.5, r"loss.perceptual > 0 needs loss.perceptual_net"),
    ("loss.perceptual_net", "/nonexistent/segmenter", "loss.perceptual_net: /nonexistent/segm"),
    ("train.patch_size", 16, "config.loss.projection: the projection loss needs whole volumes"),
    ("train.on_nonfinite", "ignore", "config.train.on_nonfinite: expected 'stop' or 'skip'"),
    ("model.name", "baseline", r"model 'baseline': unknown keyword\(s\) \['attention'"),
    ("model.name", "patchgan", "config.model.name: 'patchgan' is a discriminator"),
    ("geometry.sod_mm", 2000.0, "geometry.sdd_mm: the detector must lie beyond the isocentre"),
    ("geometry.focal_mm", 1.0, r"config.geometry: unknown field\(s\) \['focal_mm'\]"),
    ("logical_axis_rules", (("batch", "gpu"),), "logical_axis_rules: 'batch' -> 'gpu'"),
]


def _source(path):
    """The data source whose fields ``path`` is one of (tfds for the fields of neither)."""
    return "render" if path.startswith("data.render.") else "tfds"


def _config(path, value, folders, needs=True):
    """The base config (of the source the field belongs to) with ``path`` set to ``value``
    and, with ``needs``, what the field needs (``NEEDS``); "{cts}" / "{net}" name the
    test's folders."""
    c = _base(_source(path))
    for p, v in {**(NEEDS.get(path, {}) if needs else {}), path: value}.items():
        _set(c, p, v.format(**folders) if isinstance(v, str) else v)
    return c


def test_every_config_field_reaches_what_it_configures_or_raises(tmp_path, monkeypatch):
    """Each field of the config, set to another value, shows up where it acts (the
    acquisition, model, loss weights, optimiser updates, data source, loop, evaluation
    settings, mesh) or, for a value it refuses, raises a ValueError naming it."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    from xct.models import segmenter

    folders = {"cts": str(tmp_path / "cts"), "net": str(tmp_path / "segmenter")}
    (tmp_path / "cts").mkdir()
    real_load = segmenter.load

    def load(directory):
        """A segmenter whose "parameters" say where they came from (initialising a real one
        costs seconds; tests/test_segmenter.py loads real ones); other folders: the real
        loader and its errors."""
        if str(directory) != folders["net"]:
            return real_load(directory)
        return segmenter.OrganSegmenter(classes=2, width=3), {"loaded_from": str(directory)}

    monkeypatch.setattr(segmenter, "load", load)

    fields = {path: value for path, value in _leaves(_base()) if path not in READ_ELSEWHERE}
    refused = {path for path, _, _ in REFUSED}
    unchecked = sorted(set(fields) - set(REACHES) - refused)
    assert not unchecked, f"config fields with no check: {unchecked} (add them to REACHES)"
    stale = sorted(set(REACHES) - set(fields))
    assert not stale, f"REACHES names fields the config no longer has: {stale}"
    bases = {src: Experiment.from_config(_base(src)) for src in ("tfds", "render")}
    checked = []
    for path in sorted(set(fields) & set(REACHES)):
        new = _other_value(path, fields[path])
        new = new.format(**folders) if isinstance(new, str) else new
        c = _config(path, new, folders)
        exp = Experiment.from_config(c)
        base = bases[_source(path)]
        for (held, expected), (before, _) in zip(
            REACHES[path](exp, c, new), REACHES[path](base, c, new), strict=True
        ):
            assert held == expected, f"{path}={new!r}: the Experiment holds {held!r}"
            assert before != expected, f"{path}: the base config already gives {before!r}"
        checked.append(path)
    for path, value, message in REFUSED:
        with pytest.raises(ValueError, match=message):
            Experiment.from_config(_config(path, value, folders, needs=False))
        checked.append(path)
    assert len(set(checked)) > 60, checked


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
    del stored["data"]["render"]["real_fov"]  # written before the field existed
    assert experiment.config_differences(config, json.dumps(stored)) == []
    config.data.render.real_fov = "body"
    config.data.num_views = config.data.num_views + 1
    diffs = experiment.config_differences(config, json.dumps(stored))
    assert [d.split(":")[0] for d in diffs] == ["data.num_views", "data.render.real_fov"]


def test_old_flat_data_fields_land_in_their_sections():
    """Configs written before the data sections (a stored config.json, a shipped config.py,
    a command line with --config.data.pool_size) are translated in one place: the same
    Experiment, no difference from the sectioned config, flags rewritten."""
    import json

    from xct import experiment

    config = default.get_config()
    flat = json.loads(config.to_json_best_effort())
    for section in ("tfds", "render"):
        flat["data"].update(flat["data"].pop(section))
    assert "pool_size" in flat["data"] and "render" not in flat["data"]
    assert experiment.config_differences(config, json.dumps(flat)) == []
    flat["data"]["pool_size"] = 5
    assert [d.split(":")[0] for d in experiment.config_differences(config, json.dumps(flat))] == [
        "data.render.pool_size"
    ]

    old = _base("render")
    with old.unlocked():
        old.data.pool_size = 3  # the old name, as a config file of the flat layout sets it
        old.data.real_exclude = ["x*"]
    upgraded = experiment.upgrade_config(old)
    assert "pool_size" not in upgraded.data and upgraded.data.render.pool_size == 3
    assert "pool_size" in old.data  # a copy: the caller's config is left as it was
    exp = Experiment.from_config(old)
    assert (exp.data.pool_size, exp.data.real_exclude) == (3, ("x*",))
    assert exp.config.data.render.pool_size == 3  # config.json records the sections

    assert experiment.legacy_flag("--config.data.data_dir=/d") == "--config.data.tfds.data_dir=/d"
    assert experiment.legacy_flag("--config.data.pool_size=2") == "--config.data.render.pool_size=2"
    for same in ("--config.data.num_views=3", "--config.data.render.flip=False", "--workdir=x"):
        assert experiment.legacy_flag(same) == same


def test_sections_are_the_constructors_keyword_arguments():
    """An unknown or missing field of a section is a ValueError naming the section."""
    from xct import experiment

    c = _base("render")
    with c.unlocked():
        c.train.num_step = 3
    with pytest.raises(ValueError, match=r"config.train: unknown field\(s\) \['num_step'\]"):
        Experiment.from_config(c)
    c = _base("render")
    with c.unlocked():
        del c.eval.split
    with pytest.raises(ValueError, match=r"config.eval: missing field\(s\) \['split'\]"):
        Experiment.from_config(c)
    with pytest.raises(ValueError, match=r"config.train: unknown"):
        experiment.settings(experiment.Loop, {"oops": 1}, "train")


def test_a_stored_config_that_predates_fields_gets_their_defaults():
    """A run's config.json written before a field existed (train.on_nonfinite,
    loss.perceptual_net, the data sections) loads: the missing fields take
    configs/default.py's value, as that run behaved; model fields are never filled."""
    import json
    import pathlib

    import ml_collections

    from xct import experiment

    stored = pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "unet32_2v"
    raw = json.loads((stored / "config.json").read_text())
    assert "on_nonfinite" not in raw["train"] and "render" not in raw["data"]
    c = experiment.upgrade_config(ml_collections.ConfigDict(raw))
    base = default.get_config()
    assert c.train.on_nonfinite == base.train.on_nonfinite
    assert c.loss.perceptual_net == base.loss.perceptual_net
    assert set(c.data) == set(base.data)
    assert set(c.model) == set(raw["model"])
    assert experiment.upgrade_config(c) is c  # nothing left to change
