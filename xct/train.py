"""Training: ``create_train_state``, ``train_step``, ``eval_step``, ``train_and_evaluate``.

One jitted, sharded step (``jax.jit`` with ``NamedSharding`` in/out shardings, the state
donated); an Optax AdamW generator optimiser (warm-up + cosine decay, gradient clipping,
EMA of the parameters) and, when the adversarial weights are on, a separate discriminator
optimiser. Randomness per step is ``fold_in(root_key, step)``, so a resumed run needs no
saved key; with the data iterator state saved beside each checkpoint, a resumed run
computes exactly the steps it would have computed. Non-finite losses never reach the
parameters (the update is skipped and counted) and stop the run at the next log step with
a clear message; every checkpoint therefore holds a good state.

Only this module, ``evaluate`` and ``main`` see a ``ConfigDict``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xct import checkpoint, geometry, input_pipeline, losses, metrics, models, physics, sharding
from xct.models import layers, patches


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    disc_params: Any = None
    disc_stats: Any = None  # spectral-norm power-iteration state of the discriminator
    disc_opt_state: Any = None
    nonfinite_steps: jax.Array = None  # steps whose update was skipped (NaN/inf)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static a step needs, derived once from the config."""

    model: Any
    disc: Any
    tx: Any
    disc_tx: Any
    loss_weights: dict
    ema_decay: float
    projection: dict  # fov_mm, sod_mm, sdd_mm, pixel_mm, extra_views
    seg_classes: int
    patch_size: int = 0  # > 0: patch-based training on random P^3 crops
    patch_overlap: int = 0  # sliding-window overlap (voxels) when evaluating patch models


# ---------------------------------------------------------------------------------------
# Construction


def data_geometry(config) -> dict:
    """Resolution and projection set-up shared by the data, the model and the losses."""
    d = config.data
    res, fov = int(d.resolution), float(d.fov_mm)
    sod, sdd = float(config.geometry.sod_mm), float(config.geometry.sdd_mm)
    half = (fov / 2) * sdd / (sod - fov / 2)  # the detector sees the inscribed cylinder
    return dict(resolution=res, fov_mm=fov, sod_mm=sod, sdd_mm=sdd, pixel_mm=2 * half / res)


def make_setup(config) -> Setup:
    g = data_geometry(config)
    model_kwargs = dict(config.model)
    name = model_kwargs.pop("name")
    allowed = models.model_kwargs(name) if name in models.MODELS else ()
    geo = {k: v for k, v in g.items() if k in allowed and k not in model_kwargs}
    patch = int(config.train.get("patch_size", 0))
    if patch:
        if "patch_size" not in allowed:
            raise ValueError(f"config.train.patch_size: model {name!r} has no patch mode")
        if float(config.loss.get("projection", 0.0)):
            raise ValueError(
                "config.loss.projection: the projection loss needs whole volumes; "
                "set it to 0 with config.train.patch_size > 0"
            )
        model_kwargs["patch_size"] = patch
    model = models.get_model(name, **geo, **model_kwargs)
    weights = {
        k: float(v)
        for k, v in config.loss.items()
        if k not in ("gan_kind", "projection_extra_views")
    }
    gan = weights.get("adversarial", 0.0) > 0 or weights.get("feature_matching", 0.0) > 0
    disc = None
    disc_tx = None
    if gan:
        disc_kwargs = dict(config.disc)
        disc = models.get_model(disc_kwargs.pop("name"), **disc_kwargs)
        disc_tx = optax.adam(float(config.optim.disc_learning_rate), b1=0.5, b2=0.999)
    o = config.optim
    num_steps = int(config.train.num_steps)
    warmup = min(int(o.warmup_steps), max(num_steps - 1, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        float(o.learning_rate),
        warmup,
        max(num_steps, warmup + 1),
        end_value=float(o.learning_rate) * 0.01,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(float(o.grad_clip)),
        optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), weight_decay=float(o.weight_decay)),
    )
    proj = dict(
        fov_mm=g["fov_mm"],
        sod_mm=g["sod_mm"],
        sdd_mm=g["sdd_mm"],
        pixel_mm=g["pixel_mm"],
        extra_views=int(config.loss.get("projection_extra_views", 0)),
    )
    return Setup(
        model,
        disc,
        tx,
        disc_tx,
        weights,
        float(o.ema_decay),
        proj,
        int(config.model.get("seg_classes", 0)),
        patch,
        int(config.train.get("patch_overlap", 0)),
    )


