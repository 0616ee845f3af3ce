"""``atlas_net``: a small 3D CNN that corrects ``atlas_tv``, trained on real chests in
clinical mode (issue 26 item 4).

``atlas_tv`` (TV started from and pulled towards the fused atlas of other patients' CTs)
is the best hand-made method from few clinical X-rays. What it cannot do is learn how its
errors look: where the atlas is trusted too much, where TV's streaks remain, how the
data-consistent estimate and the prior disagree. ``atlas_net`` is a residual fusion
network (``models.refiner.Refiner``) that takes, on the 64^3 output grid,

* ``atlas_tv``'s volume (the base the correction is added to),
* the fused atlas prior,
* ``tv_support``'s volume (TV with the views' support and bounds, no prior: what the
  X-rays alone say),

and returns ``atlas_tv + residual`` in HU. It is trained on clinical cases of real chests
(``make_case``: the whole scan X-rayed with couch and Poisson noise, optionally deformed
by a smooth random field, with jittered angles), one model per held-out chest (folds: the
held-out chest is neither a training target nor a template of any training case), and a
final model on all of them. ``scripts/train_atlas_net.py`` builds the cases, trains,
scores the folds and writes the shipped model (``save`` / ``load``).

Values: inputs and output are ``mu / mu_water - 1`` (HU / 1000), arrays ``[z, y, x]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from xct import clinical, geometry

#: The inputs' order (channels of ``Refiner``).
INPUTS = ("atlas_tv", "atlas", "tv_support")
#: The shipped model (trained on the seven shared chests), beside the package in a checkout.
DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "atlas_net64"
#: The weights its inputs are made with, in training (``make_case``) and use
#: (``scoring.Solvers.atlas_net``): tv_support's TV weight (mm^2) and atlas_tv's (TV, prior)
#: weights, up to 3 views and beyond. atlas_tv's are the clinical table's benchmark weights
#: (``scoring.benchmark_weights``), so the network corrects the very atlas_tv the table
#: reports. A model and a case record the weights they were made with (``"input_weights"``
#: in their metadata, ``weights_of``): a model always runs at its own.
INPUT_WEIGHTS = {
    "tv_support": (
        {"tv_weight": 0.03, "prior_weight": 0.0},
        {"tv_weight": 0.1, "prior_weight": 0.0},
    ),
    "atlas_tv": (
        {"tv_weight": 0.03, "prior_weight": 3.0},
        {"tv_weight": 0.1, "prior_weight": 3.0},
    ),
}
#: What models and cases made before the weights were recorded in their metadata used
#: (atlas_tv at TV 0.03, prior 1, at every number of views).
LEGACY_INPUT_WEIGHTS = {
    "tv_support": INPUT_WEIGHTS["tv_support"],
    "atlas_tv": (
        {"tv_weight": 0.03, "prior_weight": 1.0},
        {"tv_weight": 0.03, "prior_weight": 1.0},
    ),
}


def weights_of(meta: dict) -> dict:
    """The input weights a model or a case (its metadata ``meta``) was made with:
    its ``"input_weights"``, or ``LEGACY_INPUT_WEIGHTS`` when it predates them."""
    w = meta.get("input_weights")
    if w is None:
        return LEGACY_INPUT_WEIGHTS
    try:
        return {k: tuple(dict(w[k][i]) for i in (0, 1)) for k in ("tv_support", "atlas_tv")}
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(
            f"atlas_net: input_weights {w!r}: expected tv_support and atlas_tv, each the "
            "weights up to 3 views and beyond"
        ) from None


def input_weights(views: int, weights: dict | None = None) -> tuple[dict, dict]:
    """``(tv_support's, atlas_tv's)`` weights of the inputs at ``views`` X-rays, from
    ``weights`` (``weights_of`` a model or case; default: ``INPUT_WEIGHTS``)."""
    w = INPUT_WEIGHTS if weights is None else weights
    i = 0 if views <= 3 else 1
    return dict(w["tv_support"][i]), dict(w["atlas_tv"][i])


#: Templates fused into the atlas (``recon.atlas.K``: None, all of them).
ATLAS_K = None


# ------------------------------------------------------------------------------------------
# Cases: one chest X-rayed as a clinic does, with what every fold needs


@functools.partial(jax.jit, static_argnums=2)
def _warp(volume, displacement, fill: float):
    from xct import input_pipeline

    return input_pipeline.warp(volume, displacement, fill)


def deform_scan(
    scan: clinical.ClinicalScan, key: jax.Array, max_mm: float, coarse: int = 4
) -> clinical.ClinicalScan:
    """``scan`` warped by a smooth random displacement (``input_pipeline``'s elastic
    field: ``coarse^3`` uniform noise upsampled, at most about ``max_mm``); the body mask
    moves with it. The grid (so the isocentre and the cube) is unchanged."""
    from xct import input_pipeline

    if max_mm <= 0:
        return scan
    spacing = float(min(scan.grid.spacing_mm))
    disp = input_pipeline.elastic_displacement(
        key, scan.hu.shape, max_mm=max_mm, spacing_mm=spacing, coarse=coarse
    )
    hu = np.asarray(_warp(jnp.asarray(scan.hu), disp, clinical.FILL_HU))
    body = np.asarray(_warp(jnp.asarray(scan.body, jnp.float32), disp, 0.0)) >= 0.5
    return dataclasses.replace(scan, hu=hu, body=body, source=scan.source + " (deformed)")


def phantom_scan(seed: int, spacing_mm: float = 2.0, version: int = 2) -> clinical.ClinicalScan:
    """A ``phantoms.chest_phantom`` (``version`` 2: arms, shoulders, contrast; with its
    couch) as a clinical scan of ``spacing_mm`` voxels: 352 x 400 x 512 mm (front-back,
    head-foot, left-right), through ``clinical.scan_from_array`` as a read CT is."""
    from xct import io, phantoms

    n = (round(352 / spacing_mm), round(400 / spacing_mm), round(512 / spacing_mm))
    pgrid = geometry.VolumeGrid.centered(n, spacing_mm)  # the projector frame
    hu, _ = phantoms.chest_phantom(seed, pgrid, couch=True, version=version)
    hu_lps = io.from_projector_frame(np.asarray(hu, np.float32))
    lps = geometry.VolumeGrid.centered(hu_lps.shape, spacing_mm)
    return clinical.scan_from_array(hu_lps, lps, f"chest_phantom(seed={seed}, version={version})")


def atlas_subset(
    screen_mismatch: np.ndarray, allowed: list[int], k: int | None = ATLAS_K
) -> list[int]:
    """The templates ``recon.atlas.atlas`` would fuse when only ``allowed`` (indices) are
    given: the ``k`` (None: all) with the smallest screening mismatch."""
    order = sorted(allowed, key=lambda i: (screen_mismatch[i], i))
    return order if k is None else order[:k]


def fuse_subset(registered, errors, subset: list[int], temperature: float | None = None):
    """The fused prior of the registered templates ``subset`` (``recon.atlas.fuse`` with
    local weights: ``errors`` are their ``atlas.local_mismatch`` maps)."""
    from xct.recon import atlas

    t = atlas.TEMPERATURE if temperature is None else temperature
    idx = np.asarray(subset)
    w = atlas.fusion_weights(jnp.asarray(errors)[idx], t)
    return jnp.sum(w * jnp.asarray(registered)[idx], axis=0)


@dataclasses.dataclass
class CaseSpec:
    """How one case is made."""

    chest: str  # the X-rayed chest's name
    views: int
    variant: int  # 0: the benchmark's X-rays (no deformation, nested angles); > 0 augmented
    deform_mm: float = 0.0
    angle_jitter_deg: float = 0.0
    seed: int = 0
    resolution: int = 64
    photons: float = clinical.DEFAULT_PHOTONS
    pixel_mm: float = clinical.DEFAULT_PIXEL_MM
    tv_iters: int = 200


def make_case(spec: CaseSpec, scan, templates: dict, solvers_cache: dict) -> dict:
    """One clinical case: X-rays of ``scan`` (deformed by ``spec``), every template of
    ``templates`` (``{name: mu [r]^3}``, never the X-rayed chest) screened and registered,
    ``tv_support``, the atlas and ``atlas_tv`` of all templates, and for each template
    ``n`` among the fused ones, the atlas and ``atlas_tv`` without ``n`` (what a fold that
    holds out ``n`` sees). Returns a dict of NumPy arrays and metadata (``save_case``)."""
    from xct.recon import atlas

    t0 = time.perf_counter()
    key = jax.random.key(spec.seed)
    deform_key, angle_key, noise_key = jax.random.split(key, 3)
    r = spec.resolution
    det_shape = clinical.covering_detector(scan, spec.pixel_mm)
    if spec.deform_mm > 0:
        scan = deform_scan(scan, deform_key, spec.deform_mm)
    angles = np.asarray(geometry.nested_view_angles(8)[: spec.views], np.float64)
    if spec.angle_jitter_deg > 0:
        jitter = jax.random.uniform(angle_key, (), minval=-1.0, maxval=1.0)
        angles = angles + float(jitter) * spec.angle_jitter_deg
    grid = clinical.cube_grid(scan, r)
    truth, body = clinical.truth_cube(scan, r)
    fine, _ = clinical.clinical_xrays(
        scan, angles, noise_key, pixel_mm=spec.pixel_mm, photons=spec.photons, det_shape=det_shape
    )
    drr, geom = clinical.xrays_for_grid(np.asarray(fine), spec.pixel_mm, angles, grid)
    drr = jnp.asarray(drr, jnp.float32)
    names = sorted(templates)
    mus = [jnp.asarray(templates[n], jnp.float32) for n in names]
    scr = atlas.screen(mus, drr, geom, grid)
    _, registered, _ = atlas.register_best(mus, scr, drr, geom, grid, k=len(mus))
    # register_best returns them in screening order; put them back in ``names`` order
    order = [int(i) for i in scr.order[: len(mus)]]
    reg = np.zeros((len(mus), *grid.shape), np.float32)
    reg[order] = np.asarray(registered)
    errors = np.asarray(atlas.local_mismatch(jnp.asarray(reg), drr, geom, grid))
    everyone = list(range(len(names)))
    chosen = atlas_subset(scr.mismatch, everyone)
    out = {
        "truth_hu": truth.astype(np.float32),
        "body": body,
        "drr": np.asarray(drr, np.float32),  # the X-rays brought to the grid
        "registered": reg,  # [T, r, r, r] every template registered, ``templates`` order
        "errors": errors.astype(np.float32),  # [T, r, r, r] their local mismatch
        # the X-rays' geometry (``case_geometry``)
        **{f"geom_{k}": np.asarray(getattr(geom, k), np.float64) for k in GEOMETRY_ARRAYS},
        "atlas": np.asarray(fuse_subset(reg, errors, chosen), np.float32),
    }
    for n in chosen:  # a fold holding out template n sees the atlas without it
        sub = atlas_subset(scr.mismatch, [i for i in everyone if i != n])
        out[f"atlas|{names[n]}"] = np.asarray(fuse_subset(reg, errors, sub), np.float32)
    out["meta"] = {
        **dataclasses.asdict(spec),
        "angles_deg": angles.tolist(),
        "templates": names,
        "screen_mismatch": np.asarray(scr.mismatch).tolist(),
        "fused": [names[i] for i in chosen],
        "mu_water": None,
        "spacing_mm": list(grid.spacing_mm),
        "origin_xyz_mm": list(grid.origin_xyz_mm),
    }
    _tv_inputs(out, solvers_cache, spec.tv_iters)
    out["meta"]["seconds"] = time.perf_counter() - t0
    return out


def _tv_inputs(case: dict, solvers_cache: dict, tv_iters: int) -> None:
    """(Re)compute a case's TV inputs from its X-rays and atlases, at ``INPUT_WEIGHTS``:
    ``tv``, ``tv_support``, ``atlas_tv`` and each fold's ``atlas_tv|name``; records the
    weights in its metadata."""
    from xct import scoring

    grid, geom = case_grid(case), case_geometry(case)
    drr = jnp.asarray(case["drr"], jnp.float32)
    sk = (grid, drr.shape, tv_iters)
    if sk not in solvers_cache:
        solvers_cache[sk] = scoring.Solvers(grid, sirt_iters=1, cgls_iters=1, tv_iters=tv_iters)
    solvers = solvers_cache[sk]
    support = solvers.support(drr, geom)
    tv_w, at_w = input_weights(int(drr.shape[0]))
    case["tv"] = np.asarray(solvers.run("tv", drr, geom, tv_w), np.float32)
    case["tv_support"] = np.asarray(solvers.run("tv_support", drr, geom, tv_w, support), np.float32)
    for key in [k for k in case if k == "atlas" or k.startswith("atlas|")]:
        prior = jnp.asarray(case[key], jnp.float32)
        case[key.replace("atlas", "atlas_tv", 1)] = np.asarray(
            solvers.run("atlas_tv", drr, geom, at_w, support, prior), np.float32
        )
    case["meta"]["mu_water"] = solvers.mu_water
    case["meta"]["input_weights"] = INPUT_WEIGHTS


def refresh_case(case: dict, solvers_cache: dict) -> bool:
    """Bring a saved case's TV inputs to ``INPUT_WEIGHTS`` when it was made at other
    weights (no registration: its registered templates, atlases, X-rays and geometry are
    kept). True if it was recomputed."""
    if weights_of(case["meta"]) == weights_of({"input_weights": INPUT_WEIGHTS}):
        return False
    _tv_inputs(case, solvers_cache, int(case["meta"].get("tv_iters", 200)))
    return True


GEOMETRY_ARRAYS = ("source_xyz_mm", "det_center_xyz_mm", "det_u_xyz_mm", "det_v_xyz_mm")


def case_geometry(case: dict) -> geometry.Geometry:
    """The cone-beam ``Geometry`` of a case's X-rays ``case["drr"]``."""
    arrays = {k: jnp.asarray(case[f"geom_{k}"], jnp.float32) for k in GEOMETRY_ARRAYS}
    return geometry.Geometry(**arrays, kind="cone", det_shape=tuple(case["drr"].shape[1:]))


