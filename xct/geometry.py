"""Frames, volume grids, detectors, poses and rays.

Conventions (stated once, here; the rest of xct relies on them):

* Volume arrays are indexed ``[z, y, x]`` (SimpleITK's NumPy order). ``VolumeGrid.shape``
  and ``VolumeGrid.spacing_mm`` follow that order.
* World coordinates are millimetres in the volume's physical frame (ITK's LPS), written as
  ``(x, y, z)`` vectors. ``VolumeGrid.origin_xyz_mm`` is the world position of the centre of
  voxel ``[0, 0, 0]`` and ``VolumeGrid.direction`` the 3x3 ITK direction matrix whose
  columns are the world directions of the x, y and z index axes.
* Detectors follow RTK's ``ThreeDCircularProjectionGeometry``: in the *camera frame* of a
  view the source sits at ``(0, 0, sod)``, the detector plane is ``z = -(sdd - sod)``, its
  columns run along ``+x`` (u) and its rows along ``+y`` (v), and pixel ``[row, col]`` is at
  ``((col - (cols-1)/2) * pu, (row - (rows-1)/2) * pv)`` in that plane. A pose ``(R, t)``
  maps the camera frame to the world: ``p_world = R @ p_cam + t``. A circular orbit with
  gantry angle ``theta`` is ``R = R_y(theta)``, ``t = 0``, which puts the source at
  ``(sod sin(theta), 0, sod cos(theta))`` and the detector columns along
  ``(cos(theta), 0, -sin(theta))``, exactly as RTK's ``AddProjection(sod, sdd, theta)``.
* Parallel beam uses the same frames; every ray of a view is parallel to the central ray
  (source towards detector centre) and runs from the plane through the source to the
  detector.

Nothing here imports other xct modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Kind = Literal["cone", "parallel"]


def _positive_tuple(name: str, values, length: int, integer: bool = False) -> tuple:
    try:
        vals = tuple(np.asarray(values, dtype=np.float64).reshape(-1).tolist())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected {length} positive numbers, got {values!r}") from e
    if len(vals) != length:
        raise ValueError(f"{name}: expected {length} values, got {len(vals)} ({values!r})")
    if not all(np.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"{name}: expected positive finite values, got {values!r}")
    if integer:
        if not all(float(v).is_integer() for v in vals):
            raise ValueError(f"{name}: expected integers, got {values!r}")
        return tuple(int(v) for v in vals)
    return tuple(float(v) for v in vals)


@dataclasses.dataclass(frozen=True)
class VolumeGrid:
    """Where a ``[z, y, x]`` voxel array sits in the world (millimetres).

    Attributes:
      shape: ``(nz, ny, nx)`` voxels.
      spacing_mm: ``(sz, sy, sx)`` voxel size in mm.
      origin_xyz_mm: world ``(x, y, z)`` of the centre of voxel ``[0, 0, 0]``.
      direction: ITK direction matrix, row-major 9-tuple; column ``j`` is the world
        direction of index axis ``j`` in ``(x, y, z)`` index order.

    The grid is hashable and registered as a pytree with no leaves, so it can be passed
    through ``jax.jit`` as an ordinary argument; its numbers are compile-time constants.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "shape", _positive_tuple("shape", self.shape, 3, integer=True))
        object.__setattr__(self, "spacing_mm", _positive_tuple("spacing_mm", self.spacing_mm, 3))
        origin = tuple(float(v) for v in np.asarray(self.origin_xyz_mm, np.float64).reshape(-1))
        if len(origin) != 3 or not all(np.isfinite(origin)):
            raise ValueError(
                f"origin_xyz_mm: expected 3 finite numbers, got {self.origin_xyz_mm!r}"
            )
        object.__setattr__(self, "origin_xyz_mm", origin)
        d = np.asarray(self.direction, np.float64).reshape(-1)
        if d.size != 9 or not np.allclose(
            d.reshape(3, 3) @ d.reshape(3, 3).T, np.eye(3), atol=1e-4
        ):
            raise ValueError(
                f"direction: expected an orthonormal 3x3 matrix, got {self.direction!r}"
            )
        object.__setattr__(self, "direction", tuple(float(v) for v in d))

    @classmethod
    def centered(cls, shape: Sequence[int], spacing_mm: Sequence[float] | float) -> VolumeGrid:
        """A grid with identity direction whose centre is the world origin (the isocentre)."""
        shape = _positive_tuple("shape", shape, 3, integer=True)
        if np.ndim(spacing_mm) == 0:
            spacing_mm = (spacing_mm,) * 3
        spacing_mm = _positive_tuple("spacing_mm", spacing_mm, 3)
        origin_zyx = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing_mm, strict=True)]
        return cls(shape, spacing_mm, tuple(origin_zyx[::-1]))

    @classmethod
    def from_sitk(cls, image) -> VolumeGrid:
        """The grid of a SimpleITK image (its spacing, origin and direction are kept)."""
        size_xyz = image.GetSize()
        spacing_xyz = image.GetSpacing()
        return cls(
            shape=tuple(size_xyz[::-1]),
            spacing_mm=tuple(spacing_xyz[::-1]),
            origin_xyz_mm=tuple(image.GetOrigin()),
            direction=tuple(image.GetDirection()),
        )

    @property
    def spacing_xyz_mm(self) -> tuple[float, float, float]:
        return self.spacing_mm[::-1]

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        return self.shape[::-1]

    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, np.float64).reshape(3, 3)

    def world_to_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(M, o)`` with continuous index ``(ix, iy, iz) = M @ (p_xyz_mm - o)``."""
        m = np.diag(1.0 / np.asarray(self.spacing_xyz_mm)) @ self.direction_matrix().T
        return m, np.asarray(self.origin_xyz_mm, np.float64)

    def index_to_world(self, index_xyz) -> np.ndarray:
        """World ``(x, y, z)`` mm of continuous ``(ix, iy, iz)`` indices, shape ``[..., 3]``."""
        idx = np.asarray(index_xyz, np.float64) * np.asarray(self.spacing_xyz_mm)
        return idx @ self.direction_matrix().T + np.asarray(self.origin_xyz_mm)

    def voxel_centers_xyz_mm(self) -> np.ndarray:
        """World coordinates of all voxel centres, ``[nz, ny, nx, 3]`` (x, y, z)."""
        iz, iy, ix = np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij")
        return self.index_to_world(np.stack([ix, iy, iz], axis=-1))


jax.tree_util.register_dataclass(
    VolumeGrid, data_fields=[], meta_fields=["shape", "spacing_mm", "origin_xyz_mm", "direction"]
)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Projection geometry of ``V`` views on a flat detector of ``det_shape = (rows, cols)``.

    Array fields are pytree leaves (so poses can be differentiated); ``kind`` and
    ``det_shape`` are static.

    Attributes:
      source_xyz_mm: ``[V, 3]`` source position (parallel beam: a point on the central
        ray at the source distance; rays start on the plane through it).
      det_center_xyz_mm: ``[V, 3]`` centre of the detector (between pixels for even sizes).
      det_u_xyz_mm: ``[V, 3]`` step from one column to the next (unit vector times pu).
      det_v_xyz_mm: ``[V, 3]`` step from one row to the next (unit vector times pv).
      kind: ``"cone"`` or ``"parallel"``.
      det_shape: ``(rows, cols)``.
    """

    source_xyz_mm: jax.Array
    det_center_xyz_mm: jax.Array
    det_u_xyz_mm: jax.Array
    det_v_xyz_mm: jax.Array
    kind: str = "cone"
    det_shape: tuple[int, int] = (1, 1)

    @property
    def num_views(self) -> int:
        return int(self.source_xyz_mm.shape[0])

    @property
    def num_rays(self) -> int:
        return self.num_views * self.det_shape[0] * self.det_shape[1]

    def pixel_centers_xyz_mm(self) -> jax.Array:
        """World position of every detector pixel, ``[V, rows, cols, 3]``."""
        rows, cols = self.det_shape
        r = jnp.arange(rows, dtype=self.det_u_xyz_mm.dtype) - (rows - 1) / 2.0
        c = jnp.arange(cols, dtype=self.det_u_xyz_mm.dtype) - (cols - 1) / 2.0
        return (
            self.det_center_xyz_mm[:, None, None, :]
            + r[None, :, None, None] * self.det_v_xyz_mm[:, None, None, :]
            + c[None, None, :, None] * self.det_u_xyz_mm[:, None, None, :]
        )

    def rays(self) -> tuple[jax.Array, jax.Array]:
        """Per-pixel rays: start points and unit directions, each ``[V, rows, cols, 3]``.

        Cone beam: from the source to each pixel. Parallel beam: from the plane through the
        source, along the central ray, to each pixel.
        """
        pix = self.pixel_centers_xyz_mm()
        src = jnp.broadcast_to(self.source_xyz_mm[:, None, None, :], pix.shape)
        if self.kind == "parallel":
            src = pix - (self.det_center_xyz_mm - self.source_xyz_mm)[:, None, None, :]
        vec = pix - src
        return src, vec / jnp.linalg.norm(vec, axis=-1, keepdims=True)

    def project_points(self, points_xyz_mm) -> np.ndarray:
        """Continuous ``(row, col)`` detector coordinates of world points, ``[V, P, 2]``.

        The closed-form pinhole (cone) or orthographic (parallel) projection, used to check
        the ray-driven projector and to place landmarks on DRRs.
        """
        p = np.asarray(points_xyz_mm, np.float64).reshape(-1, 3)
        src = np.asarray(self.source_xyz_mm, np.float64)[:, None, :]
        ctr = np.asarray(self.det_center_xyz_mm, np.float64)[:, None, :]
        u = np.asarray(self.det_u_xyz_mm, np.float64)[:, None, :]
        v = np.asarray(self.det_v_xyz_mm, np.float64)[:, None, :]
        normal = np.cross(u, v)
        if self.kind == "cone":
            d = p[None] - src
            s = np.sum((ctr - src) * normal, -1, keepdims=True) / np.sum(
                d * normal, -1, keepdims=True
            )
            hit = src + s * d
        else:
            axis = (ctr - src) / np.linalg.norm(ctr - src, axis=-1, keepdims=True)
            s = np.sum((ctr - p[None]) * normal, -1, keepdims=True) / np.sum(
                axis * normal, -1, keepdims=True
            )
            hit = p[None] + s * axis
        rel = hit - ctr
        rows, cols = self.det_shape
        col = np.sum(rel * u, -1) / np.sum(u * u, -1) + (cols - 1) / 2.0
        row = np.sum(rel * v, -1) / np.sum(v * v, -1) + (rows - 1) / 2.0
        return np.stack([row, col], axis=-1)


