"""Adapters to trusted peers (RTK) so tests and benchmarks compare like with like.

Not part of the layout in STYLE.md's list: it exists so that ``tests/`` and ``scripts/``
drive RTK one way, with the same geometry conventions as ``xct.geometry``. ``itk`` is
imported inside the functions (it is a ``dev`` extra, absent on GPU images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rtk_available() -> bool:
    try:
        import itk  # noqa: F401
        from itk import RTK  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def _rtk():
    import itk
    from itk import RTK as rtk

    return itk, rtk


def rtk_geometry(angles_deg: Sequence[float], sod_mm: float, sdd_mm: float):
    """RTK ``ThreeDCircularProjectionGeometry`` with one ``AddProjection`` per angle."""
    _, rtk = _rtk()
    g = rtk.ThreeDCircularProjectionGeometry.New()
    for a in np.asarray(angles_deg, np.float64).reshape(-1):
        g.AddProjection(float(sod_mm), float(sdd_mm), float(a))
    return g


def rtk_volume(volume_zyx: np.ndarray, spacing_mm: float | Sequence[float]):
    """An ITK float image of a ``[z, y, x]`` array centred on the isocentre."""
    itk, _ = _rtk()
    vol = np.ascontiguousarray(volume_zyx, dtype=np.float32)
    img = itk.image_from_array(vol)
    sp_zyx = np.broadcast_to(np.asarray(spacing_mm, np.float64), (3,))
    sp_xyz = sp_zyx[::-1]
    n_xyz = np.asarray(vol.shape[::-1])
    img.SetSpacing([float(s) for s in sp_xyz])
    img.SetOrigin([float(-(n - 1) * s / 2.0) for n, s in zip(n_xyz, sp_xyz, strict=True)])
    return img


def rtk_projection_stack(num_views: int, det_shape: Sequence[int], pixel_mm: Sequence[float]):
    """A zero projection stack (RTK ``ConstantImageSource``) with a centred detector."""
    itk, rtk = _rtk()
    rows, cols = (int(v) for v in det_shape)
    pv, pu = (float(v) for v in np.broadcast_to(np.asarray(pixel_mm, np.float64), (2,)))
    image_type = itk.Image[itk.F, 3]
    src = rtk.ConstantImageSource[image_type].New()
    src.SetSize([cols, rows, int(num_views)])
    src.SetSpacing([pu, pv, 1.0])
    src.SetOrigin([-(cols - 1) * pu / 2.0, -(rows - 1) * pv / 2.0, 0.0])
    src.SetConstant(0.0)
    return src


class RTKJoseph:
    """RTK's Joseph forward projector set up once, so that ``run()`` times only projection.

    ``run()`` returns ``[views, rows, cols]`` float32 line integrals.
    """

    def __init__(self, volume_zyx, spacing_mm, angles_deg, *, sod_mm, sdd_mm, det_shape, pixel_mm):
        itk, rtk = _rtk()
        image_type = itk.Image[itk.F, 3]
        self._volume = rtk_volume(volume_zyx, spacing_mm)
        self._stack = rtk_projection_stack(len(np.atleast_1d(angles_deg)), det_shape, pixel_mm)
        self._stack.Update()
        self._geometry = rtk_geometry(angles_deg, sod_mm, sdd_mm)
        self._filter_type = rtk.JosephForwardProjectionImageFilter[image_type, image_type]
        self._itk = itk

    def run(self) -> np.ndarray:
        f = self._filter_type.New()
        f.SetInput(0, self._stack.GetOutput())
        f.SetInput(1, self._volume)
        f.SetGeometry(self._geometry)
        f.Update()
        return np.asarray(self._itk.array_from_image(f.GetOutput()), np.float32).copy()


def rtk_forward_project(volume_zyx, spacing_mm, angles_deg, *, sod_mm, sdd_mm, det_shape, pixel_mm):
    """One-shot RTK Joseph projection, ``[views, rows, cols]``."""
    return RTKJoseph(
        volume_zyx,
        spacing_mm,
        angles_deg,
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        det_shape=det_shape,
        pixel_mm=pixel_mm,
    ).run()


def rtk_constant_volume(volume_shape: Sequence[int], spacing_mm: float | Sequence[float]):
    """A zero ``[z, y, x]`` volume (RTK ``ConstantImageSource``) centred on the isocentre."""
    itk, rtk = _rtk()
    n_xyz = [int(v) for v in np.asarray(volume_shape).reshape(-1)[::-1]]
    sp_xyz = np.broadcast_to(np.asarray(spacing_mm, np.float64), (3,))[::-1]
    src = rtk.ConstantImageSource[itk.Image[itk.F, 3]].New()
    src.SetSize(n_xyz)
    src.SetSpacing([float(s) for s in sp_xyz])
    src.SetOrigin([float(-(n - 1) * s / 2.0) for n, s in zip(n_xyz, sp_xyz, strict=True)])
    src.SetConstant(0.0)
    return src


def rtk_projections(drr: np.ndarray, pixel_mm: float | Sequence[float]):
    """An ITK image of a ``[views, rows, cols]`` stack on a centred detector (RTK layout)."""
    itk, _ = _rtk()
    stack = np.ascontiguousarray(drr, dtype=np.float32)
    _, rows, cols = stack.shape
    pv, pu = (float(v) for v in np.broadcast_to(np.asarray(pixel_mm, np.float64), (2,)))
    img = itk.image_from_array(stack)
    img.SetSpacing([pu, pv, 1.0])
    img.SetOrigin([-(cols - 1) * pu / 2.0, -(rows - 1) * pv / 2.0, 0.0])
    return img


class RTKFDK:
    """RTK's FDK (``FDKConeBeamReconstructionFilter``) set up once; ``run()`` reconstructs.

    Same conventions as ``RTKJoseph`` and ``xct.geometry.circular_cone_beam``: ``drr`` is
    ``[views, rows, cols]`` line integrals, ``pixel_mm`` is ``(pv, pu)`` or one number, the
    volume is ``volume_shape`` ``[z, y, x]`` centred on the isocentre. ``hann_cut`` is RTK's
    ``HannCutFrequency`` (0: plain ramp). ``short_scan=True`` puts RTK's
    ``ParkerShortScanImageFilter`` before FDK (it does nothing unless some gap between
    consecutive angles is 20 degrees or more). ``run()`` returns ``[z, y, x]`` float32 in the
    unit of ``drr`` per mm.
    """

    def __init__(
        self,
        drr,
        angles_deg,
        *,
        sod_mm,
        sdd_mm,
        pixel_mm,
        volume_shape,
        spacing_mm,
        hann_cut: float = 0.0,
        short_scan: bool = False,
    ):
        itk, rtk = _rtk()
        self._image_type = itk.Image[itk.F, 3]
        self._projections = rtk_projections(drr, pixel_mm)
        self._volume = rtk_constant_volume(volume_shape, spacing_mm)
        self._volume.Update()
        self._geometry = rtk_geometry(angles_deg, sod_mm, sdd_mm)
        self._hann_cut = float(hann_cut)
        self._short_scan = bool(short_scan)
        self._rtk = rtk
        self._itk = itk

    def run(self) -> np.ndarray:
        rtk, image_type = self._rtk, self._image_type
        projections = self._projections
        if self._short_scan:
            parker = rtk.ParkerShortScanImageFilter[image_type].New()
            parker.SetInput(projections)
            parker.SetGeometry(self._geometry)
            parker.InPlaceOff()
            parker.Update()
            projections = parker.GetOutput()
        f = rtk.FDKConeBeamReconstructionFilter[image_type].New()
        f.SetInput(0, self._volume.GetOutput())
        f.SetInput(1, projections)
        f.SetGeometry(self._geometry)
        if self._hann_cut > 0.0:
            f.GetRampFilter().SetHannCutFrequency(self._hann_cut)
        f.Update()
        return np.asarray(self._itk.array_from_image(f.GetOutput()), np.float32).copy()


def rtk_fdk(
    drr,
    angles_deg,
    *,
    sod_mm,
    sdd_mm,
    pixel_mm,
    volume_shape,
    spacing_mm,
    hann_cut: float = 0.0,
    short_scan: bool = False,
):
    """One-shot RTK FDK reconstruction, ``[z, y, x]`` (see ``RTKFDK``)."""
    return RTKFDK(
        drr,
        angles_deg,
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        pixel_mm=pixel_mm,
        volume_shape=volume_shape,
        spacing_mm=spacing_mm,
        hann_cut=hann_cut,
        short_scan=short_scan,
    ).run()
