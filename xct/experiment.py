"""``Experiment.from_config(config)``: everything a run needs, built once, with named fields.

A config section is a constructor's keyword arguments: ``Acquisition(**config.geometry)``,
``data.TfdsSource(**config.data.tfds, ...)`` or ``data.RenderSource(**config.data.render,
...)``, ``Loop(**config.train)``, ``EvalSettings(**config.eval)``; the defaults live in
``configs/default.py`` only. From them: the model and its optimiser and losses
(``steps.Setup``), the device mesh and its logical axis rules, the evaluator, and the
jitted ``init`` / ``train_step`` / ``predict_hu``, each traced and run under the mesh and
its rules. ``train``, ``evaluate``, the scripts, notebooks and tests all start here.

Only this module (and ``xct.main``) reads a ``ConfigDict``: the ``Experiment`` holds typed
settings, and keeps its config only as the record written to ``WORKDIR/config.json`` and
compared with a stored run's (``config_differences``). ``jax.distributed`` is started by
``xct.main``, before anything is built. Configs written before the data sections (flat
``config.data.pool_size``, ...: stored runs, shipped checkpoints, old command lines) are
translated in one place, ``upgrade_config`` (``LEGACY_DATA_FIELDS``).

    exp = Experiment.from_config(config)
    state = exp.fresh_state()
    key = jax.random.fold_in(exp.streams["train"], step)
    state, metrics = exp.train_step(state, exp.data.open(...).batch(step), key)
    hu = exp.predict_hu(state.ema_params, drr, angles_deg)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import ml_collections
import optax

from xct import data, evaluator, geometry, models, rng, sharding, steps

#: Loss weights of ``config.loss`` (the other loss fields are settings).
LOSS_SETTINGS = ("gan_kind", "projection_extra_views", "perceptual_net")

#: The flat ``config.data`` fields of configs written before the data sections, and the
#: section of ``config.data`` each now lives in (``upgrade_config``).
LEGACY_DATA_FIELDS = {
    **dict.fromkeys(
        (
            "dataset",
            "data_dir",
            "split_sizes",
            "view_selection",
            "intensity_jitter",
            "drr_noise_std",
            "worker_count",
        ),
        "tfds",
    ),
    **dict.fromkeys(
        (
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
        ),
        "render",
    ),
}


class MeshFunction:
    """A jitted function that is traced and run under its mesh and logical axis rules
    (``sharding.activation_context``), so the models shard their activations on it."""

    def __init__(self, jitted, mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args):
        with sharding.activation_context(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with sharding.activation_context(self.mesh, self.rules):
            return self.jitted.lower(*args)


@dataclasses.dataclass(frozen=True)
class Loop:
    """The training loop's settings: ``Loop(**config.train)`` (comments there)."""

    num_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    max_seconds: float
    on_nonfinite: str  # a step with a NaN/inf loss or gradient: "stop" or "skip"
    patch_size: int  # > 0: the model trains on random P^3 patches (``steps.Setup``)
    patch_overlap: int
    stages: str  # progressive stages (``train.train_progressive`` runs one Loop per stage)

    def __post_init__(self):
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(
                f"config.train.on_nonfinite: expected 'stop' or 'skip', got {self.on_nonfinite!r}"
            )


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What ``--mode=evaluate`` scores and writes: ``EvalSettings(**config.eval)``."""

    batch_size: int
    split: str
    num_views: int  # views given to the model (0 in the config: as trained)
    save_volumes: int
    report_volumes: int
    report_ids: tuple[str, ...]  # volumes shown in the report (empty: spread evenly)

    def __post_init__(self):
        object.__setattr__(self, "report_ids", tuple(str(i) for i in self.report_ids or ()))


def settings(cls, section, name: str):
    """``cls(**section)``: a config section as the keyword arguments of the settings class
    it configures. Raises ``ValueError`` naming ``config.<name>`` and the unknown or
    missing fields."""
    given = dict(section)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"config.{name}: unknown field(s) {unknown}, expected {sorted(names)}")
    missing = sorted(
        f.name
        for f in fields
        if f.name not in given
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"config.{name}: missing field(s) {missing}")
    return cls(**given)


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
    config: Any  # the (upgraded) ConfigDict it was made from: a record, never read again
    acquisition: geometry.Acquisition
    setup: steps.Setup
    mesh: jax.sharding.Mesh
    rules: tuple
    data: data.DataSource
    loop: Loop
    eval: EvalSettings
    seed: int
    init_from: str
    num_views: int
    batch_size: int
    seg_classes: int  # > 0: batches carry organ labels for the segmentation head
    streams: dict  # the named random streams of ``seed`` (``rng.streams``)
    init: MeshFunction  # (key, batch) -> TrainState
    train_step: MeshFunction  # (state, batch, key) -> (state, metrics)
    predict_hu: MeshFunction  # (params, drr [B, V, r, r], angles_deg [B, V]) -> HU
    evaluator: evaluator.Evaluator

    @functools.cached_property
    def abstract_state(self):
        """The train state's ``ShapeDtypeStruct``s (replicated on the mesh), for restoring
        checkpoints; traced once, on first use."""
        init = functools.partial(steps.create_train_state, self.setup)
        abstract = jax.eval_shape(init, jax.random.key(0), self.dummy_batch())
        rep = sharding.replicated(self.mesh)
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract
        )

    @property
    def model(self):
        return self.setup.model

    @classmethod
    def from_config(cls, config) -> Experiment:
        """Build every part of ``config`` (raises ``ValueError`` naming a bad field). Old
        flat ``config.data`` fields are accepted (``upgrade_config``)."""
        config = upgrade_config(config)
        mesh = sharding.make_mesh(dict(config.mesh))
        rules = sharding.check_rules(config.logical_axis_rules)
        acq = acquisition_from_config(config)
        loop = settings(Loop, config.train, "train")
        setup = make_setup(config, acq, loop)
        source = make_data_source(config, acq)
        batch_size, num_views = source.batch_size, source.num_views
        if batch_size % sharding.batch_axis_size(mesh, rules):
            raise ValueError(
                f"config.data.batch_size: {batch_size} is not divisible by the "
                f"{sharding.batch_axis_size(mesh, rules)} devices of the batch axis"
            )
        seg_classes = int(config.model.get("seg_classes", 0))  # a field of some models only
        batch = data.dummy_batch(acq, batch_size, num_views, seg_classes)
        rep = sharding.replicated(mesh)  # parameters and optimiser state: every leaf
        init = functools.partial(steps.create_train_state, setup)
        train_step = jax.jit(
            functools.partial(steps.train_step, setup),
            in_shardings=(rep, sharding.batch_shardings(mesh, batch, rules), rep),
            out_shardings=(rep, rep),
            donate_argnums=0,
        )
        predict_hu = MeshFunction(jax.jit(functools.partial(_predict_hu, setup)), mesh, rules)
        eval_settings = settings(EvalSettings, config.eval, "eval")
        eval_settings = dataclasses.replace(
            eval_settings, num_views=eval_settings.num_views or num_views
        )
        seed = int(config.seed)
        return cls(
            config=config,
            acquisition=acq,
            setup=setup,
            mesh=mesh,
            rules=rules,
            data=source,
            loop=loop,
            eval=eval_settings,
            seed=seed,
            init_from=str(config.init_from or ""),
            num_views=num_views,
            batch_size=batch_size,
            seg_classes=seg_classes,
            streams=rng.streams(seed),
            init=MeshFunction(jax.jit(init, out_shardings=rep), mesh, rules),
            train_step=MeshFunction(train_step, mesh, rules),
            predict_hu=predict_hu,
            evaluator=evaluator.Evaluator(
                predict_hu, acq, mesh, rules, eval_settings.batch_size, eval_settings.num_views
            ),
        )

    def with_acquisition(self, acq: geometry.Acquisition) -> Experiment:
        """The same model, settings and mesh on another acquisition ``acq`` (another cube
        side, detector or orbit; the same resolution), with its own jitted ``predict_hu``
        and evaluator: a trained model's parameters predict there unchanged, as every
        model is geometry-aware. For prediction and evaluation: ``data`` stays the
        config's training source."""
        if acq.resolution != self.acquisition.resolution:
            raise ValueError(
                f"with_acquisition: resolution {acq.resolution}, the model's is "
                f"{self.acquisition.resolution}"
            )
        setup = dataclasses.replace(
            self.setup, model=self.setup.model.clone(acquisition=acq), acquisition=acq
        )
        predict_hu = MeshFunction(
            jax.jit(functools.partial(_predict_hu, setup)), self.mesh, self.rules
        )
        return dataclasses.replace(
            self,
            acquisition=acq,
            setup=setup,
            predict_hu=predict_hu,
            evaluator=evaluator.Evaluator(
                predict_hu, acq, self.mesh, self.rules, self.eval.batch_size, self.eval.num_views
            ),
        )

    def dummy_batch(self, batch_size: int | None = None) -> dict:
        """Zeros in the shapes of a training batch."""
        return data.dummy_batch(
            self.acquisition,
            batch_size or self.batch_size,
            self.num_views,
            self.seg_classes,
        )

    def shard(self, batch: dict) -> dict:
        """A host batch as globally sharded arrays on the mesh."""
        return sharding.shard_batch(batch, self.mesh, self.rules)

    def fresh_state(self):
        """The initial state, from the ``init`` stream of ``config.seed`` (``rng.streams``)."""
        return self.init(self.streams["init"], self.dummy_batch())

    def config_json(self) -> str:
        return self.config.to_json_best_effort(indent=1)