jax.tree_util.register_dataclass(
    Geometry,
    data_fields=["source_xyz_mm", "det_center_xyz_mm", "det_u_xyz_mm", "det_v_xyz_mm"],
    meta_fields=["kind", "det_shape"],
)


def _mm(a, b):
    """Matrix product at full float32 precision (GPUs default to TF32 for ``@``, which
    moves rays by tenths of a millimetre)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def rotation_y(angles_rad: jax.typing.ArrayLike) -> jax.Array:
    """Rotations about +y by ``angles_rad``, ``[V, 3, 3]`` (RTK's gantry rotation)."""
    a = jnp.asarray(angles_rad)
    c, s = jnp.cos(a), jnp.sin(a)
    z, o = jnp.zeros_like(a), jnp.ones_like(a)
    return jnp.stack(
        [jnp.stack([c, z, s], -1), jnp.stack([z, o, z], -1), jnp.stack([-s, z, c], -1)], -2
    )


def rotation_from_rotvec(rotvec: jax.typing.ArrayLike) -> jax.Array:
    """Rodrigues' formula: axis-angle vectors ``[..., 3]`` (radians) to matrices ``[..., 3, 3]``.

    Differentiable everywhere, including at the zero rotation (a Taylor branch avoids 0/0).
    """
    w = jnp.asarray(rotvec)
    theta2 = jnp.sum(w * w, axis=-1)[..., None, None]
    small = theta2 < 1e-8
    safe2 = jnp.where(small, 1.0, theta2)
    theta = jnp.sqrt(safe2)
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, (1.0 - jnp.cos(theta)) / safe2)
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack(
        [jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1), jnp.stack([-y, x, zero], -1)],
        -2,
    )
    eye = jnp.broadcast_to(jnp.eye(3, dtype=w.dtype), k.shape)
    return eye + a * k + b * _mm(k, k)