def dummy_batch(config, batch_size: int | None = None) -> dict:
    g = data_geometry(config)
    b = int(batch_size or config.data.batch_size)
    r, v = g["resolution"], int(config.data.num_views)
    batch = {
        "drr": np.zeros((b, v, r, r), np.float32),
        "angles_deg": np.tile(geometry.nested_view_angles(v)[None].astype(np.float32), (b, 1)),
        "ct": np.zeros((b, r, r, r), np.float32),
    }
    if int(config.model.get("seg_classes", 0)) > 0:
        batch["labels"] = np.zeros((b, r, r, r), np.int32)
    return batch


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


# ---------------------------------------------------------------------------------------
# Steps


def _disc_apply(setup: Setup, params, stats, ct, update: bool):
    out, new = setup.disc.apply(
        {"params": params, "batch_stats": stats}, ct, train=update, mutable=["batch_stats"]
    )
    return out, new["batch_stats"]


def _generator_terms(
    setup: Setup, params, state: TrainState, batch: dict, key: jax.Array, train: bool
):
    """Per-example loss terms ``{name: [B]}`` and the prediction."""
    w = setup.loss_weights
    if setup.patch_size:  # a random patch per example, compared with the same crop
        key, k_patch = jax.random.split(key)
        p = setup.patch_size
        offsets = patches.random_offsets(k_patch, batch["ct"].shape[0], batch["ct"].shape[1], p)
        batch = {**batch, "ct": patches.crop(batch["ct"], offsets, p)}
        if "labels" in batch:
            batch["labels"] = patches.crop(batch["labels"], offsets, p)
        out = setup.model.apply(
            {"params": params},
            batch["drr"],
            batch["angles_deg"],
            train=train,
            patch_offset=offsets,
        )
    else:
        out = setup.model.apply({"params": params}, batch["drr"], batch["angles_deg"], train=train)
    pred, target = out["ct"], batch["ct"]
    terms = {}
    if w.get("l1", 0.0):
        terms["l1"] = losses.l1(pred, target)
    if w.get("mse", 0.0):
        terms["mse"] = losses.mse(pred, target)
    if w.get("ssim", 0.0):
        terms["ssim"] = losses.ssim_loss(pred, target)
    if w.get("gradient", 0.0):
        terms["gradient"] = losses.gradient_loss(pred, target)
    if w.get("projection", 0.0):
        p = setup.projection
        terms["projection"] = losses.projection_consistency(
            pred,
            batch["drr"],
            batch["angles_deg"],
            fov_mm=p["fov_mm"],
            sod_mm=p["sod_mm"],
            sdd_mm=p["sdd_mm"],
            pixel_mm=p["pixel_mm"],
            extra_views=p["extra_views"],
            key=key,
            target_ct=target,
        )
    if w.get("seg", 0.0) and "seg_logits" in out and "labels" in batch:
        ce = optax.softmax_cross_entropy_with_integer_labels(out["seg_logits"], batch["labels"])
        terms["seg"] = jnp.mean(ce.reshape(ce.shape[0], -1), axis=-1)
    if setup.disc is not None and (w.get("adversarial", 0.0) or w.get("feature_matching", 0.0)):
        (fake_logits, fake_feats), _ = _disc_apply(
            setup, state.disc_params, state.disc_stats, pred, False
        )
        if w.get("adversarial", 0.0):
            terms["adversarial"] = losses.lsgan_generator(fake_logits)
        if w.get("feature_matching", 0.0):
            (_, real_feats), _ = _disc_apply(
                setup, state.disc_params, state.disc_stats, target, False
            )
            terms["feature_matching"] = losses.feature_matching(
                jax.lax.stop_gradient(real_feats), fake_feats
            )
    return terms, pred, target


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(setup: Setup, state: TrainState, batch: dict, key: jax.Array):
    """One optimisation step: ``(state, batch, key) -> (state, metrics)``; pure."""

    def loss_fn(params):
        terms, pred, target = _generator_terms(setup, params, state, batch, key, train=True)
        total, parts = losses.total_generator_loss(terms, setup.loss_weights)
        return total, (parts, (pred, target))

    (loss, (parts, (pred, target))), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(
        lambda e, p: setup.ema_decay * e + (1.0 - setup.ema_decay) * p, state.ema_params, params
    )
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    out_metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}
    out_metrics["grad_norm"] = optax.tree.norm(grads)

    if setup.disc is not None:
        fake = jax.lax.stop_gradient(pred)

        def d_loss_fn(dparams):
            (real_logits, _), stats = _disc_apply(setup, dparams, state.disc_stats, target, True)
            (fake_logits, _), stats = _disc_apply(setup, dparams, stats, fake, True)
            return jnp.mean(losses.lsgan_discriminator(real_logits, fake_logits)), stats

        (d_loss, stats), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
        d_updates, d_opt = setup.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
        new = new.replace(
            disc_params=optax.apply_updates(state.disc_params, d_updates),
            disc_stats=stats,
            disc_opt_state=d_opt,
        )
        out_metrics["loss_discriminator"] = d_loss
        grads = (grads, d_grads)

    # NaN/inf guard: a non-finite step leaves the state as it was (and is counted).
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new.params)
    new = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1)
    )
    new = new.replace(nonfinite_steps=state.nonfinite_steps + (1 - finite.astype(jnp.int32)))
    out_metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new, out_metrics


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