def case_grid(case: dict) -> geometry.VolumeGrid:
    """The case's reconstruction grid (``clinical.cube_grid``)."""
    m = case["meta"]
    return geometry.VolumeGrid(
        tuple(case["truth_hu"].shape), tuple(m["spacing_mm"]), tuple(m["origin_xyz_mm"])
    )


def save_case(path, case: dict) -> None:
    """Write a case (``make_case``) as one ``.npz`` (metadata as JSON), atomically."""
    from xct import io

    path = pathlib.Path(path)
    arrays = {k: v for k, v in case.items() if k != "meta"}
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, meta=json.dumps(case["meta"]), **arrays)


def load_case(path) -> dict:
    """A case saved by ``save_case``."""
    with np.load(path) as z:
        out = {k: z[k] for k in z.files if k != "meta"}
        out["meta"] = json.loads(str(z["meta"]))
    return out


# ------------------------------------------------------------------------------------------
# Network inputs and outputs


def to_unit(mu, mu_water: float) -> np.ndarray:
    """Attenuation per mm -> ``mu / mu_water - 1`` (HU / 1000)."""
    return np.asarray(mu, np.float32) / np.float32(mu_water) - np.float32(1.0)


def case_inputs(case: dict, held_out: str | None = None) -> np.ndarray:
    """``[z, y, x, 3]`` inputs (``INPUTS``, HU / 1000) of ``case`` as the fold that holds
    out ``held_out`` sees it (its atlas without that chest), or with every template."""
    mw = case["meta"]["mu_water"]
    sfx = f"|{held_out}" if held_out and f"atlas|{held_out}" in case else ""
    chans = [case["atlas_tv" + sfx], case["atlas" + sfx], case["tv_support"]]
    return np.stack([to_unit(c, mw) for c in chans], axis=-1)