def _check_detector(det_shape, pixel_mm, sod_mm, sdd_mm):
    det_shape = _positive_tuple("det_shape", det_shape, 2, integer=True)
    if np.ndim(pixel_mm) == 0:
        pixel_mm = (pixel_mm, pixel_mm)
    pixel_mm = _positive_tuple("pixel_mm", pixel_mm, 2)
    sod = _positive_tuple("sod_mm", [sod_mm], 1)[0]
    sdd = _positive_tuple("sdd_mm", [sdd_mm], 1)[0]
    if sdd <= sod:
        raise ValueError(
            f"sdd_mm: the detector must lie beyond the isocentre, sdd_mm={sdd} <= sod_mm={sod}"
        )
    return det_shape, pixel_mm, sod, sdd


def from_poses(
    rotation: jax.typing.ArrayLike,
    translation_mm: jax.typing.ArrayLike,
    *,
    sod_mm: float,
    sdd_mm: float,
    det_shape: Sequence[int],
    pixel_mm: Sequence[float] | float,
    kind: Kind = "cone",
) -> Geometry:
    """Geometry from per-view poses mapping the camera frame to the world.

    Args:
      rotation: ``[V, 3, 3]`` rotation matrices (camera to world).
      translation_mm: ``[V, 3]`` translations (camera origin, the isocentre, in world mm).
      sod_mm: source to isocentre distance.
      sdd_mm: source to detector distance.
      det_shape: ``(rows, cols)``.
      pixel_mm: ``(pv, pu)`` pixel size (row pitch, column pitch), or one number.
      kind: ``"cone"`` or ``"parallel"``.

    Differentiable in ``rotation`` and ``translation_mm``.
    """
    if kind not in ("cone", "parallel"):
        raise ValueError(f"kind: expected 'cone' or 'parallel', got {kind!r}")
    det_shape, (pv, pu), sod, sdd = _check_detector(det_shape, pixel_mm, sod_mm, sdd_mm)
    rot = jnp.asarray(rotation)
    rot = rot.astype(jnp.result_type(rot.dtype, jnp.float32))  # float32, or float64 under x64
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or rot.shape[0] == 0:
        raise ValueError(f"rotation: expected shape [V>0, 3, 3], got {rot.shape}")
    t = jnp.asarray(translation_mm, rot.dtype)
    if t.shape != (rot.shape[0], 3):
        raise ValueError(f"translation_mm: expected shape [{rot.shape[0]}, 3], got {t.shape}")
    col = lambda v: jnp.asarray(v, rot.dtype)[None, :, None]  # noqa: E731
    world = lambda p: _mm(rot, col(p))[..., 0] + t  # noqa: E731
    direction = lambda v: _mm(rot, col(v))[..., 0]  # noqa: E731
    return Geometry(
        source_xyz_mm=world([0.0, 0.0, sod]),
        det_center_xyz_mm=world([0.0, 0.0, -(sdd - sod)]),
        det_u_xyz_mm=direction([pu, 0.0, 0.0]),
        det_v_xyz_mm=direction([0.0, pv, 0.0]),
        kind=kind,
        det_shape=det_shape,
    )


