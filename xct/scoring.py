"""What the quality table measures: the methods, the cubes, the scores, and the table.

``scripts/quality_table.py`` turns its flags into a ``Settings`` and calls ``run_table``;
``xct.reconstruct`` runs the same methods (``METHODS``, ``Solvers``) on a user's X-rays.

What is measured, per volume and per number of views V (``Settings.views``):

* Volumes: (a) the ``synthetic_chest`` test split's first ``phantoms`` phantoms (seeds
  2,000,000 + i, made as ``data_pipelines/synthetic_chest.py`` makes them; a 400 mm
  cube), and (b) every CT under ``ct_dir`` that ``io.find_ct_sources`` lists and the
  reader accepts (the others are listed with the reason). A real CT is read by
  ``io.load_cube`` (read, checked, put in LPS, clipped), its couch and clutter removed
  (``io.body_mask``: everything outside the body becomes air, as datasets do) and cut into
  a cube centred on the body: with ``real_fov="body"`` (default) the cube's side is the
  body's larger axial extent (``io.preprocess_body_cube``: the body spans the cube from
  side to side, so the scores are not inflated by air padding; along the long axis the
  cube holds as much of the scan as fits, with air beyond its ends), with a number of mm a
  fixed side as ``ct_folder`` makes datasets. Each volume's side and body fraction (share
  of the cube's voxels inside the body) are reported. Names matching ``chests`` (default
  ``*chest*``) are "real chests", with their own tables; the other real CTs (crops of a
  heart, abdomens, ...) are a separate, labelled table. The ground truth is the cube as the
  datasets store it (HU rounded to int16), in the projector frame.
* X-rays, ``realism="ideal"`` (labelled *idealised* in the tables and the JSON):
  ``physics.render_drrs`` (monochromatic) of that very cube on the datasets' cone beam (sod
  1000 mm, sdd 1500 mm, an ``r^2`` detector sized to the cube's inscribed cylinder). Angles:
  the first V of ``geometry.nested_view_angles(max(views), arc_deg)`` (every prefix of 2^k
  views is evenly spaced); ``arc_deg`` defaults to the datasets' 180 degrees (2 views: PA
  and lateral). ``photons=N`` adds Poisson noise (N unattenuated photons per pixel, key
  ``fold_in(key(seed), volume index)``); the default is noise-free.
* X-rays, ``realism="clinical"`` (the default; ``xct.clinical``; real CTs only, phantoms
  are refused):
  the whole scan at its own resolution, couch and all (``clinical.load_scan``), X-rayed on
  the same orbit onto a detector of ``detector_pixel_mm`` pixels that covers the body
  (``clinical.clinical_xrays``), Poisson noise of ``photons`` (default
  ``clinical.DEFAULT_PHOTONS``) with the same keys, ``spectrum`` mono or poly; brought to
  the reconstruction grid by ``detector_sampling`` (``clinical.xrays_for_grid``: binned to
  the voxel's footprint, or resized to ``r^2`` as ``load_xray`` does). The truth is the
  scan averaged over each output voxel, couch kept (``clinical.truth_cube``), the body mask
  from the scan's own resolution; the cube is the body cube (``real_fov="body"``) or a
  side in mm. Network rows are left out (they take the datasets' ``r^2`` detector).
  ``grid_factor`` f > 1 (classical and prior methods): each method runs on the ``(f r)^3``
  grid of the same cube (``finer_grid``; the X-rays brought to that grid), its result is
  clipped at ``mu >= 0`` and averaged over each ``f^3`` block (``clinical.average_down``)
  to the ``r^3`` cube, which is scored as before.
* Methods (``METHODS``; ``xct.recon``, in attenuation per mm; every output is clipped at
  ``mu >= 0``, i.e. HU >= -1000, then ``physics.mu_to_hu``):

  - ``fdk``: ``recon.fdk``, Hann-windowed ramp, half-scan view weights on arcs up to 180
    degrees (each view counting half the angle to its neighbours), none on longer orbits.
  - ``sirt``: SIRT, relaxation 1, nonnegative. ``cgls``: CGLS from zero, clipped at the end.
  - ``tv``: TV-regularised least squares by preconditioned Chambolle-Pock, nonnegative.
  - ``sirt_support``, ``cgls_support``, ``tv_support``: the same with the priors read off
    the views themselves (``recon.priors``, no training data): the support (the views'
    visual hull: a voxel whose ray in some view meets only air, ``air_tol``, is air) and
    the value bounds ``0 <= mu <= mu(3071 HU)``.
  - ``template``: a real template CT (``template`` files, made into a cube as the real CTs
    are and placed on the scored volume's grid) registered to the views through the
    projector (``recon.template``: pose and scale, then smooth displacement fields and a
    smooth intensity gain, Adam, coarse to fine); with several templates the one with the
    smallest DRR mismatch. Leave one out: a template is never the CT being scored (same
    file). A template whose body is far from the cube's size (another region or a crop) or
    whose registration leaves a relative DRR mismatch above 0.3 is not used; the rows are
    left out with the reason. Its ``seconds`` include the registration.
  - ``template_tv``: TV with the priors, started from the registered template and pulled
    towards it (``prior_weight / 2 ||x - template||^2``).
  - ``atlas`` / ``atlas_tv``: every template screened cheaply (``recon.atlas.screen``), then
    registered fully (``recon.atlas.K``: all) and fused, weighted per voxel by how well each
    explains the rays through it (``recon.atlas``); ``atlas_tv`` is ``template_tv`` with the
    fused atlas for the template. When an atlas method is asked, ``template`` /
    ``template_tv`` use the atlas's best registered template: one registration per volume
    and number of views.
  - ``atlas_net``: ``xct.atlas_net``'s learned correction of ``atlas_tv`` (``--atlas_net``
    models; each volume scored by one whose ``trained_on`` leaves it out, else no row).

  Weights: ``tv_weight`` (mm^2) and ``prior_weight`` (mm) take several values; each volume
  is then scored with the candidate whose mean PSNR is best on the *other* volumes of its
  kind (``select``, leave one out: a chest's weight is chosen on the other chests, never on
  itself); every candidate's row is in ``sweep_{r}.csv``. Iterations: ``sirt_iters`` etc.;
  TV gains about 0.7 dB from 50 to 200 iterations at 64^3 and 8 views, so the real-chest
  table runs it to 200.
* Network rows (``NETWORK``; only with ``checkpoint_workdir`` and ``config``, only when the
  config's resolution and orbit match the table's): ``network`` (the checkpoint's EMA
  parameters through ``Experiment.predict_hu`` of ``Experiment.with_acquisition(cube)``:
  every model is geometry-aware, so one checkpoint scores the body-filled cubes as well as
  the 400 mm ones), ``network+refine`` (``recon.refine.refine`` from the prediction,
  ``refine_iters`` Adam steps), ``network+fdk`` (one FDK correction, ``x_net + FDK(drr - A
  x_net)``), ``network+sirt`` (SIRT started from the prediction), and ``network+tv`` (as
  ``template_tv`` with the prediction for the template; weights ``network_tv_weight`` x
  ``network_prior_weight``, chosen leave one out like the others), at ``network_views``
  (default: the number of views the workdir's run trained with). A network is never scored
  on a CT it trained on (``trained_on``: from ``--config`` and the workdir's config.json).
* Scores (``evaluator.volume_scores``, the evaluator's own scorer) in both definitions
  (``xct.metrics.DEFINITIONS``), on the whole volume and inside the body: primary (3D PSNR /
  SSIM on HU clipped to [-1000, 1024]; inside the body: ``psnr_body``, ``ssim_body``, ...
  restricted to the ground truth's body mask, SSIM windows seeing the whole volume) and
  x2ct (X2CT-GAN's slice-averaged PSNR / SSIM; inside the body: ``x2ct_*_body`` on the
  body's bounding box, as it takes no mask). ``drr_mismatch``: the output's relative DRR
  residual ``||A x - b|| / ||b||`` against the (noisy) views.

Outputs (``write_outputs``): ``quality_{r}.md`` (the tables), ``per_volume_{r}.csv`` (every
volume's numbers: ``method, views, kind, volume, psnr, ssim, ...``, ``seconds`` the
reconstruction's wall time, the first volume's including compilation, ``params`` the
weights used), ``sweep_{r}.csv`` (every candidate weight), ``results_{r}.json`` (the
set-up, the machine, the command, skipped inputs, templates used and the means) and
``psnr_vs_views_{r}.png``.

Cost: one forward and one back-projection per iteration of SIRT, CGLS and TV: on the
2-core development CPU about 60 ms at 64^3 and 8 views; a registration about 25 s.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import fnmatch
import functools
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

DEFAULT_FOV_MM = 400.0  # the datasets' field of view (synthetic_chest, ct_folder)
TEST_SEED_OFFSET = 2_000_000  # synthetic_chest's test split: seeds 2,000,000 + i
PHANTOM_NODULES, PHANTOM_COUCH = True, False  # SyntheticChestConfig's defaults
REALISM = {"ideal": "idealised", "clinical": "clinical"}  # -> its label in tables and JSON
DETECTOR_SAMPLINGS = ("footprint", "resize")  # xct.clinical.DETECTOR_SAMPLINGS
SPECTRA = ("mono", "poly")


@dataclasses.dataclass(frozen=True)
class Method:
    """One reconstruction method of the registry."""

    name: str
    label: str  # the table's row heading
    family: str  # "classical", "prior" (the views' own priors), "template" or "network"
    weights: tuple[str, ...] = ()  # the weights it is run with (swept, chosen leave one out)


REGISTRY = {
    m.name: m
    for m in (
        Method("fdk", "FDK (Hann)", "classical"),
        Method("sirt", "SIRT", "classical"),
        Method("cgls", "CGLS", "classical"),
        Method("tv", "TV (Chambolle-Pock)", "classical", ("tv_weight",)),
        Method("sirt_support", "SIRT + X-ray priors", "prior"),
        Method("cgls_support", "CGLS + X-ray priors", "prior"),
        Method("tv_support", "TV + X-ray priors (tv_support)", "prior", ("tv_weight",)),
        Method("template", "template (registered real CT)", "template"),
        Method(
            "template_tv",
            "TV from template (template_tv)",
            "template",
            ("tv_weight", "prior_weight"),
        ),
        Method("atlas", "atlas (templates screened, best registered, fused)", "template"),
        Method("atlas_tv", "TV from atlas (atlas_tv)", "template", ("tv_weight", "prior_weight")),
        Method("atlas_net", "atlas_net (learned correction of atlas_tv)", "template"),
        Method("network", "network", "network"),
        Method("network+refine", "network + refinement", "network"),
        Method("network+fdk", "network + FDK correction", "network"),
        Method("network+sirt", "SIRT from network", "network"),
        Method(
            "network+tv", "TV from network (network+tv)", "network", ("tv_weight", "prior_weight")
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What ``--method auto`` runs for a number of views: the method the clinical-mode
    benchmark measured best (and its leave-one-out weights), with templates or without."""

    max_views: int  # this choice serves up to this many views
    # (method, tv_weight mm^2, prior_weight mm, grid_factor)
    with_templates: tuple[str, float, float, int]
    without: tuple[str, float, float, int]
    source: str  # where it was measured