def eval_step(setup: Setup, params, batch: dict) -> dict:
    """Per-example metrics ``{name: [B]}`` in the primary definition (``xct.metrics``)."""
    pred_hu = physics.denormalize_ct(predict_ct(setup, params, batch))
    true_hu = physics.denormalize_ct(batch["ct"])
    return metrics.volume_metrics(pred_hu, true_hu)


# ---------------------------------------------------------------------------------------
# Data


def ensure_dataset(config) -> None:
    """Build the synthetic dataset when it is missing (in a subprocess: xct does not
    import data_pipelines); any other missing dataset is a clear error."""
    d = config.data
    data_dir = pathlib.Path(d.data_dir).expanduser().absolute()
    name = d.dataset
    if (data_dir / name).exists() and any((data_dir / name).glob("*/dataset_info.json")):
        return
    if not name.startswith("synthetic_chest/"):
        raise ValueError(
            f"config.data.dataset: {name!r} not found in {data_dir}; build it with "
            f"python -m data_pipelines.build --dataset={name} --data_dir={data_dir} "
            "--source_dir=..."
        )
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.build",
        f"--dataset={name}",
        f"--data_dir={data_dir}",
    ]
    if d.get("split_sizes"):
        cmd.append("--split_sizes=" + ",".join(f"{k}={v}" for k, v in dict(d.split_sizes).items()))
    logging.info("building the missing dataset: %s", " ".join(cmd))
    if jax.process_index() == 0:  # one builder; the data_dir is shared by all hosts
        print(f"building {name} into {data_dir} (first run only) ...", flush=True)
        subprocess.run(cmd, check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xct: dataset built")


def make_train_iterator(config, data_state: dict | None):
    d = config.data
    transform = input_pipeline.ExampleTransform(
        num_views=int(d.num_views),
        view_selection=d.view_selection,
        intensity_jitter=float(d.intensity_jitter),
        drr_noise_std=float(d.drr_noise_std),
    )
    src = input_pipeline.data_source(d.dataset, pathlib.Path(d.data_dir).expanduser(), "train")
    stored = int(src[0]["drr"].shape[0])
    if int(d.num_views) > stored:
        raise ValueError(
            f"config.data.num_views: {d.num_views} views but {d.dataset} stores {stored}"
        )
    ds = input_pipeline.make_dataset(
        src, batch_size=int(d.batch_size), transform=transform, seed=int(config.seed), train=True
    )
    it = input_pipeline.iterate(ds, worker_count=int(d.get("worker_count", 0)))
    if data_state:
        it.set_state(data_state)
    return it


def eval_batches(config, split: str, num_views: int | None = None):
    """All examples of ``split`` in batches (the last one padded; ``mask`` marks real ones)."""
    d = config.data
    src = input_pipeline.data_source(d.dataset, pathlib.Path(d.data_dir).expanduser(), split)
    t = input_pipeline.ExampleTransform(num_views=int(num_views or d.num_views))
    b = int(config.eval.batch_size)
    for start in range(0, len(src), b):
        exs = [t(src[i]) for i in range(start, min(start + b, len(src)))]
        n = len(exs)
        exs += [exs[-1]] * (b - n)
        batch = {k: np.stack([e[k] for e in exs]) for k in ("drr", "angles_deg", "ct")}
        yield batch, np.arange(b) < n


# ---------------------------------------------------------------------------------------
# The loop


class _Logger:
    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if enabled:
            self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # pragma: no cover
                self.tb = None

    def write(self, step: int, values: dict, prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
            self.tb.flush()

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _mean_metrics(rows: list[dict], masks: list[np.ndarray]) -> dict:
    keys = rows[0].keys()
    out = {}
    for k in keys:
        vals = np.concatenate([np.asarray(r[k])[m] for r, m in zip(rows, masks, strict=True)])
        out[k] = float(np.mean(vals))
    return out


def evaluate_split(
    config, setup: Setup, params, mesh, split: str, num_views: int | None = None
) -> dict:
    step_fn = jax.jit(_on_mesh(mesh, functools.partial(eval_step, setup)))
    rows, masks = [], []
    for batch, mask in eval_batches(config, split, num_views):
        # Every host reads the whole batch and hands over its own rows.
        batch = sharding.process_rows(batch)
        rows.append(sharding.fetch(step_fn(params, sharding.shard_batch(batch, mesh))))
        masks.append(mask)
    return _mean_metrics(rows, masks)


def _on_mesh(mesh, fn):
    """``fn`` traced with the models' activations sharded on ``mesh`` (z over ``spatial``)."""

    @functools.wraps(fn)
    def wrapped(*args):
        with layers.activation_mesh(mesh):
            return fn(*args)

    return wrapped


def build(config):
    """``(setup, mesh, jitted init, jitted step, abstract state)`` for ``config``."""
    sharding.maybe_initialize_distributed(config.get("distributed", None) or None)
    mesh = sharding.make_mesh(dict(config.mesh))
    setup = make_setup(config)
    batch = dummy_batch(config)
    if batch["drr"].shape[0] % mesh.shape["data"]:
        raise ValueError(
            f"config.data.batch_size: {batch['drr'].shape[0]} is not divisible by the "
            f"{mesh.shape['data']} devices of the data axis"
        )
    rep = sharding.replicated(mesh)
    batch_shardings = sharding.batch_shardings(mesh, batch)
    init = functools.partial(create_train_state, setup)
    abstract = jax.eval_shape(init, jax.random.key(0), batch)
    state_shardings = jax.tree.map(lambda _: rep, abstract)
    init_fn = jax.jit(init, out_shardings=state_shardings)
    step_fn = jax.jit(
        _on_mesh(mesh, functools.partial(train_step, setup)),
        in_shardings=(state_shardings, batch_shardings, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
    )
    return setup, mesh, init_fn, step_fn, abstract, batch


def train_and_evaluate(config, workdir) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its last checkpoint); returns the
    final validation metrics."""
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    sharding.maybe_initialize_distributed(config.get("distributed", None) or None)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    if config.data.source == "tfds":
        ensure_dataset(config)
    setup, mesh, init_fn, step_fn, abstract, example = build(config)
    batch_keys = tuple(example)  # the fields the step consumes (the data may carry more)
    ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
    root_key = jax.random.key(int(config.seed))

    # Resume order: this workdir's checkpoint, then config.init_from, then fresh.
    restored = ckpt.restore(abstract)
    data_state = None
    if restored is not None:
        state, data_state, start = restored
        print(f"resumed from {workdir / 'checkpoints'} step {start}", flush=True)
    else:
        state = init_fn(jax.random.fold_in(root_key, -1 % (2**31)), dummy_batch(config))
        if config.get("init_from"):
            other = checkpoint.Checkpointer(config.init_from).restore(abstract)
            if other is None:
                raise ValueError(f"config.init_from: no checkpoint in {config.init_from}")
            state = state.replace(params=other[0].params, ema_params=other[0].ema_params)
            print(f"initialised parameters from {config.init_from} step {other[2]}", flush=True)
        start = 0
    num_steps = int(config.train.num_steps)
    logger = _Logger(workdir, is_main)

    if config.data.source == "tfds":
        it = make_train_iterator(config, data_state)
        next_batch = lambda step: next(it)  # noqa: E731
        get_data_state = it.get_state
    elif config.data.source == "render":
        ramp = int(config.data.get("curriculum_steps", 0))
        # Curriculum (easy to hard) over the first `ramp` steps: deformation and noise grow
        # linearly, and phantoms come from a pool ordered by complexity, drawn from its
        # easiest part first; after the ramp the pool is replaced by full phantoms.
        by_complexity = bool(ramp) and bool(config.data.get("complexity_curriculum", True))
        src = {"full": not (by_complexity and start < ramp)}
        src["pool"], src["render"] = _render_source(config, mesh, not src["full"])

        def next_batch(step):
            strength = np.float32(min(1.0, (step + 1) / ramp) if ramp else 1.0)
            if not src["full"] and step >= ramp:
                src["pool"] = None  # free the curriculum pool first
                src["pool"], src["render"] = _render_source(config, mesh, False)
                src["full"] = True
            key = jax.random.fold_in(root_key, 2 * step + 1)
            return src["render"](key, src["pool"], strength)

        get_data_state = lambda: {}  # noqa: E731 - the stream is a function of the step
    else:
        raise ValueError(
            f"config.data.source: expected 'tfds' or 'render', got {config.data.source!r}"
        )

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    pending: list[dict] = []
    last_good = ckpt.latest_step()
    t_log, s_log = time.perf_counter(), start
    t_start = t_log
    final_val = {}
    try:
        for step in range(start, num_steps):
            batch = next_batch(step)
            if config.data.source == "tfds":  # rendered batches are sharded already
                batch = sharding.shard_batch({k: batch[k] for k in batch_keys}, mesh)
            key = jax.random.fold_in(root_key, 2 * step)
            if step == start and jax.process_count() > 1:
                # Compile first, then meet: compile times differ between hosts by more
                # than the collectives' set-up waits.
                step_fn = step_fn.lower(state, batch, key).compile()
                sharding.barrier(f"xct: train step compiled ({start})")
            state, m = step_fn(state, batch, key)
            pending.append(m)
            done = step + 1
            budget = float(config.train.get("max_seconds", 0.0))
            if budget and time.perf_counter() - t_start > budget and not stop["signal"]:
                stop["signal"] = f"time budget of {budget:.0f} s"
            if done % int(config.train.log_every) == 0 or done == num_steps or stop["signal"]:
                rows = jax.device_get(pending)
                pending = []
                if any(r["nonfinite"] > 0 for r in rows):
                    ckpt.wait()
                    raise FloatingPointError(
                        f"training stopped at step {done}: the loss or gradients became NaN/inf "
                        "(the update was skipped, parameters are unchanged); last good "
                        f"checkpoint: {last_good if last_good is not None else 'none'} in "
                        f"{workdir / 'checkpoints'}. Lower config.optim.learning_rate or check "
                        "the data."
                    )
                avg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                now = time.perf_counter()
                rate = (done - s_log) / max(now - t_log, 1e-9)
                t_log, s_log = now, done
                avg["steps_per_s"] = rate
                logger.write(done, avg)
                eta = (num_steps - done) / max(rate, 1e-9)
                if is_main:
                    print(
                        f"step {done:>6}/{num_steps}  loss {avg['loss']:.4f}  {rate:.2f} steps/s  "
                        f"ETA {eta / 60:.1f} min",
                        flush=True,
                    )
            if (
                done % int(config.train.checkpoint_every) == 0
                or done == num_steps
                or stop["signal"]
            ):
                ckpt.save(done, state, get_data_state(), force=True)
                last_good = done
            if config.data.source == "tfds" and (
                done % int(config.train.eval_every) == 0 or done == num_steps
            ):
                final_val = evaluate_split(config, setup, state.ema_params, mesh, "validation")
                logger.write(done, final_val, prefix="validation")
                if is_main:
                    print(
                        "  validation: " + "  ".join(f"{k} {v:.4f}" for k, v in final_val.items()),
                        flush=True,
                    )
                ckpt.save_best(done, state, {"val_psnr": final_val["psnr"]}, get_data_state())
            if stop["signal"]:
                print(f"stopped ({stop['signal']}): saved step {done}", flush=True)
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        logger.close()
    return final_val


def parse_stages(text: str) -> list[tuple[int, int, int]]:
    """``"64:2000,128:1000:2"`` -> ``[(64, 2000, 0), (128, 1000, 2)]``: resolution, steps and
    (optionally) global batch of each stage (0: the config's batch)."""
    stages = []
    for item in filter(None, (x.strip() for x in str(text).split(","))):
        parts = item.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            res, steps, batch = (int(p) for p in (*parts, "0")[:3])
        except ValueError:
            raise ValueError(
                f"config.train.stages: expected 'resolution:steps[:batch],...', got {item!r}"
            ) from None
        if res < 2 or steps < 0 or batch < 0:
            raise ValueError(f"config.train.stages: bad stage {item!r}")
        stages.append((res, steps, batch))
    return stages


def train_progressive(config, workdir):
    """Progressive multi-resolution training: one run per stage of ``config.train.stages``
    in ``workdir/stage<i>_<res>``, each initialised from the previous stage's last
    checkpoint (``init_from``; the models' parameters do not depend on the resolution).
    An interrupted schedule resumes: finished stages are skipped, the current one resumes
    from its own checkpoint. Returns ``(last stage's config, its workdir)``."""
    import re

    workdir = pathlib.Path(workdir).expanduser()
    previous = str(config.get("init_from", "") or "")
    c, stage_dir = config, workdir
    for i, (res, steps, batch) in enumerate(parse_stages(config.train.stages)):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.train.stages = ""
            c.init_from = previous
            c.data.resolution = res
            c.train.num_steps = steps
            if batch:
                c.data.batch_size = batch
            if c.data.source == "tfds":
                c.data.dataset = re.sub(r"res\d+", f"res{res}", c.data.dataset)
            patch = int(c.train.get("patch_size", 0))
            if patch > res:
                c.train.patch_size = 0  # a stage smaller than the patch trains on whole volumes
        stage_dir = workdir / f"stage{i}_{res}"
        print(f"stage {i}: {res}^3, {steps} steps -> {stage_dir}", flush=True)
        train_and_evaluate(c, stage_dir)
        previous = str(stage_dir)
    return c, stage_dir


def _render_pool(config, grid, complexity_curriculum: bool):
    """Phantoms for the render source; with ``complexity_curriculum``, phantom ``i`` of
    ``P`` has complexity ``(i + 1) / P`` (easy first), else all are full phantoms."""
    from xct import phantoms

    n = int(config.data.pool_size)
    return np.stack(
        [
            phantoms.chest_phantom(
                int(config.seed) * 100_003 + i,
                grid,
                complexity=(i + 1) / n if complexity_curriculum else 1.0,
            )[0]
            for i in range(n)
        ]
    )


def _render_source(config, mesh, complexity_curriculum: bool = False):
    """A pool of phantoms on the device and a jitted function rendering a batch from it.

    ``render(key, pool, strength)``: ``strength`` in [0, 1] scales deformation and noise;
    with ``complexity_curriculum`` (a pool ordered by complexity) it also draws phantoms
    only from the easiest ``ceil(strength * P)`` of the pool.
    """
    d = config.data
    g = data_geometry(config)
    grid = geometry.VolumeGrid.centered((g["resolution"],) * 3, g["fov_mm"] / g["resolution"])
    pool = jax.device_put(
        _render_pool(config, grid, complexity_curriculum), sharding.replicated(mesh)
    )
    b = int(d.batch_size)
    out_shardings = {
        "ct": sharding.batch_sharding(mesh, 4, volume=True),
        "drr": sharding.batch_sharding(mesh, 4),
        "angles_deg": sharding.batch_sharding(mesh, 2),
    }

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def render(key, pool, strength=1.0):
        k_pick, k_render = jax.random.split(key)
        n = pool.shape[0]
        if complexity_curriculum:  # the easiest ceil(strength * n), with replacement
            available = jnp.clip(jnp.ceil(strength * n), 1, n).astype(jnp.int32)
            idx = jax.random.randint(k_pick, (b,), 0, available)
        else:
            idx = jax.random.choice(k_pick, n, (b,), replace=n < b)
        return input_pipeline.render_batch(
            k_render,
            pool[idx],
            grid,
            num_views=int(d.num_views),
            det_shape=(g["resolution"],) * 2,
            pixel_mm=g["pixel_mm"],
            sod_mm=g["sod_mm"],
            sdd_mm=g["sdd_mm"],
            flip=bool(d.flip),
            elastic_mm=float(d.elastic_mm),
            photons=d.photons if d.photons else None,
            strength=strength,
        )

    return pool, render