def from_pose_params(
    rotvec: jax.typing.ArrayLike, translation_mm: jax.typing.ArrayLike, **kwargs
) -> Geometry:
    """``from_poses`` with axis-angle rotations ``[V, 3]`` (radians): the form to optimise."""
    w = jnp.asarray(rotvec)
    return from_poses(
        rotation_from_rotvec(w.astype(jnp.result_type(w.dtype, jnp.float32))),
        translation_mm,
        **kwargs,
    )


def _angles(angles_deg) -> np.ndarray:
    a = np.asarray(angles_deg, np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("angles_deg: expected at least one view angle, got an empty list")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"angles_deg: expected finite angles, got {angles_deg!r}")
    return a


def circular_cone_beam(
    angles_deg: Sequence[float],
    *,
    sod_mm: float = 1000.0,
    sdd_mm: float = 1500.0,
    det_shape: Sequence[int] = (256, 256),
    pixel_mm: Sequence[float] | float = (1.0, 1.0),
) -> Geometry:
    """Circular cone-beam orbit about +y, RTK's ``AddProjection(sod, sdd, angle)`` per view."""
    a = _angles(angles_deg)
    rot = rotation_y(jnp.asarray(np.deg2rad(a), jnp.float32))
    return from_poses(
        rot,
        jnp.zeros((a.size, 3), jnp.float32),
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        det_shape=det_shape,
        pixel_mm=pixel_mm,
        kind="cone",
    )