def case_target(case: dict) -> np.ndarray:
    """``[z, y, x]`` truth, HU / 1000."""
    return np.asarray(case["truth_hu"], np.float32) / np.float32(1000.0)


def apply(model, params, inputs) -> jax.Array:
    """The refined volume, HU / 1000: ``inputs[..., 0] + residual``; ``inputs``
    ``[B, z, y, x, 3]`` (or one ``[z, y, x, 3]``)."""
    x = jnp.asarray(inputs, jnp.float32)
    one = x.ndim == 4
    if one:
        x = x[None]
    y = x[..., 0] + model.apply(params, x)
    return y[0] if one else y


def refine_hu(model, params, atlas_tv_mu, atlas_mu, tv_support_mu, mu_water: float) -> np.ndarray:
    """``atlas_net``'s volume in HU from the three input volumes (attenuation per mm on
    the same ``[z, y, x]`` grid)."""
    x = np.stack([to_unit(v, mu_water) for v in (atlas_tv_mu, atlas_mu, tv_support_mu)], -1)
    return predict(model, params, x) * 1000.0


#: ``apply`` jitted; the module (a frozen, hashable Flax dataclass) is static, so one
#: compilation serves every model of the same width and input shape.
_apply_jit = jax.jit(apply, static_argnums=0)


