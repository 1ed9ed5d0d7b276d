"""The phantoms' painting kit: world coordinates of the grid, bumpy ellipsoids, a painter, the table.

Shared by both generators (:mod:`procedural`, :mod:`labelmap`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..labels import ORGAN_CODE


class Grid:
    """Voxel-centre world coordinates (mm) of the canonical array, per axis."""

    def __init__(self, shape, spacing, origin):
        self.shape = shape
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)
        self.axes = [self.origin[i] + np.arange(shape[i]) * self.spacing[i] for i in range(3)]

    def box(self, center_zyx, radius_mm):
        """Slices of the array within ``radius_mm`` of a centre, or None if outside the grid."""
        sl = []
        for i in range(3):
            lo = int(np.floor((center_zyx[i] - radius_mm - self.origin[i]) / self.spacing[i]))
            hi = int(np.ceil((center_zyx[i] + radius_mm - self.origin[i]) / self.spacing[i])) + 1
            lo, hi = max(lo, 0), min(hi, self.shape[i])
            if lo >= hi:
                return None
            sl.append(slice(lo, hi))
        return tuple(sl)

    def coords(self, sl):
        z, y, x = (self.axes[i][sl[i]] for i in range(3))
        return z[:, None, None], y[None, :, None], x[None, None, :]


def rotation(rng, max_deg):
    """A random rotation (3x3 acting on (z, y, x) vectors) of at most ``max_deg`` about each axis."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclasses.dataclass
class Blob:
    """A rotated ellipsoid whose surface is bumped by a few low-frequency waves."""

    center: np.ndarray  # (z, y, x) mm
    semi: np.ndarray  # semi-axes (z, y, x) mm, before rotation
    rot: np.ndarray
    waves: np.ndarray  # (k, 3) directions
    phases: np.ndarray
    amp: float

    @classmethod
    def random(cls, rng, center, semi, max_deg=10.0, amp=0.08):
        return cls(
            np.asarray(center, float),
            np.asarray(semi, float),
            rotation(rng, max_deg),
            rng.normal(size=(3, 3)) * 2.0,
            rng.uniform(0, 2 * np.pi, 3),
            amp,
        )

    def radius_field(self, grid: Grid, margin=1.3):
        """(slices, rho): rho < 1 inside; None if the blob misses the grid."""
        sl = grid.box(self.center, float(self.semi.max()) * margin * (1 + self.amp))
        if sl is None:
            return None, None
        z, y, x = grid.coords(sl)
        d = [z - self.center[0], y - self.center[1], x - self.center[2]]
        r = self.rot
        u = [(r[0, i] * d[0] + r[1, i] * d[1] + r[2, i] * d[2]) / self.semi[i] for i in range(3)]
        rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        if self.amp:
            inv = 1.0 / np.maximum(rho, 1e-6)
            bump = sum(
                np.cos((w[0] * u[0] + w[1] * u[1] + w[2] * u[2]) * inv + p) for w, p in zip(self.waves, self.phases)
            )
            rho = rho / (1.0 + self.amp * bump / len(self.phases))
        return sl, rho

    def surface_point(self, direction):
        """A point on the ellipsoid surface along a unit direction (in the blob's own frame)."""
        d = np.asarray(direction, float)
        d = d / np.linalg.norm(d)
        t = 1.0 / np.sqrt(np.sum((d / self.semi) ** 2))
        return self.center + self.rot @ (d * t)


class Painter:
    def __init__(self, grid, hu, labels, allowed=None, organs=None):
        self.grid, self.hu, self.labels = grid, hu, labels
        self.allowed = allowed  # organs stay inside the skin, however a random draw places them
        # what each voxel is as an organ (labels.ORGANS codes): whatever is painted last owns the
        # voxel, so a blob with no organ (a kidney, a node, a lump) clears what was under it
        self.organs = organs

    def blob(self, blob: Blob, value, label=None, inside=1.0, texture=None, organ: str | None = None):
        sl, rho = blob.radius_field(self.grid)
        if sl is None:
            return None, None
        m = rho < inside
        if self.allowed is not None:
            m &= self.allowed[sl]
        v = self.hu[sl]
        v[m] = value if texture is None else (value + texture(rho)[m])
        if label is not None:
            self.labels[sl][m] = label
        if self.organs is not None:
            self.organs[sl][m] = ORGAN_CODE[organ] if organ else 0
        return sl, rho


def paint_table(rng, grid: Grid, hu: np.ndarray, y_back: float):
    """A curved table top (and its pad) below the patient, outside the body: every CT has one."""
    x = grid.axes[2]
    y0 = y_back + rng.uniform(0, 25)
    top = y0 + x**2 / rng.uniform(800, 3000)
    y = grid.axes[1][:, None]
    pad = (y > top - rng.uniform(0, 8)) & (y < top)
    board = (y >= top) & (y < top + rng.uniform(2, 6))
    hu[:, pad & (hu[0] < -500)] = rng.uniform(-150, -50)
    hu[:, board & (hu[0] < -500)] = rng.uniform(-200, 400)