def circular_parallel_beam(
    angles_deg: Sequence[float],
    *,
    det_shape: Sequence[int] = (256, 256),
    pixel_mm: Sequence[float] | float = (1.0, 1.0),
    sod_mm: float = 1000.0,
    sdd_mm: float = 1500.0,
) -> Geometry:
    """Parallel-beam views on the same circular orbit (rays parallel to each central ray).

    ``sod_mm`` and ``sdd_mm`` only bound where rays start and end; the volume must lie
    within ``sod_mm`` of the isocentre.
    """
    a = _angles(angles_deg)
    rot = rotation_y(jnp.asarray(np.deg2rad(a), jnp.float32))
    return from_poses(
        rot,
        jnp.zeros((a.size, 3), jnp.float32),
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        det_shape=det_shape,
        pixel_mm=pixel_mm,
        kind="parallel",
    )


def evenly_spaced_angles(
    num_views: int, arc_deg: float = 180.0, start_deg: float = 0.0
) -> np.ndarray:
    """``num_views`` gantry angles over ``arc_deg`` (endpoint excluded), degrees."""
    if int(num_views) < 1:
        raise ValueError(f"num_views: expected >= 1, got {num_views}")
    return start_deg + np.arange(int(num_views)) * (arc_deg / int(num_views))


def nested_view_angles(num_views: int, arc_deg: float = 180.0) -> np.ndarray:
    """``num_views`` angles over ``arc_deg``, ordered so that every prefix is well spread.

    Datasets store views in this order so that the first 2, 4 or 8 make a sensible subset:
    for 8 views over 180 degrees, ``[0, 90, 45, 135, 22.5, 112.5, 67.5, 157.5]`` (the first
    two are a PA and a lateral view). Greedy farthest-point ordering on the circle of
    period ``arc_deg``.
    """
    if int(num_views) < 1:
        raise ValueError(f"num_views: expected >= 1, got {num_views}")
    grid_deg = np.arange(int(num_views)) * (arc_deg / int(num_views))
    order = [0]
    remaining = list(range(1, int(num_views)))
    while remaining:

        def gap(i):
            d = np.abs(grid_deg[i] - grid_deg[order])
            return np.min(np.minimum(d, arc_deg - d))

        best = max(remaining, key=lambda i: (round(gap(i), 9), -i))
        order.append(best)
        remaining.remove(best)
    return grid_deg[order]


# ------------------------------------------------------------------------------------------
# The acquisition: the one owner of sod, sdd, detector and reconstruction cube