def predict(model, params, inputs) -> np.ndarray:
    """``apply`` (jitted) on host arrays: the refined volume, HU / 1000."""
    return np.asarray(_apply_jit(model, params, jnp.asarray(inputs, jnp.float32)))


# ------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How a fold's network is trained."""

    steps: int = 600
    batch: int = 4
    patch: int = 32  # cubic patches cut from the 64^3 cases
    learning_rate: float = 1e-3
    weight_decay: float = 0.0  # AdamW's decoupled decay
    body_weight: float = 3.0  # the loss weighs voxels inside the body 1 + body_weight
    width: int = 12
    depth: int = 3  # the Refiner's scales (3 or 4)
    seed: int = 0


def loss_fn(model, params, x, y, body, body_weight: float) -> jax.Array:
    """Weighted mean squared error (HU / 1000), ``1 + body_weight`` inside the body."""
    pred = apply(model, params, x)
    w = 1.0 + body_weight * body
    return jnp.sum(w * jnp.square(pred - y)) / jnp.sum(w)


def _patches(rng: np.random.Generator, xs, ys, bs, batch: int, patch: int):
    xb, yb, bb = [], [], []
    for _ in range(batch):
        i = int(rng.integers(len(xs)))
        n = xs[i].shape[0]
        o = rng.integers(0, n - patch + 1, size=3)
        sl = tuple(slice(int(a), int(a) + patch) for a in o)
        x, y, b = xs[i][sl], ys[i][sl], bs[i][sl]
        if rng.random() < 0.5:  # left-right flip (x axis)
            x, y, b = x[:, :, ::-1], y[:, :, ::-1], b[:, :, ::-1]
        xb.append(x)
        yb.append(y)
        bb.append(b)
    return np.stack(xb), np.stack(yb), np.stack(bb).astype(np.float32)