def _predict_hu(setup: steps.Setup, params, drr, angles_deg):
    from xct import physics

    return physics.denormalize_ct(
        steps.predict_ct(setup, params, {"drr": drr, "angles_deg": angles_deg})
    )


def load_config(spec: str):
    """``FILE.py[:arg]`` or ``NAME[:arg]`` (``configs/NAME.py``, installed as
    ``xct.configs``) -> the file's ``get_config(arg)`` (``get_config(None)`` without one).

    Raises:
      ValueError: naming ``spec`` when it is neither a file nor a shipped config.
    """
    import importlib.util
    import pathlib

    import xct.configs

    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    shipped = pathlib.Path(xct.configs.__file__).parent / f"{path}.py"
    if not file.is_file() and shipped.is_file():
        file = shipped
    if not file.is_file():
        raise ValueError(f"--config: {path} is not a file nor a config in {shipped.parent}")
    module_spec = importlib.util.spec_from_file_location(f"_xct_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return upgrade_config(module.get_config(arg or None))


def acquisition_from_config(config) -> geometry.Acquisition:
    """``Acquisition(**config.geometry)`` (a bad field raises naming it)."""
    return settings(geometry.Acquisition, config.geometry, "geometry")


def make_model(config, acq: geometry.Acquisition, patch: int = 0):
    """The generator of ``config.model`` on ``acq`` (training on ``patch``^3 patches when
    ``patch > 0``: ``config.train.patch_size``)."""
    kwargs = dict(config.model)
    name = kwargs.pop("name")
    if name in models.DISCRIMINATORS:
        raise ValueError(f"config.model.name: {name!r} is a discriminator, not a generator")
    if patch:
        if "patch_size" not in models.model_kwargs(name):
            raise ValueError(f"config.train.patch_size: model {name!r} has no patch mode")
        if float(config.loss.projection):
            raise ValueError(
                "config.loss.projection: the projection loss needs whole volumes; "
                "set it to 0 with config.train.patch_size > 0"
            )
        kwargs["patch_size"] = patch
    return models.get_model(name, acquisition=acq, **kwargs)


def make_optimizer(o, num_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to 1 %, after global-norm clipping."""
    warmup = min(int(o.warmup_steps), max(num_steps - 1, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        float(o.learning_rate),
        warmup,
        max(num_steps, warmup + 1),
        end_value=float(o.learning_rate) * 0.01,
    )
    return optax.chain(
        optax.clip_by_global_norm(float(o.grad_clip)),
        optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), weight_decay=float(o.weight_decay)),
    )


def make_setup(config, acq: geometry.Acquisition, loop: Loop) -> steps.Setup:
    """Model, optimisers and losses of ``config`` (``steps.Setup``) for ``loop``'s steps and
    patches."""
    weights = {k: float(v) for k, v in config.loss.items() if k not in LOSS_SETTINGS}
    gan = weights.get("adversarial", 0.0) > 0 or weights.get("feature_matching", 0.0) > 0
    disc = disc_tx = None
    if gan:
        disc_kwargs = dict(config.disc)
        name = disc_kwargs.pop("name")
        if name not in models.DISCRIMINATORS:
            raise ValueError(
                f"config.disc.name: {name!r} is not a discriminator, expected one of "
                f"{models.DISCRIMINATORS}"
            )
        disc = models.get_model(name, **disc_kwargs)
        disc_tx = optax.adam(float(config.optim.disc_learning_rate), b1=0.5, b2=0.999)
    perceptual = None
    net = str(config.loss.perceptual_net)
    if net:  # checked even while its weight is 0: a wrong path is an error, not a no-op
        from xct.models import segmenter  # noqa: PLC0415

        seg, seg_params = segmenter.load(net)
        if weights.get("perceptual", 0.0) > 0:
            perceptual = functools.partial(seg.apply, seg_params, method=seg.features)
    elif weights.get("perceptual", 0.0) > 0:
        raise ValueError(
            "loss.perceptual > 0 needs loss.perceptual_net: a folder written by "
            "python -m scripts.train_segmenter"
        )
    return steps.Setup(
        model=make_model(config, acq, loop.patch_size),
        tx=make_optimizer(config.optim, loop.num_steps),
        loss_weights=weights,
        ema_decay=float(config.optim.ema_decay),
        acquisition=acq,
        extra_views=int(config.loss.projection_extra_views),
        disc=disc,
        disc_tx=disc_tx,
        gan_kind=str(config.loss.gan_kind),
        patch_size=loop.patch_size,
        patch_overlap=loop.patch_overlap,
        perceptual=perceptual,
    )


def make_data_source(config, acq: geometry.Acquisition) -> data.DataSource:
    """The training data source of ``config.data.source``: ``TfdsSource(**config.data.tfds,
    ...)`` or ``RenderSource(**config.data.render, ...)``, given the acquisition, the
    batch, the views and the seed."""
    d = config.data
    common = dict(
        acquisition=acq,
        batch_size=int(d.batch_size),
        num_views=int(d.num_views),
        seed=int(config.seed),
    )
    if d.source == "tfds":
        labels = int(config.model.get("seg_classes", 0)) > 0
        return settings(data.TfdsSource, {**d.tfds, **common, "labels": labels}, "data.tfds")
    if d.source == "render":
        return settings(data.RenderSource, {**d.render, **common}, "data.render")
    raise ValueError(f"config.data.source: expected 'tfds' or 'render', got {d.source!r}")


def upgrade_data(d: dict) -> dict:
    """A ``config.data`` mapping (a stored ``config.json``'s included) with the old flat
    fields (``LEGACY_DATA_FIELDS``) moved into their sections."""
    out = dict(d)
    for k, section in LEGACY_DATA_FIELDS.items():
        if k in out:
            out[section] = {**dict(out.get(section) or {}), k: out.pop(k)}
    return out


#: Sections whose fields every config has (``configs/default.py``); a model's or a
#: discriminator's fields depend on its name, so those are never filled in.
_FILLED_SECTIONS = ("geometry", "data", "train", "eval", "loss", "optim", "mesh", "distributed")


def upgrade_config(config):
    """``config`` with the old flat ``config.data`` fields moved into ``config.data.tfds``
    and ``config.data.render`` and, in such a stored run (written before the sections), the
    fields it predates (absent from its ``config.json``) set to ``configs/default.py``'s
    value, as that run behaved (a copy; ``config`` itself when it has no flat fields: a
    config with sections must name every field). The one translation of configs written before
    a field or the sections: stored runs, shipped checkpoints' ``config.py``,
    ``--config.data.pool_size=...`` (``legacy_flag``)."""
    from xct.configs import default

    legacy = "data" in config and any(k in config.data for k in LEGACY_DATA_FIELDS)
    if not legacy:
        return config  # a config with sections must name every field (settings says which)
    base = default.get_config()
    missing = [
        (name, key)
        for name in _FILLED_SECTIONS
        if name in config and name in base and isinstance(base[name], ml_collections.ConfigDict)
        for key in base[name]
        if key not in config[name] and key not in LEGACY_DATA_FIELDS
    ]
    c = config.copy_and_resolve_references()
    with c.unlocked():
        if legacy:
            c.data = ml_collections.ConfigDict(upgrade_data(c.data.to_dict()))
        for name, key in missing:
            if key not in c[name]:  # the data sections may have come with upgrade_data
                c[name][key] = base[name][key]
    return c


def upgrade_path(path: str) -> str:
    """``data.pool_size`` -> ``data.render.pool_size``: the dotted path of an old flat data
    field in its section; any other path unchanged."""
    field = path.removeprefix("data.")
    if path.startswith("data.") and field in LEGACY_DATA_FIELDS:
        return f"data.{LEGACY_DATA_FIELDS[field]}.{field}"
    return path


def legacy_flag(arg: str) -> str:
    """``--config.data.pool_size=2`` -> ``--config.data.render.pool_size=2`` (old command
    lines); any other argument unchanged."""
    head, sep, value = arg.partition("=")
    if not head.startswith("--config.data."):
        return arg
    return f"--config.{upgrade_path(head.removeprefix('--config.'))}{sep}{value}"


def config_differences(config, stored_json: str) -> list[str]:
    """Fields whose value in ``config`` differs from a stored ``config.json`` (``a.b: x != y``;
    both with the old flat data fields in their sections, ``upgrade_data``).

    A field the stored config lacks (a run that predates the field) counts as a difference
    only when ``config`` sets it to something other than ``configs/default.py``'s value:
    such a run behaved as the default does."""
    from xct.configs import default

    def upgraded(c: dict) -> dict:
        return {**c, "data": upgrade_data(c.get("data") or {})} if "data" in c else c

    stored = upgraded(json.loads(stored_json))
    current = upgraded(json.loads(config.to_json_best_effort()))
    defaults = json.loads(default.get_config().to_json_best_effort())
    out = []

    def same(a, b):
        return a == b or (isinstance(a, list | tuple) and list(a) == list(b or []))

    def walk(a, b, d, path):
        if isinstance(a, dict) and isinstance(b, dict):
            d = d if isinstance(d, dict) else {}
            for k in sorted(set(a) | set(b)):
                if k not in b and k in d and same(a[k], d[k]):
                    continue  # the stored run predates the field, which is at its default
                walk(a.get(k), b.get(k), d.get(k), f"{path}.{k}" if path else k)
        elif not same(a, b):
            out.append(f"{path}: {a!r} (this config) != {b!r} (workdir)")

    walk(current, stored, defaults, "")
    return out