#: Source to isocentre and source to detector distances of every xct dataset and model
#: unless a config says otherwise (a chest radiography / CBCT set-up).
DEFAULT_SOD_MM = 1000.0
DEFAULT_SDD_MM = 1500.0


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """A circular cone-beam acquisition and the cube it reconstructs.

    The volume is the centred cube of ``resolution^3`` voxels and side ``fov_mm``; every
    view is a flat ``resolution x resolution`` detector of ``detector_pixel_mm`` pixels on
    the orbit about +y (``circular_cone_beam``). A config's ``geometry`` section holds
    exactly these fields: ``Acquisition(**config.geometry)``.

    Attributes:
      resolution: voxels per side of the cube = detector pixels per side.
      fov_mm: side of the cube in mm.
      sod_mm: source to isocentre distance (mm).
      sdd_mm: source to detector distance (mm).
      pixel_mm: detector pixel (mm); 0 or None: the smallest detector that sees the whole
        cylinder inscribed in the cube (``inscribed_pixel_mm``).
      arc_deg: the arc the nested view angles spread over (degrees).

    Hashable, so it can be a static field of a Flax module or a ``jit`` static argument.
    """

    resolution: int = 64
    fov_mm: float = 400.0
    sod_mm: float = DEFAULT_SOD_MM
    sdd_mm: float = DEFAULT_SDD_MM
    pixel_mm: float | None = None
    arc_deg: float = 180.0

    def __post_init__(self):
        res = _positive_tuple("geometry.resolution", [self.resolution], 1, integer=True)[0]
        if res < 2:
            raise ValueError(f"geometry.resolution: expected >= 2 voxels, got {res}")
        object.__setattr__(self, "resolution", res)
        for name in ("fov_mm", "sod_mm", "sdd_mm", "arc_deg"):
            value = _positive_tuple(f"geometry.{name}", [getattr(self, name)], 1)[0]
            object.__setattr__(self, name, value)
        if self.sdd_mm <= self.sod_mm:
            raise ValueError(
                f"geometry.sdd_mm: the detector must lie beyond the isocentre, "
                f"sdd_mm={self.sdd_mm} <= sod_mm={self.sod_mm}"
            )
        if self.sod_mm <= self.fov_mm * np.sqrt(2.0) / 2.0:
            raise ValueError(
                f"geometry.sod_mm: the source ({self.sod_mm} mm) must stay outside the "
                f"fov_mm={self.fov_mm} cube"
            )
        if self.pixel_mm:
            pixel = _positive_tuple("geometry.pixel_mm", [self.pixel_mm], 1)[0]
            object.__setattr__(self, "pixel_mm", pixel)
        else:
            object.__setattr__(self, "pixel_mm", None)

    @property
    def voxel_mm(self) -> float:
        return self.fov_mm / self.resolution

    @property
    def det_shape(self) -> tuple[int, int]:
        return (self.resolution, self.resolution)

    @property
    def detector_pixel_mm(self) -> float:
        """The detector pixel: ``pixel_mm`` or, when unset, ``inscribed_pixel_mm``."""
        return self.pixel_mm or inscribed_pixel_mm(
            self.resolution, self.fov_mm, self.sod_mm, self.sdd_mm
        )

    @property
    def detector_width_mm(self) -> float:
        """Physical side of the square detector."""
        return self.resolution * self.detector_pixel_mm

    def grid(self) -> VolumeGrid:
        """The reconstruction cube: ``resolution^3`` voxels centred on the isocentre."""
        return VolumeGrid.centered((self.resolution,) * 3, self.voxel_mm)

    def view_angles(self, num_views: int) -> np.ndarray:
        """``num_views`` angles (degrees, float32) in the datasets' nested order."""
        return nested_view_angles(num_views, self.arc_deg).astype(np.float32)

    def orbit(
        self,
        angles_deg: jax.typing.ArrayLike,
        *,
        det_shape: Sequence[int] | None = None,
        isocenter_xyz_mm: jax.typing.ArrayLike | None = None,
    ) -> Geometry:
        """The cone-beam views at ``angles_deg [V]`` (may be traced: this is jit-safe).

        ``det_shape``: the same physical detector sampled at ``(rows, cols)`` pixels
        (coarser feature maps); default ``det_shape``. ``isocenter_xyz_mm [3]``: where the
        isocentre lies in the frame of a centred volume grid, i.e. ``-c`` for a cube whose
        centre sits at ``c`` in the world (a patch or a slab); default 0.
        """
        a = jnp.asarray(angles_deg)
        a = a.astype(jnp.result_type(a.dtype, jnp.float32)).reshape(-1)
        if det_shape is None:
            rows, cols = self.det_shape
            pixel = (self.detector_pixel_mm, self.detector_pixel_mm)
        else:
            rows, cols = (int(n) for n in det_shape)
            pixel = (self.detector_width_mm / rows, self.detector_width_mm / cols)
        if isocenter_xyz_mm is None:
            t = jnp.zeros((a.shape[0], 3), a.dtype)
        else:
            t = jnp.broadcast_to(jnp.asarray(isocenter_xyz_mm, a.dtype), (a.shape[0], 3))
        return from_poses(
            rotation_y(jnp.deg2rad(a)),
            t,
            sod_mm=self.sod_mm,
            sdd_mm=self.sdd_mm,
            det_shape=(rows, cols),
            pixel_mm=pixel,
        )


def inscribed_pixel_mm(resolution: int, fov_mm: float, sod_mm: float, sdd_mm: float) -> float:
    """The pixel of a ``resolution``-pixel detector that sees the whole cylinder inscribed
    in the centred ``fov_mm`` cube (radius and half-height ``fov/2``, axis y): its edge
    nearest to the source is magnified most."""
    half = (fov_mm / 2.0) * sdd_mm / (sod_mm - fov_mm / 2.0)
    return 2.0 * half / resolution