def train(xs, ys, bodies, settings: TrainSettings = TrainSettings(), log=None):
    """Train a ``Refiner`` on inputs ``xs`` (``[z, y, x, 3]`` each), targets ``ys`` and
    body masks: Adam with a cosine schedule on random patches (left-right flips).
    Returns ``(model, params, losses)``."""
    import optax

    from xct.models.refiner import Refiner

    s = settings
    model = Refiner(width=s.width, depth=s.depth)
    rng = np.random.default_rng(s.seed)
    params = model.init(jax.random.key(s.seed), jnp.zeros((1, s.patch, s.patch, s.patch, 3)))
    schedule = optax.cosine_decay_schedule(s.learning_rate, s.steps, alpha=0.05)
    tx = optax.adamw(schedule, weight_decay=s.weight_decay)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y, b):
        loss, g = jax.value_and_grad(lambda p: loss_fn(model, p, x, y, b, s.body_weight))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(s.steps):
        x, y, b = _patches(rng, xs, ys, bodies, s.batch, s.patch)
        params, opt, loss = step(params, opt, x, y, b)
        losses.append(float(loss))
        if log is not None and (i % 50 == 0 or i == s.steps - 1):
            log(i, float(np.mean(losses[-50:])))
    return model, params, losses


# ------------------------------------------------------------------------------------------
# The shipped model


_CONFIG_PY = '''"""atlas_net: a residual 3D U-Net (width {width}) that corrects atlas_tv from
(atlas_tv, the fused atlas, tv_support) on the 64^3 output grid, trained on clinical cases
of {trained}.

Made with ({minutes:.1f} minutes of training on {machine}; the cases first, with
``python -m scripts.train_atlas_net cases``):

    {command}

Use it with template CTs (``--method auto`` runs it at the views where it beat atlas_tv in
its folds, {auto_views}):

    python -m xct.reconstruct --xrays ... --template DIR --atlas_net {directory}

Written by ``xct.atlas_net.save``; the weights are ``atlas_net.msgpack``, the metadata
``atlas_net.json``; BENCHMARKS.md has its fold scores.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = "Refiner"
    c.width = {width}
    c.depth = {depth}
    c.inputs = {inputs!r}
    # the (TV, prior) weights its inputs tv_support and atlas_tv are made with, up to 3 views
    # and beyond (xct.atlas_net.input_weights)
    c.input_weights = {input_weights!r}
    c.train = ml_collections.ConfigDict({train!r})
    c.trained_on = {trained_on!r}
    return c
'''