#: ``--method auto``, from the clinical-mode tables (seven real chests, leave one out, X-rays
#: of the whole scan with couch and 1e5 photons; BENCHMARKS.md), measured at 2, 4 and 8 views
#: (2026-12-06). Inside the body: atlas_tv (every template fused) beat TV by +4.6 / +3.1 dB at
#: 2 / 4 views (docs/quality_clinical_atlas_all) and every other 64^3 method but atlas_net
#: (which ``auto_method`` runs instead where a trained model beat it in its folds);
#: tv_support on a 128^3 grid averaged to 64^3 (grid_factor 2) beat atlas_tv at 8 views
#: (25.80 vs 24.72, docs/quality_clinical) and tv_support at 64^3 at 4 (+0.5); weights are
#: those chosen leave one out on most chests.
AUTO = (
    Choice(
        3,
        ("atlas_tv", 0.03, 3.0, 1),
        ("tv_support", 0.03, 0.0, 1),
        "docs/quality_clinical_atlas_all",
    ),
    Choice(
        6,
        ("atlas_tv", 0.1, 3.0, 1),
        ("tv_support", 0.03, 0.0, 2),
        "docs/quality_clinical_atlas_all, docs/quality_clinical_grid2",
    ),
    Choice(
        10**9,
        ("tv_support", 0.03, 0.0, 2),
        ("tv_support", 0.03, 0.0, 2),
        "docs/quality_clinical_grid2",
    ),
)


def benchmark_weights(
    method: str, num_views: int, grid_factor: int = 1, net_meta: dict | None = None
) -> dict | None:
    """The leave-one-out weights of the clinical-mode tables for ``method`` at
    ``num_views`` on a ``grid_factor`` times finer grid: TV's for ``tv`` / ``tv_support``,
    atlas_tv's for the TV-from-a-prior methods (for ``atlas_net``, its inputs' atlas_tv:
    those its model, metadata ``net_meta``, was trained with); None for a method without
    weights."""
    if method in ("tv", "tv_support"):
        tv = 0.03 if grid_factor > 1 or num_views <= 3 else 0.1
        return {"tv_weight": tv, "prior_weight": 0.0}
    if method == "atlas_net":  # its inputs' atlas_tv (what it trained with)
        from xct import atlas_net

        w = None if net_meta is None else atlas_net.weights_of(net_meta)
        return atlas_net.input_weights(num_views, w)[1]
    if method in ("template_tv", "atlas_tv"):
        # docs/quality_clinical_atlas_all (every template fused): atlas_tv TV 0.03 at 2 views
        # and 0.1 at 4, prior 3 (7 of 7 chests each); template_tv 0.1 / 3 at both (6 and 5 of
        # 7); 8 views: docs/quality_clinical (0.1 / 1, prior candidates 0.3 and 1 then)
        if num_views <= 3:
            tv = 0.03 if method == "atlas_tv" else 0.1
            return {"tv_weight": tv, "prior_weight": 3.0}
        if num_views <= 6:
            return {"tv_weight": 0.1, "prior_weight": 3.0}
        return {"tv_weight": 0.1, "prior_weight": 1.0}
    return None


def learned_views(meta: dict | None) -> tuple[int, int] | None:
    """The range of views at which a trained ``atlas_net`` (its saved metadata, ``meta``)
    beat ``atlas_tv`` in its fold benchmark (``"auto_views"``, written by
    ``scripts/train_atlas_net.py``), or None."""
    views = (meta or {}).get("auto_views") or []
    return (min(views), max(views)) if views else None


def auto_method(
    num_views: int, templates: bool, learned: dict | None = None
) -> tuple[str, dict, str]:
    """``(method, {"tv_weight", "prior_weight", "grid_factor"}, why)`` that ``--method
    auto`` runs for ``num_views`` X-rays, with or without template CTs; ``learned``: the
    metadata of an ``atlas_net`` model at hand (``atlas_net.load``), run with templates
    where its fold benchmark found it better than atlas_tv (``learned_views``)."""
    if num_views < 1:
        raise ValueError(f"auto method: expected at least one view, got {num_views}")
    span = learned_views(learned)
    if templates and span and span[0] <= num_views <= span[1]:
        w = benchmark_weights("atlas_net", num_views, net_meta=learned)
        at = f"{span[0]} views" if span[0] == span[1] else f"{span[0]} to {span[1]} views"
        why = (
            f"atlas_net beat atlas_tv at {at} in its fold benchmark "
            f"({learned.get('benchmark', 'scripts/train_atlas_net.py')}), with template CTs"
        )
        return "atlas_net", {**w, "grid_factor": 1}, why
    choice = next(c for c in AUTO if num_views <= c.max_views)
    method, tv_weight, prior_weight, grid = choice.with_templates if templates else choice.without
    why = f"best in the clinical-mode benchmark ({choice.source}) at {num_views} view(s) " + (
        "with template CTs" if templates else "without template CTs"
    )
    if templates and method not in TEMPLATE_METHODS:
        why += " (the templates do not help there: not used)"
    if grid > 1:
        why += f", on a {grid}x finer grid averaged down"
    weights = {"tv_weight": tv_weight, "prior_weight": prior_weight, "grid_factor": grid}
    return method, weights, why


TEMPLATE_METHODS = ("template", "template_tv", "atlas", "atlas_tv", "atlas_net")
#: The registered prior each template method starts from.
PRIOR_OF = {
    "template": "template",
    "template_tv": "template",
    "atlas": "atlas",
    "atlas_tv": "atlas",
    "atlas_net": "atlas",
}


def _family(name: str) -> tuple[str, ...]:
    return tuple(m.name for m in REGISTRY.values() if m.family == name)


CLASSICAL = _family("classical")
PRIOR = _family("prior")
TEMPLATE = _family("template")
METHODS = (*CLASSICAL, *PRIOR, *TEMPLATE)  # from X-rays alone (and templates): no training
NETWORK = _family("network")
SWEPT = tuple(m.name for m in REGISTRY.values() if m.weights)
METHOD_LABELS = {m.name: m.label for m in REGISTRY.values()}
# Per-volume columns of the CSV: (CSV name, definition, key of evaluator.volume_scores).
SCORE_COLUMNS = (
    ("psnr", "primary", "psnr"),
    ("ssim", "primary", "ssim"),
    ("mae_hu", "primary", "mae_hu"),
    ("rmse_hu", "primary", "rmse_hu"),
    ("x2ct_psnr", "x2ct", "x2ct_psnr"),
    ("x2ct_ssim", "x2ct", "x2ct_ssim"),
    ("x2ct_psnr_3d", "x2ct", "x2ct_psnr_3d"),
    ("x2ct_mae_hu", "x2ct", "x2ct_mae_hu"),
    ("x2ct_cosine", "x2ct", "x2ct_cosine_similarity"),
    ("psnr_body", "primary", "psnr_body"),
    ("ssim_body", "primary", "ssim_body"),
    ("mae_hu_body", "primary", "mae_hu_body"),
    ("rmse_hu_body", "primary", "rmse_hu_body"),
    ("x2ct_psnr_body", "x2ct_body", "x2ct_psnr_body"),
    ("x2ct_ssim_body", "x2ct_body", "x2ct_ssim_body"),
)
X2CT_CELLS = ("x2ct_psnr", "x2ct_ssim")
# (title, (PSNR column, SSIM column)) of the report's tables.
TABLES = (
    ("whole volume — primary", ("psnr", "ssim")),
    ("whole volume — x2ct", X2CT_CELLS),
    ("inside the body — primary", ("psnr_body", "ssim_body")),
    ("inside the body — x2ct", ("x2ct_psnr_body", "x2ct_ssim_body")),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a quality table is run with (``scripts/quality_table.py``'s flags)."""

    resolution: int = 64  # voxels per side (and detector pixels)
    phantoms: int = 0  # synthetic test phantoms (0: none; realism="ideal" only)
    views: tuple[int, ...] = (2, 4, 8, 16, 64)
    methods: tuple[str, ...] = CLASSICAL
    sirt_iters: int = 50
    cgls_iters: int = 50
    tv_iters: int = 50
    tv_weight: tuple[float, ...] = (0.1,)  # mm^2; several: chosen leave one out
    prior_weight: tuple[float, ...] = (1.0,)  # template_tv's pull, mm
    template: tuple[str, ...] = ()  # template CT files (never the CT being scored)
    real_fov: str | float = "body"  # real CTs' cube: "body" or a side in mm
    air_tol: float | None = None  # priors: air line integral (None: recon.priors' default)
    include: str = "*"  # glob: only the ct_dir names matching it
    chests: str = "*chest*"  # glob of the ct_dir names that are chests
    arc_deg: float | None = None  # None: the datasets' 180 degrees
    photons: float | None = None  # Poisson noise (unattenuated photons per pixel); None: none
    seed: int = 0  # noise key
    ct_dir: str | None = None  # real CTs; None: synthetic phantoms only
    checkpoint_workdir: str | None = None  # a trained network's workdir
    config: str | None = None  # its config, FILE.py[:arg] or NAME[:arg]
    checkpoint: str = "best"  # "best" or "last"
    network_views: tuple[int, ...] | None = None  # default: the views it trained with
    network_tv_weight: tuple[float, ...] | None = None  # default: tv_weight
    network_prior_weight: tuple[float, ...] | None = None  # default: prior_weight
    refine_iters: int = 100
    realism: str = "clinical"  # how the X-rays are made (REALISM); "ideal" is labelled idealised
    detector_pixel_mm: float = 2.0  # clinical: the X-rays' pixel at the detector
    detector_sampling: str = "footprint"  # clinical: fine X-rays to the grid (DETECTOR_SAMPLINGS)
    spectrum: str = "mono"  # clinical: "mono" or "poly" (physics.render_drrs' 120 kVp model)
    # clinical: water's mu per mm the reconstructions assume (HU = 1000 (mu / mu_water - 1),
    # templates' HU -> mu); None: physics.MU_WATER_PER_MM (70 keV), what mono X-rays are made at
    mu_water_per_mm: float | None = None
    # clinical: the methods run on a grid grid_factor times finer than the cube (same field of
    # view; X-rays brought to that grid), the result box-averaged to the cube before scoring
    grid_factor: int = 1
    # atlas_net: folders of trained models (xct.atlas_net.save); each volume is scored by one
    # that did not train on it (its "trained_on"), or its row is left out
    atlas_net: tuple[str, ...] = ()

    def __post_init__(self):
        if self.realism not in REALISM:
            raise ValueError(f"realism: expected one of {sorted(REALISM)}, got {self.realism!r}")
        if self.realism == "clinical" and self.phantoms:
            raise ValueError(
                f"phantoms: {self.phantoms} asked, but clinical realism X-rays whole real scans "
                "(couch and all) and phantoms have none: --realism ideal for phantoms"
            )
        if self.detector_sampling not in DETECTOR_SAMPLINGS:
            raise ValueError(
                f"detector_sampling: expected one of {DETECTOR_SAMPLINGS}, got "
                f"{self.detector_sampling!r}"
            )
        if self.spectrum not in SPECTRA:
            raise ValueError(f"spectrum: expected one of {SPECTRA}, got {self.spectrum!r}")
        if self.mu_water_per_mm is not None and not (
            self.realism == "clinical" and self.mu_water_per_mm > 0
        ):
            raise ValueError(
                f"mu_water_per_mm: a positive value, in clinical realism only (the ideal X-rays "
                f"are made at physics.MU_WATER_PER_MM), got {self.mu_water_per_mm!r}"
            )
        if not self.detector_pixel_mm > 0:
            raise ValueError(f"detector_pixel_mm: a positive size, got {self.detector_pixel_mm}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}, expected some of {METHODS}")
        check_grid_factor(self.grid_factor, self.methods)
        if self.grid_factor > 1 and self.realism != "clinical":
            raise ValueError(
                f"grid_factor: {self.grid_factor} asked, but the idealised X-rays are DRRs of "
                "the scored cube itself: a finer grid needs --realism clinical"
            )


# ---------------------------------------------------------------------------------------
# Volumes: exactly the datasets' records


@dataclasses.dataclass
class Volume:
    id: str
    kind: str  # "synthetic", "chest" (a real chest, Settings.chests) or "real" (another CT)
    hu: np.ndarray  # [r, r, r] HU, projector frame, as the dataset stores it (int16 values)
    fov_mm: float = DEFAULT_FOV_MM  # side of the cube
    body: np.ndarray | None = None  # [r, r, r] bool body mask (io.body_mask of hu)
    source: str | None = None  # the file it was read from (leave-one-out of templates)
    scan: object | None = None  # clinical mode: the whole scan (xct.clinical.ClinicalScan)

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


def synthetic_volumes(count: int, resolution: int, fov_mm: float = DEFAULT_FOV_MM):
    """The ``synthetic_chest`` test split's first ``count`` phantoms (seeds 2,000,000 + i),
    made as ``synthetic_chest.make_phantom_example`` makes them (without its DRRs)."""
    from xct import geometry, phantoms

    grid = geometry.Acquisition(resolution=resolution, fov_mm=fov_mm).grid()
    for i in range(count):
        seed = TEST_SEED_OFFSET + i
        hu, _ = phantoms.chest_phantom(seed, grid, nodules=PHANTOM_NODULES, couch=PHANTOM_COUCH)
        yield _with_body(Volume(f"chest-{seed:07d}", "synthetic", as_stored(hu), fov_mm))


def read_cube(path, resolution: int, fov, body: bool = False):
    """One CT file or DICOM folder as the table's cube (``io.load_cube``, stored as the
    datasets store it): ``(HU [r]^3 projector frame, side mm)``, and its body mask with
    ``body=True``.

    ``fov="body"``: couch removed, the cube's side the body's larger axial extent, centred
    on the body; a number: that side, as ``ct_folder`` makes datasets. ``ValueError``
    names the file and the reason.
    """
    from xct import io

    cube = io.load_cube(path, resolution=resolution, fov_mm=fov, stored=True, body=body)
    return (cube.hu, cube.fov_mm, cube.body) if body else (cube.hu, cube.fov_mm)


def _ct_sources(ct_dir, include: str):
    """``(name, path)`` of every CT source under ``ct_dir`` (``io.find_ct_sources``) whose
    name relative to it matches the glob ``include``."""
    from xct import io

    root = pathlib.Path(ct_dir)
    for path in io.find_ct_sources(root, what="source_dir"):
        name = path.relative_to(root).as_posix()
        if fnmatch.fnmatch(name, include):
            yield name, path


def _skip(name: str, path, error: ValueError, skipped: list) -> None:
    """A CT that cannot be read right: its first reason on stderr and in ``skipped``."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reason = reason.removeprefix(f"{path}: ")
    print(f"skipped {name}: {reason}", file=sys.stderr, flush=True)
    skipped.append((name, reason))


def real_volumes(
    ct_dir, resolution: int, fov, skipped: list, chests: str = "*chest*", include: str = "*"
):
    """Every CT under ``ct_dir`` that ``read_cube`` accepts; ``(name, reason)`` of the
    others is appended to ``skipped``. Those whose name matches the glob ``chests`` are of
    kind ``"chest"``, the others ``"real"``; names that do not match ``include`` are passed
    over."""
    for name, path in _ct_sources(ct_dir, include):
        try:
            hu, side, body = read_cube(path, resolution, fov, body=True)
        except ValueError as e:
            _skip(name, path, e, skipped)
            continue
        kind = "chest" if fnmatch.fnmatch(name, chests) else "real"
        yield Volume(name, kind, hu, side, body, source=str(path.resolve()))


def template_volumes(paths, resolution: int) -> list[Volume]:
    """The template files as body-filled cubes (``read_cube(path, r, "body")``).

    Each is placed on the grid of the volume it is registered to (its own side scaled to
    that volume's), and the registration's global scale takes up the difference."""
    out = []
    for f in paths:
        path = pathlib.Path(f)
        try:
            hu, side, body = read_cube(path, resolution, "body", body=True)
        except ValueError as e:
            raise ValueError(f"--template {f}: {e}") from None
        out.append(Volume(path.name, "template", hu, side, body, source=str(path.resolve())))
    return out


def clinical_volumes(
    ct_dir, resolution: int, fov, skipped: list, chests: str = "*chest*", include: str = "*"
):
    """``real_volumes`` for the clinical mode: each CT's whole scan (``Volume.scan``) and
    its truth, the scan averaged over each voxel of the cube (``clinical.truth_cube``)."""
    from xct import clinical

    for name, path in _ct_sources(ct_dir, include):
        try:
            scan = clinical.load_scan(path)
            side = scan.side_mm if fov == "body" else float(fov)
            hu, body = clinical.truth_cube(scan, resolution, side)
        except ValueError as e:
            _skip(name, path, e, skipped)
            continue
        kind = "chest" if fnmatch.fnmatch(name, chests) else "real"
        yield Volume(name, kind, hu, side, body, source=str(path.resolve()), scan=scan)


def load_volumes(s: Settings, skipped: list) -> list[Volume]:
    """The phantoms and real CTs ``s`` asks for (unreadable CTs appended to ``skipped``)."""
    clinical = s.realism == "clinical"
    volumes = [] if clinical else list(synthetic_volumes(s.phantoms, s.resolution))
    if s.ct_dir is not None:
        ct_dir = pathlib.Path(s.ct_dir)
        if ct_dir.is_dir():
            read = clinical_volumes if clinical else real_volumes
            found = list(read(ct_dir, s.resolution, s.real_fov, skipped, s.chests, s.include))
            if not found and not volumes:
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
    return volumes


# ---------------------------------------------------------------------------------------
# Reconstruction


def clip_to_hu(mu):
    """HU of attenuation ``mu`` clipped at ``mu >= 0`` (HU >= -1000)."""
    import jax.numpy as jnp

    from xct import physics

    return physics.mu_to_hu(jnp.maximum(mu, 0.0))


def fdk_hann(drr, geom, grid, arc_deg: float | None = None):
    """Hann-windowed FDK. Automatic half-scan weights on arcs up to 180 degrees (and when
    ``arc_deg`` is None), none on longer orbits (no Parker weighting: the views are taken as
    a full orbit)."""
    from xct import recon

    short_scan = None if arc_deg is None or arc_deg <= 180 else False
    return recon.fdk(drr, geom, grid, window="hann", short_scan=short_scan)


def check_grid_factor(grid_factor: int, methods) -> None:
    """``ValueError`` (one line) unless ``grid_factor`` is a whole number >= 1 and, above 1,
    ``methods`` holds no template method: templates are read and registered on the output
    cube (``template_volumes``, ``recon.template``), not on a finer grid."""
    if isinstance(grid_factor, bool) or not isinstance(grid_factor, int) or grid_factor < 1:
        raise ValueError(f"grid_factor: a whole number >= 1, got {grid_factor!r}")
    refused = [m for m in methods if m in TEMPLATE]
    if grid_factor > 1 and refused:
        raise ValueError(
            f"grid_factor {grid_factor}: {', '.join(refused)} run on the output grid only "
            "(templates are registered at the output resolution); use grid_factor 1 for them"
        )


def finer_grid(grid, factor: int):
    """``grid`` (a ``geometry.VolumeGrid``) with each voxel split ``factor`` times along each
    axis: the same field of view (voxel edges), ``factor`` times the voxels per side."""
    from xct import geometry

    f = int(factor)
    if f == 1:
        return grid
    spacing = np.asarray(grid.spacing_mm, np.float64)  # [z, y, x]
    shift_xyz = (-(spacing / 2.0) * (1.0 - 1.0 / f))[::-1]  # first centre moves inwards
    origin = np.asarray(grid.origin_xyz_mm) + grid.direction_matrix() @ shift_xyz
    return geometry.VolumeGrid(
        tuple(n * f for n in grid.shape), tuple(spacing / f), tuple(origin), grid.direction
    )


def candidates(s: Settings, method: str) -> list[dict]:
    """The weights ``method`` is run with (one empty entry for methods without weights)."""
    if method in ("tv", "tv_support"):
        return [{"tv_weight": w} for w in s.tv_weight]
    if method == "network+tv":
        return [
            {"tv_weight": w, "prior_weight": pw}
            for w in s.network_tv_weight or s.tv_weight
            for pw in s.network_prior_weight or s.prior_weight
        ]
    if method in ("template_tv", "atlas_tv"):
        return [{"tv_weight": w, "prior_weight": pw} for w in s.tv_weight for pw in s.prior_weight]
    return [{}]


class Solvers:
    """The methods of ``METHODS`` on one grid: each a jitted function of ``(drr, geom,
    ...)`` returning attenuation per mm; ``run`` dispatches by name.

    With ``grid_factor`` f > 1 the classical and prior methods run on ``recon_grid``
    (``finer_grid(grid, f)``: the same cube, f times the voxels per side; give them X-rays
    brought to that grid, e.g. ``clinical.xrays_for_grid(..., solvers.recon_grid)``) and
    ``run`` returns their result clipped at ``mu >= 0`` and averaged over each f^3 block
    (``clinical.average_down``) on ``grid``; ``support`` is on ``recon_grid``. Template
    methods (registered on ``grid``) are refused.

    Args:
      grid: the output cube's ``VolumeGrid`` (what ``run`` returns, what is scored).
      sirt_iters, cgls_iters, tv_iters: iterations of each iterative method.
      air_tol: the priors' air line integral (None: ``recon.priors``' default).
      arc_deg: the views' arc, for FDK's weights (None: decided from the views).
      mu_water_per_mm: water's attenuation at the X-rays' effective energy (None:
        ``physics.MU_WATER_PER_MM``): the value bound and the templates' HU -> mu.
      grid_factor: how many times finer than ``grid`` the methods reconstruct (1: on it).
    """

    def __init__(
        self,
        grid,
        *,
        sirt_iters: int,
        cgls_iters: int,
        tv_iters: int,
        air_tol: float | None = None,
        arc_deg: float | None = None,
        mu_water_per_mm: float | None = None,
        grid_factor: int = 1,
    ):
        import jax
        import jax.numpy as jnp

        from xct import physics, projector, recon
        from xct.recon import priors, template

        check_grid_factor(grid_factor, ())
        f = grid_factor
        self.grid, self.air_tol, self.grid_factor = grid, air_tol, f
        self.recon_grid = fine = finer_grid(grid, f)
        self.mu_water = float(mu_water_per_mm or physics.MU_WATER_PER_MM)
        upper = float(physics.hu_to_mu(physics.HU_MAX, self.mu_water))
        self.upper = upper

        def cons(support):
            return None if support is None else priors.Constraints(support, 0.0, upper)

        def down(mu):  # clinical.average_down of the clipped fine result, traced
            if f == 1:
                return mu
            n0, n1, n2 = grid.shape
            return jnp.maximum(mu, 0.0).reshape(n0, f, n1, f, n2, f).mean((1, 3, 5))

        self._fdk = jax.jit(lambda drr, geom: down(fdk_hann(drr, geom, fine, arc_deg)))
        self._sirt = jax.jit(
            lambda drr, geom, support: down(
                recon.sirt(
                    drr, geom, fine, sirt_iters, nonnegative=True, constraints=cons(support)
                )[0]
            )
        )
        self._cgls = jax.jit(
            lambda drr, geom, support: down(
                recon.cgls(drr, geom, fine, cgls_iters, constraints=cons(support))[0]
            )
        )
        self._tv = jax.jit(
            lambda drr, geom, weight, support, x_prior, prior_weight: down(
                recon.tv(
                    drr,
                    geom,
                    fine,
                    tv_iters,
                    x0=x_prior,
                    tv_weight=weight,
                    nonnegative=True,
                    constraints=cons(support),
                    x_prior=x_prior,
                    prior_weight=prior_weight,
                )[0]
            )
        )
        self._register = jax.jit(lambda t, drr, geom: template.register(t, drr, geom, grid))
        self._mismatch = jax.jit(
            lambda mu, drr, geom: jnp.sqrt(
                jnp.sum(jnp.square(projector.forward_project(mu, grid, geom) - drr))
                / jnp.maximum(jnp.sum(drr * drr), 1e-24)
            )
        )

    def support(self, drr, geom):
        """The views' visual hull on the grid (``recon.priors.visual_hull``)."""
        from xct.recon import priors

        kw = {} if self.air_tol is None else {"air_tol": self.air_tol}
        return priors.visual_hull(drr, geom, self.recon_grid, **kw)

    def _output_grid_only(self, what: str) -> None:
        check_grid_factor(self.grid_factor, (what,))

    def register(self, templates: list[Volume], drr, geom):
        """``(name, Registration, {name: mismatch})`` of the best-matching template after
        registration (``recon.template.register`` of each)."""
        import jax.numpy as jnp

        from xct import physics

        self._output_grid_only("template")
        results = []
        for t in templates:
            mu = jnp.maximum(physics.hu_to_mu(jnp.asarray(t.hu), self.mu_water), 0.0)
            reg = self._register(mu, drr, geom)
            results.append((t.id, reg, float(reg.mismatch)))
        best = min(results, key=lambda r: r[2])
        return best[0], best[1], {name: m for name, _, m in results}

    def atlas(
        self, templates: list[Volume], drr, geom, *, k: int | None = None, progress: bool = False
    ):
        """``recon.atlas.atlas`` of the templates (HU cubes on the grid): screened, the best
        ``k`` (None: ``recon.atlas.K``, all) registered and fused. Its ``volumes[best]`` is
        the single best template, so ``template`` / ``template_tv`` need no registration of
        their own."""
        import jax.numpy as jnp

        from xct import physics
        from xct.recon import atlas

        self._output_grid_only("atlas")
        mus = [
            jnp.maximum(physics.hu_to_mu(jnp.asarray(t.hu), self.mu_water), 0.0) for t in templates
        ]
        k = atlas.K if k is None else k
        k = len(mus) if k is None else min(k, len(mus))
        return atlas.atlas(mus, drr, geom, self.grid, k=k, progress=progress)

    def atlas_net(self, net, drr, geom, support, prior):
        """``atlas_net``: ``tv_support`` and ``atlas_tv`` at the weights its network trained
        with (``atlas_net.input_weights`` of the model's metadata), then the network's correction
        (``xct.atlas_net.refine_hu``); attenuation per mm, >= 0."""
        import jax.numpy as jnp

        from xct import atlas_net, physics

        if net is None or prior is None or support is None:
            raise ValueError("atlas_net: needs a trained model, the fused atlas and the support")
        model, params, meta = net
        tv_w, at_w = atlas_net.input_weights(int(drr.shape[0]), atlas_net.weights_of(meta))
        tv = self.run("tv_support", drr, geom, tv_w, support)
        base = self.run("atlas_tv", drr, geom, at_w, support, prior)
        hu = atlas_net.refine_hu(model, params, base, prior, tv, self.mu_water)
        return jnp.maximum(physics.hu_to_mu(jnp.asarray(hu), self.mu_water), 0.0)

    def mismatch(self, mu, drr, geom) -> float:
        """The relative DRR residual ``||A mu - drr|| / ||drr||``."""
        return float(self._mismatch(mu, drr, geom))

    def run(self, method: str, drr, geom, params: dict, support=None, prior=None, net=None):
        """Attenuation per mm of ``method`` (``support``: the views' hull; ``prior``: the
        registered template, or the fused atlas for ``atlas`` / ``atlas_tv`` / ``atlas_net``;
        ``net``: ``atlas_net``'s ``(model, params, meta)``, ``xct.atlas_net.load``)."""
        self._output_grid_only(method)
        if method == "atlas_net":
            return self.atlas_net(net, drr, geom, support, prior)
        if method == "fdk":
            return self._fdk(drr, geom)
        if method in ("sirt", "sirt_support"):
            return self._sirt(drr, geom, support if method == "sirt_support" else None)
        if method in ("cgls", "cgls_support"):
            return self._cgls(drr, geom, support if method == "cgls_support" else None)
        if method in ("tv", "tv_support"):
            s = support if method == "tv_support" else None
            return self._tv(drr, geom, params["tv_weight"], s, None, 0.0)
        if method in ("template", "atlas"):
            return prior
        if method in ("template_tv", "atlas_tv"):
            return self._tv(drr, geom, params["tv_weight"], support, prior, params["prior_weight"])
        raise ValueError(f"unknown method {method!r}")


def solvers_for(grid, s: Settings, arc_deg: float | None) -> Solvers:
    """``Solvers`` with the iterations and priors of ``s``."""
    return Solvers(
        grid,
        sirt_iters=s.sirt_iters,
        cgls_iters=s.cgls_iters,
        tv_iters=s.tv_iters,
        air_tol=s.air_tol,
        arc_deg=arc_deg,
        mu_water_per_mm=s.mu_water_per_mm,
        grid_factor=s.grid_factor,
    )


# ---------------------------------------------------------------------------------------
# Networks: a trained model on each volume's own cube


def trained_on(*data_configs) -> list[str]:
    """Resolved paths of the real CTs a render-source model trained on, from its
    ``config.data`` settings (each a mapping with ``render.real_ct_dir``, ``...real_fraction``,
    ``...real_exclude``, or those fields flat as older runs stored them; the union over all
    given): the table never scores a network on them.
    A relative ``real_ct_dir`` is taken from the working directory, as training took it."""
    from xct import data

    out = set()
    for d in data_configs:
        d = dict(d or {})
        d.update(d.pop("render", None) or {})  # config.data.render (or a flat, older layout)
        if d.get("source", "render") != "render":
            continue
        sources = data.real_sources(
            str(d.get("real_ct_dir", "") or ""),
            float(d.get("real_fraction", 0.0) or 0.0),
            tuple(d.get("real_exclude", ()) or ()),
        )
        out.update(str(path.resolve()) for _, path in sources)
    return sorted(out)


def _network_info(config, s: Settings, arc_deg: float) -> dict:
    """What the table says about the network: its cube and views, why its rows are left
    out (``"skipped"``), how ``config`` differs from the workdir's stored config."""
    from xct import experiment, geometry

    acq = experiment.acquisition_from_config(config)
    info = {
        "config": s.config,
        "workdir": s.checkpoint_workdir,
        "resolution": acq.resolution,
        "fov_mm": acq.fov_mm,
    }
    mismatch = []
    if s.realism != "ideal":
        mismatch.append(f"input ({s.realism} X-rays; the network takes the datasets' r² views)")
    if acq.resolution != s.resolution:
        mismatch.append(f"resolution {acq.resolution} (table: {s.resolution})")
    if (acq.sod_mm, acq.sdd_mm) != (geometry.DEFAULT_SOD_MM, geometry.DEFAULT_SDD_MM):
        mismatch.append(f"sod/sdd {acq.sod_mm}/{acq.sdd_mm} mm")
    if abs(acq.arc_deg - arc_deg) > 1e-6:
        mismatch.append(f"arc {acq.arc_deg} degrees (table: {arc_deg})")
    if mismatch:
        info["skipped"] = "network rows left out: the checkpoint's " + ", ".join(mismatch)
        return info
    # What the run really was: the workdir's stored config (config.json) where it has one.
    stored_path = pathlib.Path(s.checkpoint_workdir) / "config.json"
    stored_json = stored_path.read_text(encoding="utf-8") if stored_path.is_file() else ""
    stored = json.loads(stored_json).get("data", {}) if stored_json else {}
    if stored_json:
        differ = [
            d
            for d in experiment.config_differences(config, stored_json)
            if not d.startswith(("mesh.", "distributed", "train.", "init_from", "eval."))
        ]
        if differ:
            info["config_differences"] = differ
            print(
                f"--config {s.config} differs from {stored_path} in: " + "; ".join(differ[:4]),
                file=sys.stderr,
                flush=True,
            )
    trained = int(stored.get("num_views", config.data.num_views))
    info["trained_views"] = trained
    asked = list(s.network_views or [trained])
    info["views"] = sorted(set(asked) & set(s.views))
    if not info["views"]:
        info["skipped"] = (
            f"network rows left out: none of --network_views {asked} is among --views "
            f"{list(s.views)}"
        )
        return info
    # What the run really trained on: the workdir's stored config as well as --config.
    info["trained_on"] = trained_on(config.data.to_dict(), stored)
    return info


def network_solvers(config, s: Settings, arc_deg: float) -> tuple[dict, dict]:
    """``(method -> fn, info)`` for the network rows, or ``({}, info)`` with the reason
    they are left out. Each fn takes ``(drr, geom, angles_deg, fov_mm)`` and returns
    ``(HU volume, relative residual or nan)`` on the scored volume's grid.

    Every model of the registry is geometry-aware (its lifting or its projector runs on
    ``model.acquisition``), so a volume whose cube differs from the config's (``real_fov=
    "body"``: each chest's body-filled cube) is reconstructed by the same parameters through
    ``Experiment.with_acquisition`` of that cube (same resolution, orbit and detector pixels;
    voxels and pixels of that cube's size): the network sees the body fill its cube as a
    body-cube training pool shows it (``config.data.render.real_fov="body"``). One volume at a
    time, on one device (``config.mesh`` is set to a single device)."""
    import jax
    import jax.numpy as jnp

    from xct import evaluate, physics, projector, recon
    from xct.experiment import Experiment
    from xct.recon import refine

    info = _network_info(config, s, arc_deg)
    if "skipped" in info:
        return {}, info
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.spatial = 1, 1  # one volume at a time
    exp = Experiment.from_config(config)
    (member,) = evaluate.restore_members(exp, s.checkpoint_workdir, s.checkpoint)
    # On the host: the jitted predictor then runs on the default device, whatever mesh the
    # parameters were restored onto.
    params, info["step"] = jax.device_get(member.params), int(member.step)

    @functools.cache
    def for_cube(fov_mm: float):
        """The model and the jitted corrections on the cube of side ``fov_mm``."""
        cube = exp.with_acquisition(dataclasses.replace(exp.acquisition, fov_mm=float(fov_mm)))
        grid = cube.acquisition.grid()

        @jax.jit
        def _refine(mu, drr, geom):
            out = refine.refine(mu, drr, geom, grid, units="mu_per_mm", num_iters=s.refine_iters)
            return clip_to_hu(out.volume)

        @jax.jit
        def _fdk_correction(mu, drr, geom):
            resid = drr - projector.forward_project(mu, grid, geom)
            return clip_to_hu(mu + fdk_hann(resid, geom, grid, arc_deg))

        @jax.jit
        def _sirt_from(mu, drr, geom):
            x, res = recon.sirt(drr, geom, grid, s.sirt_iters, x0=mu, nonnegative=True)
            return clip_to_hu(x), res[-1] / jnp.maximum(jnp.sqrt(jnp.sum(drr * drr)), 1e-12)

        return cube.predict_hu, _refine, _fdk_correction, _sirt_from

    def net_mu(drr, angles_deg, fov_mm):
        hu = for_cube(fov_mm)[0](params, physics.normalize_drr(drr)[None], angles_deg[None])
        return physics.hu_to_mu(hu[0])

    def network(drr, geom, angles_deg, fov_mm):
        return clip_to_hu(net_mu(drr, angles_deg, fov_mm)), jnp.nan

    def corrected(k):
        def fn(drr, geom, angles_deg, fov_mm):
            out = for_cube(fov_mm)[k](net_mu(drr, angles_deg, fov_mm), drr, geom)
            return out if k == 3 else (out, jnp.nan)

        return fn

    fns = {
        "network": network,
        "network+refine": corrected(1),
        "network+fdk": corrected(2),
        "network+sirt": corrected(3),
    }
    return fns, info


# ---------------------------------------------------------------------------------------
# Scoring


def body_box(body: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the body mask, at least 7 voxels per side (x2ct's SSIM window)."""
    from xct import evaluator

    return evaluator.body_box(body)


def score_volume(pred_hu, true_hu, body) -> dict:
    """Every ``SCORE_COLUMNS`` value of one volume ``[Z, Y, X]`` (HU): whole volume, and
    inside the ``body`` mask (``evaluator.volume_scores``)."""
    from xct import evaluator

    scores = evaluator.volume_scores(pred_hu[None], true_hu[None], body=body[None])
    return {col: float(scores[key][0]) for col, _, key in SCORE_COLUMNS}


def machine_line() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        what = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    else:
        what = f"{dev.device_kind} ({dev.platform})"
    return f"{what}, JAX {jax.__version__}, Python {platform.python_version()}"


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def _row(method, views, vol: Volume, mu, drr, geom, solvers: Solvers, seconds, params) -> dict:
    from xct import physics

    pred = physics.mu_to_hu(mu, solvers.mu_water)
    row = {"method": method, "views": views, "kind": vol.kind, "volume": vol.id}
    row.update(score_volume(pred, vol.hu, vol.body))
    row["drr_mismatch"] = solvers.mismatch(mu, drr, geom)
    row["seconds"] = seconds
    row["fov_mm"] = vol.fov_mm
    row["body_fraction"] = vol.body_fraction
    row["params"] = _fmt_params(params)
    return row


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


# ---------------------------------------------------------------------------------------
# The table: every volume, every number of views, every method


class _Table:
    """One run's state: the settings, the views' angles, the solvers per cube side, the
    rows so far and what was registered or left out."""

    def __init__(self, s: Settings, arc_deg: float, templates: list[Volume], net):
        import jax
        from tqdm import tqdm

        from xct import geometry

        self.s, self.arc, self.templates = s, arc_deg, templates
        self.angles = geometry.nested_view_angles(max(s.views), arc_deg)  # prefixes spread
        self.net_fns, self.net_info = net
        self.jobs = [m for m in METHODS if m in s.methods]
        self.rows, self.templates_used, self.template_skipped = [], [], []
        self.atlas_nets = []
        if "atlas_net" in self.jobs:
            from xct import atlas_net

            for d in s.atlas_net:
                model, params, meta = atlas_net.load(d)
                self.atlas_nets.append((model, params, {**meta, "path": str(d)}))
        self.atlas_net_used: dict = {}
        self.atlas_net_skipped: list = []
        self._by_fov: dict = {}
        self.base_key = jax.random.key(s.seed)
        self.per_volume = sum(len(candidates(s, m)) for m in self.jobs) * len(s.views)
        self.per_net = 0
        if self.net_fns:
            self.per_net = len(self.net_fns) + len(candidates(s, "network+tv"))
        self.bar = tqdm(total=0, desc=f"quality {s.resolution}^3", unit="recon")

    def setup_for(self, fov_mm: float):
        """``(geoms per views, Solvers, jitted renderer)`` on the cube of side ``fov_mm``."""
        import jax

        from xct import geometry, physics

        if fov_mm not in self._by_fov:
            s = self.s
            acq = geometry.Acquisition(resolution=s.resolution, fov_mm=fov_mm, arc_deg=self.arc)
            grid = acq.grid()
            geoms = {v: acq.orbit(self.angles[:v]) for v in s.views}
            g_all = geoms[max(s.views)]
            render = jax.jit(
                lambda hu, key, photons: physics.render_drrs(hu, grid, g_all, key, photons=photons),
                static_argnames="photons",
            )
            self._by_fov[fov_mm] = (geoms, solvers_for(grid, s, self.arc), render)
        return self._by_fov[fov_mm]

    def _usable_templates(self, vol: Volume) -> tuple[list[Volume], list[str]]:
        """The templates that may serve ``vol`` (never itself; of a plausible size), and why
        the others may not."""
        from xct.recon import template

        usable, why = [], []
        for t in self.templates:
            if t.source == vol.source:
                continue  # leave one out: never the CT being scored
            try:
                template.check_template_size(t.id, t.fov_mm, vol.fov_mm)
                usable.append(t)
            except ValueError as e:
                why.append(str(e))
        return usable, why or [f"no --template but {vol.id} itself"]

    def atlas_net_for(self, vol: Volume, v: int):
        """The first ``--atlas_net`` model that did not train on ``vol`` (leave one out), or
        None (recorded in ``atlas_net_skipped``, its row left out)."""
        name = pathlib.Path(vol.source or vol.id).name.removesuffix(".nii.gz")
        for net in self.atlas_nets:
            if name not in net[2].get("trained_on", []):
                self.atlas_net_used.setdefault(vol.id, net[2].get("path"))
                return net
        why = (
            "no --atlas_net model given"
            if not self.atlas_nets
            else "every --atlas_net model trained on it"
        )
        self.atlas_net_skipped.append({"volume": vol.id, "views": v, "reason": why})
        print(f"{vol.id} {v}v: atlas_net row left out: {why}", file=sys.stderr)
        self.bar.update(1)
        return None

    def template_priors(self, vol: Volume, v: int, drr, geom, solvers: Solvers):
        """``({"template": mu, "atlas": mu}, registration seconds)``: the registered best
        template and, when an atlas method is asked, the fused atlas. With an atlas method
        the registration is the atlas's (every template screened, the best ``k`` registered):
        its best registered template serves ``template`` / ``template_tv``, so one run
        registers once. A refusal is recorded in ``template_skipped`` and the progress bar
        skips its rows."""
        from xct.recon import template

        usable, why = self._usable_templates(vol)
        priors, seconds = {}, 0.0
        if usable:
            self.bar.set_postfix_str(f"{vol.id[:24]} registering {v}v")
            t0 = time.perf_counter()
            if set(self.jobs) & {"atlas", "atlas_tv", "atlas_net"}:
                at = solvers.atlas(usable, drr, geom)
                names = [usable[i].id for i in at.indices]
                mism = dict(zip(names, (float(m) for m in at.mismatch), strict=True))
                name = names[at.best]
                priors = {"template": at.volumes[at.best], "atlas": at.volume}
                fused = names
            else:
                name, reg, mism = solvers.register(usable, drr, geom)
                priors, fused = {"template": reg.volume}, []
            seconds = time.perf_counter() - t0
            used = {"volume": vol.id, "views": v, "template": name, "mismatch": mism}
            self.templates_used.append({**used, "atlas": fused} if fused else used)
            try:
                template.check_match(name, mism[name])
            except ValueError as e:
                why, priors = [str(e)], {}
        if not priors:
            self.template_skipped.append({"volume": vol.id, "views": v, "reason": why[0]})
            print(f"{vol.id} {v}v: template rows left out: {why[0]}", file=sys.stderr)
            self.bar.update(sum(len(candidates(self.s, m)) for m in self.jobs if m in TEMPLATE))
        return priors, seconds

    def classical_rows(self, vol: Volume, v: int, drr, geom, solvers: Solvers) -> None:
        """The rows of ``METHODS`` (every candidate weight) of one volume at ``v`` views."""
        import jax
        import jax.numpy as jnp

        support, priors = None, {}
        reg_seconds = 0.0
        if set(self.jobs) & {*PRIOR, "template_tv", "atlas_tv", "atlas_net"}:
            support = solvers.support(drr, geom)
        if set(self.jobs) & set(TEMPLATE):
            priors, reg_seconds = self.template_priors(vol, v, drr, geom, solvers)
        for method in self.jobs:
            prior = priors.get(PRIOR_OF[method]) if method in TEMPLATE else None
            if method in TEMPLATE and prior is None:
                continue
            net = self.atlas_net_for(vol, v) if method == "atlas_net" else None
            if method == "atlas_net" and net is None:
                continue
            for params in candidates(self.s, method):
                self.bar.set_postfix_str(f"{vol.id[:24]} {method} {v}v {_fmt_params(params)}")
                t = time.perf_counter()
                mu = jax.block_until_ready(
                    solvers.run(method, drr, geom, params, support=support, prior=prior, net=net)
                )
                seconds = time.perf_counter() - t
                if method in TEMPLATE:
                    seconds += reg_seconds  # the registration is part of its cost
                mu = jnp.maximum(mu, 0.0)
                self.rows.append(_row(method, v, vol, mu, drr, geom, solvers, seconds, params))
                self.bar.update(1)

    def network_rows(self, vol: Volume, v: int, drr, geom, solvers: Solvers) -> None:
        """The network rows (and network+tv's candidates) of one volume at ``v`` views."""
        import jax
        import jax.numpy as jnp

        from xct import physics

        angles = jnp.asarray(self.angles[:v], jnp.float32)
        for method, fn in self.net_fns.items():
            self.bar.set_postfix_str(f"{vol.id[:24]} {method} {v}v")
            t = time.perf_counter()
            pred, _ = fn(drr, geom, angles, vol.fov_mm)
            pred = jax.block_until_ready(pred)
            mu = jnp.maximum(physics.hu_to_mu(pred), 0.0)
            net_seconds = time.perf_counter() - t
            self.rows.append(_row(method, v, vol, mu, drr, geom, solvers, net_seconds, {}))
            self.bar.update(1)
            if method != "network":
                continue
            support = solvers.support(drr, geom)
            for params in candidates(self.s, "network+tv"):
                self.bar.set_postfix_str(f"{vol.id[:24]} network+tv {v}v")
                t = time.perf_counter()
                x = jax.block_until_ready(
                    solvers.run("template_tv", drr, geom, params, support, prior=mu)
                )
                seconds = net_seconds + time.perf_counter() - t
                x = jnp.maximum(x, 0.0)
                self.rows.append(_row("network+tv", v, vol, x, drr, geom, solvers, seconds, params))
                self.bar.update(1)

    def clinical_rows(self, vol: Volume, key, solvers: Solvers) -> None:
        """Clinical mode: X-rays of the whole scan, brought to the grid for each views."""
        import jax.numpy as jnp

        from xct import clinical

        s = self.s
        photons = clinical.DEFAULT_PHOTONS if s.photons is None else s.photons
        fine, _ = clinical.clinical_xrays(
            vol.scan,
            self.angles,
            key,
            pixel_mm=s.detector_pixel_mm,
            photons=photons or None,
            mode=s.spectrum,
        )
        for v in s.views:
            drr, geom = clinical.xrays_for_grid(
                fine[:v],
                s.detector_pixel_mm,
                self.angles[:v],
                solvers.recon_grid,
                sampling=s.detector_sampling,
            )
            self.classical_rows(vol, v, jnp.asarray(drr), geom, solvers)

    def score(self, i: int, vol: Volume) -> None:
        """Every row of volume ``i``: X-rays, then each number of views and method."""
        import jax

        geoms, solvers, render = self.setup_for(vol.fov_mm)
        key = jax.random.fold_in(self.base_key, i)
        if vol.scan is not None:
            self.clinical_rows(vol, key, solvers)
            return
        drr_all = render(vol.hu, key, self.s.photons)
        for v in self.s.views:
            self.classical_rows(vol, v, drr_all[:v], geoms[v], solvers)
        if not self.net_fns:
            return
        if vol.source in self.net_info["trained_on"]:
            # leave one out: never score a network on a CT it trained on
            print(f"{vol.id}: network rows left out: the network trained on it", file=sys.stderr)
            self.net_info.setdefault("left_out", []).append(vol.id)
            self.bar.update(self.per_net * len(self.net_info["views"]))
            return
        for v in self.net_info["views"]:
            self.network_rows(vol, v, drr_all[:v], geoms[v], solvers)


def _setup_json(s: Settings, arc_deg: float, angles) -> dict:
    from xct import geometry, physics
    from xct.recon import priors

    return {
        "resolution": s.resolution,
        "fov_mm": DEFAULT_FOV_MM,
        "real_fov": s.real_fov,
        "chests": s.chests,
        "include": s.include,
        "sod_mm": geometry.DEFAULT_SOD_MM,
        "sdd_mm": geometry.DEFAULT_SDD_MM,
        "arc_deg": arc_deg,
        "angles_deg": [float(a) for a in angles],
        "views": list(s.views),
        "methods": list(s.methods),
        "phantoms": s.phantoms,
        "ct_dir": s.ct_dir,
        "photons": s.photons,
        "sirt_iters": s.sirt_iters,
        "cgls_iters": s.cgls_iters,
        "tv_iters": s.tv_iters,
        "tv_weight": list(s.tv_weight),
        "prior_weight": list(s.prior_weight),
        "air_tol": priors.DEFAULT_AIR_TOL if s.air_tol is None else s.air_tol,
        "templates": list(s.template),
        "refine_iters": s.refine_iters,
        "realism": s.realism,
        "realism_label": REALISM[s.realism],
        "grid_factor": s.grid_factor,
        **(
            {
                "detector_pixel_mm": s.detector_pixel_mm,
                "detector_sampling": s.detector_sampling,
                "spectrum": s.spectrum,
                "mu_water_per_mm": s.mu_water_per_mm or physics.MU_WATER_PER_MM,
            }
            if s.realism == "clinical"
            else {}
        ),
    }


def run_table(s: Settings, command: str = "") -> dict:
    """Reconstruct and score everything ``s`` asks for: the result (set-up, machine,
    volumes, the chosen ``rows``, every candidate in ``sweep``), for ``write_outputs``.

    Raises:
      ValueError: nothing to score, an unreadable template, a bad network config.
    """
    from xct import experiment, metrics

    t0 = time.perf_counter()
    arc = 180.0 if s.arc_deg is None else float(s.arc_deg)  # the datasets' arc
    net = ({}, None)
    if s.checkpoint_workdir:
        net = network_solvers(experiment.load_config(s.config), s, arc)
        if "skipped" in net[1]:
            print(net[1]["skipped"], file=sys.stderr, flush=True)
    skipped: list[tuple[str, str]] = []
    volumes = load_volumes(s, skipped)
    templates = template_volumes(s.template, s.resolution) if set(s.methods) & set(TEMPLATE) else []
    table = _Table(s, arc, templates, net)
    per_net = table.per_net * len(net[1]["views"]) if net[0] else 0
    table.bar.total = len(volumes) * (table.per_volume + per_net)
    for i, vol in enumerate(volumes):
        table.score(i, vol)
    table.bar.close()
    return {
        "machine": machine_line(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "wall_s": time.perf_counter() - t0,
        "setup": _setup_json(s, arc, table.angles),
        "definitions": metrics.DEFINITIONS,
        "network": net[1],
        "volumes": [
            {"id": v.id, "kind": v.kind, "fov_mm": v.fov_mm, "body_fraction": v.body_fraction}
            for v in volumes
        ],
        "real_ids": [v.id for v in volumes if v.kind == "real"],
        "chest_ids": [v.id for v in volumes if v.kind == "chest"],
        "templates_used": table.templates_used,
        "template_skipped": table.template_skipped,
        "atlas_net": {"used": table.atlas_net_used, "skipped": table.atlas_net_skipped},
        "skipped": skipped,
        "rows": select(table.rows),
        "sweep": table.rows,
    }


# ---------------------------------------------------------------------------------------
# Summaries and writers


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
    """A markdown table of ``summarise``'s means: a row per method, a column per views."""
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


def _xray_text(s: dict) -> str:
    """How the X-rays were made (the set-up's ``realism``)."""
    r = s["resolution"]
    if s.get("realism", "ideal") == "ideal":
        return (
            f"{r}² detector sized to the cube's inscribed cylinder; DRRs physics.render_drrs "
            "(mono) of the scored cube itself (couch and all outside the body removed), "
            + (f"Poisson noise {s['photons']:g} photons/pixel" if s["photons"] else "noise-free")
        )
    from xct import clinical

    photons = clinical.DEFAULT_PHOTONS if s["photons"] is None else s["photons"]
    return (
        "X-rays of the whole scan at its own resolution, couch and all (xct.clinical), on a "
        f"detector of {s['detector_pixel_mm']:g} mm pixels covering the body, "
        + (f"Poisson noise {photons:g} photons/pixel" if photons else "noise-free")
        + f", {s['spectrum']}; brought to the grid by "
        + (
            "binning to the voxel's footprint"
            if s["detector_sampling"] == "footprint"
            else f"resizing to {r}²"
        )
        + "; truth: the scan averaged over each voxel of the cube (couch kept), body mask at "
        "the scan's resolution" + _grid_factor_text(s)
    )


def _grid_factor_text(s: dict) -> str:
    """The set-up's finer reconstruction grid, if any (``Settings.grid_factor``)."""
    f, r = s.get("grid_factor", 1), s["resolution"]
    if f == 1:
        return ""
    return (
        f"; grid_factor {f}: reconstructed on a {f * r}³ grid of the same cube (X-rays brought "
        f"to its voxels), each result clipped at μ ≥ 0 and averaged over {f}³ blocks to {r}³ "
        "before scoring"
    )


def _setup_lines(result: dict) -> list[str]:
    """The report's heading and set-up paragraphs."""
    s = result["setup"]
    r, views = s["resolution"], s["views"]
    tw = ", ".join(f"{w:g}" for w in s["tv_weight"])
    label = REALISM[s.get("realism", "ideal")]
    md = [
        f"## Few-view reconstruction quality, {r}³, {label} X-rays (`scripts/quality_table.py`)",
        "",
        f"{result['machine']} — {result['date']}; wall {result['wall_s']:.0f} s.  ",
        f"Command: `{result['command']}`",
        "",
        (
            f"Set-up ({label}): cone beam, sod/sdd {s['sod_mm']:.0f}/{s['sdd_mm']:.0f} mm, "
            f"{r}³ CT cube; views: first V of nested_view_angles({max(views)}) over "
            f"{s['arc_deg']:.0f}°; "
            + _xray_text(s)
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
                "each its own side, the body's larger axial extent (centred on the body, "
                + (
                    "couch removed, air beyond the scan's ends)"
                    if s.get("realism", "ideal") == "ideal"
                    else "the truth keeps the couch)"
                )
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
                if {"template_tv", "atlas_tv"} & set(s["methods"])
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
                "gain; Adam, coarse to fine); with several, the best DRR match. Atlas "
                "(`xct.recon.atlas`): every template screened, registered and fused by "
                "local fit. template_tv / atlas_tv: TV with the priors from the registered "
                "template, pulled towards it. atlas_net (`xct.atlas_net`): a network's "
                "correction of atlas_tv (at the weights it trained with), by a model that "
                "never trained on the CT scored."
            ),
        ]
    return md


def _network_lines(result: dict) -> list[str]:
    """The report's paragraphs on the network (none without one)."""
    n, s = result.get("network"), result["setup"]
    if not n:
        return []
    if "skipped" in n:
        return ["", n["skipped"] + "."]
    md = [
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
    return md


def _kind_lines(result: dict, methods: list[str], root: pathlib.Path | None) -> list[str]:
    """The tables of each kind of volume (synthetic, real chests, other real CTs)."""
    s, rows, views = result["setup"], result["rows"], result["setup"]["views"]
    label = REALISM[s.get("realism", "ideal")]
    n_syn = s["phantoms"]
    seeds = "2,000,000" + (f"–{2_000_000 + n_syn - 1:,}" if n_syn > 1 else "")
    ct_dir = s["ct_dir"] and (os.path.relpath(s["ct_dir"], root) if root else s["ct_dir"])
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
    md = []
    for kind, title in groups:
        if not any(x["kind"] == kind for x in rows):
            continue
        for name, cols in TABLES:
            table = markdown_table(summarise(rows, kind, cols), methods, views)
            md += ["", f"### {title} — {name}, {label}", "", table]
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
    return md


def _appendix_lines(result: dict) -> list[str]:
    """Definitions, volumes, weights chosen, templates used, inputs left out."""
    from xct import metrics

    rows = result["rows"]
    md = ["", "Definitions:"]
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
            total = sum(map(len, by.values()))
            md.append(
                f"- {kind} {m} {v}v: "
                + "; ".join(f"{p} ({len(vs)} of {total})" for p, vs in by.items())
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
    an = result.get("atlas_net") or {}
    if an.get("used"):
        md += ["", "atlas_net models (each never trained on the chest it scores): "]
        md += [f"- `{vol}`: `{path}`" for vol, path in an["used"].items()]
    if an.get("skipped"):
        md += ["", "atlas_net rows left out:"]
        md += [f"- `{t['volume']}` {t['views']}v: {t['reason']}" for t in an["skipped"]]
    if result["skipped"]:
        md += ["", "Skipped (as ct_folder would):"]
        md += [f"- `{name}`: {reason}" for name, reason in result["skipped"]]
    return md


def report_markdown(result: dict, root: pathlib.Path | None = None) -> str:
    """The report (markdown) of ``run_table``'s result; paths shown relative to ``root``."""
    rows = result["rows"]
    methods = [m for m in (*METHODS, *NETWORK) if any(x["method"] == m for x in rows)]
    md = _setup_lines(result) + _network_lines(result)
    md += _kind_lines(result, methods, root) + _appendix_lines(result)
    return "\n".join(md) + "\n"


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
    out = {k: v for k, v in result.items() if k not in ("rows", "sweep", "markdown")}
    out["means"] = means
    return out


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """``rows`` as CSV, floats with 6 significant digits."""
    keys = list(rows[0]) if rows else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_figure(path: pathlib.Path, result: dict) -> None:
    """PSNR against views, one panel per kind of volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    kinds = [k for k in ("synthetic", "chest", "real") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    methods = [m for m in (*METHODS, *NETWORK) if any(x["method"] == m for x in rows)]
    label = REALISM[result["setup"].get("realism", "ideal")]
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
        ax.set_title(f"{kind} ({result['setup']['resolution']}³, {label})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def write_outputs(out, result: dict, root: pathlib.Path | None = None) -> str:
    """Write ``quality_{r}.md``, ``per_volume_{r}.csv``, ``sweep_{r}.csv`` (with several
    candidates), ``psnr_vs_views_{r}.png`` and ``results_{r}.json`` into ``out``; the
    markdown."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    r = result["setup"]["resolution"]
    write_csv(out / f"per_volume_{r}.csv", result["rows"])
    if len(result["sweep"]) != len(result["rows"]):
        write_csv(out / f"sweep_{r}.csv", result["sweep"])
    write_figure(out / f"psnr_vs_views_{r}.png", result)
    text = report_markdown(result, root)
    (out / f"quality_{r}.md").write_text(text, encoding="utf-8")
    with open(out / f"results_{r}.json", "w", encoding="utf-8") as f:
        json.dump(summary_json(result), f, indent=1)
    return text