def save(
    directory,
    params,
    *,
    width: int,
    depth: int = 3,
    info: dict | None = None,
    settings: TrainSettings | None = None,
) -> None:
    """Write ``atlas_net.msgpack`` (parameters) and ``atlas_net.json`` (settings, ``info``;
    the inputs' weights are ``INPUT_WEIGHTS`` unless ``info`` says ``"input_weights"``);
    with ``settings`` (a model to ship) also ``config.py``, the executable record of how it
    was trained (``info``'s ``command``, ``trained_on``, ``auto_views``)."""
    import flax.serialization

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "atlas_net.msgpack").write_bytes(flax.serialization.to_bytes(params))
    meta = {
        "model": "Refiner",
        "width": int(width),
        "depth": int(depth),
        "inputs": list(INPUTS),
        "input_weights": INPUT_WEIGHTS,
        **(info or {}),
    }
    if settings is not None:
        meta["train"] = dataclasses.asdict(settings)
    (d / "atlas_net.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if settings is not None:
        trained_on = list(meta.get("trained_on", []))
        text = _CONFIG_PY.format(
            width=int(width),
            depth=int(depth),
            trained=f"{len(trained_on)} real chests" if trained_on else "real chests",
            minutes=float(meta.get("train_seconds", 0.0)) / 60.0,
            machine=meta.get("machine", "a CPU"),
            command=meta.get("command", "python -m scripts.train_atlas_net train ..."),
            auto_views=f"views {meta.get('auto_views')}" if meta.get("auto_views") else "none",
            directory=d.as_posix(),
            inputs=tuple(INPUTS),
            input_weights=weights_of(meta),
            train=dataclasses.asdict(settings),
            trained_on=tuple(trained_on),
        )
        (d / "config.py").write_text(text, encoding="utf-8")


def load(directory):
    """``(model, params, meta)`` saved by ``save`` in ``directory``.

    Raises:
      ValueError: the folder lacks ``atlas_net.json`` / ``atlas_net.msgpack`` (named), or
        they do not fit together.
    """
    import flax.serialization

    from xct.models.refiner import Refiner

    d = pathlib.Path(directory)
    meta_file, params_file = d / "atlas_net.json", d / "atlas_net.msgpack"
    for f in (meta_file, params_file):
        if not f.is_file():
            raise ValueError(
                f"atlas_net: {f} not found (train one with python -m scripts.train_atlas_net)"
            )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("inputs") != list(INPUTS):
        raise ValueError(f"{meta_file}: inputs {meta.get('inputs')}, expected {list(INPUTS)}")
    # models saved before ``depth`` was recorded have three scales
    model = Refiner(width=int(meta["width"]), depth=int(meta.get("depth", 3)))
    template = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, len(INPUTS))))
    try:
        params = flax.serialization.from_bytes(template, params_file.read_bytes())
        shapes = jax.tree_util.tree_map(jnp.shape, params)
        if shapes != jax.tree_util.tree_map(jnp.shape, template):
            raise ValueError("other shapes")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{params_file}: not the parameters of a width-{meta['width']}, "
            f"depth-{meta.get('depth', 3)} Refiner ({e})"
        ) from None
    return model, params, meta


def shipped_meta(directory=None) -> dict | None:
    """The metadata of the model in ``directory`` (``load`` checks it fully), or, with no
    directory, of the shipped model ``DEFAULT_DIR`` when it is there (else None).

    Raises:
      ValueError: ``directory`` was given and holds no model.
    """
    d = pathlib.Path(directory) if directory else DEFAULT_DIR
    f = d / "atlas_net.json"
    if not f.is_file():
        if directory:
            raise ValueError(
                f"--atlas_net: {f} not found (train one with python -m scripts.train_atlas_net)"
            )
        return None
    return {**json.loads(f.read_text(encoding="utf-8")), "path": str(d)}
