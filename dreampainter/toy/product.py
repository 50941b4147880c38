"""Procedural toy products: 2-D signed-distance shapes with 3-D-looking shading and highlights.

A product is a list of :class:`Part` (drawn in order). Each part has a signed distance function
(pixels, negative inside) and a paint function giving its shaded colour; coverage is the usual
one-pixel antialiasing ramp, so a pixel belongs to the product exactly when some part's distance
is below half a pixel. The silhouette (the union of parts) is reused to cast the shadow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]
Normal = tuple[np.ndarray, np.ndarray, np.ndarray]

# Widths of each family relative to its height (min, max).
FAMILY_ASPECT = {
    "bottle": (0.3, 0.45),
    "box": (0.8, 1.5),
    "can": (0.5, 0.7),
    "jar": (0.7, 1.0),
    "sphere": (1.0, 1.0),
    "shoe": (1.8, 2.4),
}
_TRIM_COLOURS = np.array(
    [(240, 240, 236), (30, 30, 34), (190, 190, 196), (200, 165, 80), (140, 140, 144)], dtype=np.float64
)


@dataclass
class Part:
    sdf: Field
    paint: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x, y) -> shaded RGB (..., 3)


# --- signed distance primitives (pixel units) -------------------------------------------------


def sd_box(cx: float, cy: float, hw: float, hh: float, radius: float = 0.0) -> Field:
    """A rounded rectangle centred at (cx, cy) with half sizes (hw, hh)."""

    def sdf(x, y):
        qx = np.abs(x - cx) - hw + radius
        qy = np.abs(y - cy) - hh + radius
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - radius

    return sdf


def sd_ellipse(cx: float, cy: float, rx: float, ry: float) -> Field:
    """An axis-aligned ellipse; distance to first order (the implicit function over its gradient)."""

    def sdf(x, y):
        dx, dy = x - cx, y - cy
        k0 = np.hypot(dx / rx, dy / ry)
        k1 = np.hypot(dx / (rx * rx), dy / (ry * ry))
        return np.where(k1 > 1e-9, k0 * (k0 - 1) / np.maximum(k1, 1e-9), -min(rx, ry))

    return sdf


def sd_polygon(points: list[tuple[float, float]]) -> Field:
    """A convex polygon: inside, the largest signed distance to its edge lines; outside, the
    distance to the nearest edge segment (exact, so acute corners do not bleed)."""
    pts = np.asarray(points, dtype=np.float64)
    centre = pts.mean(axis=0)
    edges = []
    for p0, p1 in zip(pts, np.roll(pts, -1, axis=0)):
        direction = p1 - p0
        normal = np.array([direction[1], -direction[0]]) / np.hypot(*direction)
        if normal @ (centre - p0) > 0:
            normal = -normal
        edges.append((p0, direction, normal))

    def sdf(x, y):
        inside = np.full(x.shape, -np.inf)
        outside = np.full(x.shape, np.inf)
        for p0, direction, normal in edges:
            px, py = x - p0[0], y - p0[1]
            inside = np.maximum(inside, normal[0] * px + normal[1] * py)
            t = np.clip((px * direction[0] + py * direction[1]) / (direction @ direction), 0, 1)
            outside = np.minimum(outside, np.hypot(px - t * direction[0], py - t * direction[1]))
        return np.where(inside > 0, outside, inside)

    return sdf


def sd_union(*fields: Field) -> Field:
    def sdf(x, y):
        return np.min(np.stack([field(x, y) for field in fields]), axis=0)

    return sdf


# --- shading ------------------------------------------------------------------------------------


def cylinder_normal(cx: float, half_width: float):
    def normal(x, y):
        nx = np.clip((x - cx) / half_width, -1, 1)
        return nx, np.zeros_like(nx), np.sqrt(1 - nx * nx)

    return normal


def dome_normal(cx: float, cy: float, rx: float, ry: float, flatten: float = 0.0):
    """Normals of an ellipsoid seen face on; ``flatten`` blends towards facing the camera."""

    def normal(x, y):
        nx = np.clip((x - cx) / rx, -1, 1) * (1 - flatten)
        ny = np.clip((cy - y) / ry, -1, 1) * (1 - flatten)
        nz = np.sqrt(np.maximum(1 - nx * nx - ny * ny, 0))
        return nx, ny, nz

    return normal


def flat_normal(nx: float, ny: float, nz: float):
    def normal(x, y):
        ones = np.ones_like(x)
        return ones * nx, ones * ny, ones * nz

    return normal


def shaded(colour: np.ndarray, normal, light: np.ndarray, specular: float, shininess: float):
    """Paint function: Lambert diffuse + Blinn-Phong highlight + a rim when lit from behind."""
    half = light + np.array([0.0, 0.0, 1.0])
    half = half / np.linalg.norm(half)

    def paint(x, y):
        nx, ny, nz = normal(x, y)
        diffuse = np.maximum(nx * light[0] + ny * light[1] + nz * light[2], 0)
        highlight = np.maximum(nx * half[0] + ny * half[1] + nz * half[2], 0) ** shininess
        rim = (1 - nz) ** 3 * max(-float(light[2]), 0.0) * 0.6
        value = colour * (0.4 + 0.7 * diffuse)[..., None]
        return value + (255 * (specular * highlight + rim))[..., None]

    return paint


# --- families -----------------------------------------------------------------------------------


def _trim(rng: np.random.Generator) -> np.ndarray:
    return _TRIM_COLOURS[int(rng.integers(len(_TRIM_COLOURS)))]


def _material(rng: np.random.Generator) -> tuple[float, float]:
    """(specular strength, shininess): from matte plastic to glossy lacquer."""
    return float(rng.uniform(0.05, 0.6)), float(rng.uniform(8, 48))


def _bottle(rng, cx, base, w, h, colour, light) -> list[Part]:
    spec, shine = _material(rng)
    wb, ell = w / 2, rng.uniform(0.1, 0.2) * w / 2
    neck_w = wb * rng.uniform(0.28, 0.42)
    body_top = base - 0.55 * h
    body = sd_union(
        sd_box(cx, (body_top + base - ell) / 2, wb, (base - ell - body_top) / 2),
        sd_ellipse(cx, base - ell, wb, ell),
        sd_ellipse(cx, body_top, wb, 0.15 * h),
    )
    neck = sd_box(cx, base - 0.76 * h, neck_w, 0.14 * h)
    cap = sd_box(cx, base - 0.94 * h, neck_w * 1.15, 0.06 * h, radius=min(neck_w * 0.3, 0.03 * h))
    parts = [
        Part(body, shaded(colour, cylinder_normal(cx, wb), light, spec, shine)),
        Part(neck, shaded(colour, cylinder_normal(cx, neck_w), light, spec, shine)),
        Part(cap, shaded(_trim(rng), cylinder_normal(cx, neck_w * 1.15), light, 0.2, 16)),
    ]
    if rng.random() < 0.5:
        label = sd_box(cx, base - 0.3 * h, wb, 0.12 * h)
        parts.insert(1, Part(label, shaded(_trim(rng), cylinder_normal(cx, wb), light, 0.05, 8)))
    return parts


def _can(rng, cx, base, w, h, colour, light) -> list[Part]:
    spec, shine = _material(rng)
    wb, ell = w / 2, rng.uniform(0.12, 0.22) * w / 2
    body = sd_union(
        sd_box(cx, base - h / 2, wb, h / 2 - ell),
        sd_ellipse(cx, base - ell, wb, ell),
        sd_ellipse(cx, base - h + ell, wb, ell),
    )
    lid = sd_ellipse(cx, base - h + ell, wb * 0.9, ell * 0.8)
    silver = np.array([200, 200, 206])
    return [
        Part(body, shaded(colour, cylinder_normal(cx, wb), light, max(spec, 0.3), shine)),
        Part(lid, shaded(silver, flat_normal(0, 0.95, 0.3), light, 0.4, 12)),
    ]


def _jar(rng, cx, base, w, h, colour, light) -> list[Part]:
    spec, shine = _material(rng)
    wb = w / 2
    lid_h = rng.uniform(0.14, 0.22) * h
    body = sd_box(cx, base - (h - lid_h) / 2, wb, (h - lid_h) / 2, radius=0.25 * min(wb, h - lid_h))
    lid = sd_box(cx, base - h + lid_h / 2, wb * 0.88, lid_h / 2, radius=0.2 * lid_h)
    return [
        Part(body, shaded(colour, cylinder_normal(cx, wb), light, spec, shine)),
        Part(lid, shaded(_trim(rng), cylinder_normal(cx, wb * 0.88), light, 0.3, 20)),
    ]


def _sphere(rng, cx, base, w, h, colour, light) -> list[Part]:
    spec, shine = _material(rng)
    r = h / 2
    return [
        Part(
            sd_ellipse(cx, base - r, r, r),
            shaded(colour, dome_normal(cx, base - r, r, r), light, spec, shine),
        )
    ]


def _box(rng, cx, base, w, h, colour, light) -> list[Part]:
    """A carton seen from slightly above and to one side: front, top and side faces."""
    spec, _ = _material(rng)
    depth_x = rng.uniform(0.15, 0.3) * w * (1 if rng.random() < 0.5 else -1)
    depth_y = rng.uniform(0.12, 0.25) * h
    front_w, front_h = w - abs(depth_x), h - depth_y
    x0 = cx - w / 2 + (0 if depth_x > 0 else -depth_x)
    x1 = x0 + front_w
    top_y = base - front_h
    front = sd_polygon([(x0, base), (x0, top_y), (x1, top_y), (x1, base)])
    top = sd_polygon(
        [(x0, top_y), (x1, top_y), (x1 + depth_x, top_y - depth_y), (x0 + depth_x, top_y - depth_y)]
    )
    edge_x = x1 if depth_x > 0 else x0
    side = sd_polygon(
        [
            (edge_x, base),
            (edge_x, top_y),
            (edge_x + depth_x, top_y - depth_y),
            (edge_x + depth_x, base - depth_y),
        ]
    )
    side_nx = 0.85 if depth_x > 0 else -0.85
    return [
        Part(front, shaded(colour, flat_normal(0, 0, 1), light, spec * 0.3, 4)),
        Part(top, shaded(colour, flat_normal(0, 0.95, 0.3), light, spec * 0.3, 4)),
        Part(side, shaded(colour, flat_normal(side_nx, 0, 0.53), light, spec * 0.3, 4)),
    ]


def _shoe(rng, cx, base, w, h, colour, light) -> list[Part]:
    """A sneaker in side view: heel and toe caps over a vamp, on a contrasting sole."""
    spec, shine = _material(rng)
    facing = 1.0 if rng.random() < 0.5 else -1.0

    def at(fx: float) -> float:  # a fraction of the length from the heel, facing either way
        return cx + facing * (fx - 0.5) * w

    def pts(points):
        return [(at(fx), base - fy * h) for fx, fy in points]

    sole_h = rng.uniform(0.12, 0.18) * h
    ankle = sd_polygon(pts([(0.03, 0.1), (0.05, 0.85), (0.12, 1.0), (0.35, 0.95), (0.6, 0.5), (0.6, 0.1)]))
    toe_box = sd_polygon(pts([(0.4, 0.1), (0.4, 0.62), (0.85, 0.45), (0.97, 0.3), (0.98, 0.1)]))
    toe = sd_ellipse(at(0.85), base - 0.25 * h, 0.13 * w, 0.2 * h)
    sole = sd_box(cx, base - sole_h / 2, w / 2, sole_h / 2, radius=sole_h * 0.45)
    collar = sd_ellipse(at(0.22), base - 0.94 * h, 0.1 * w, 0.05 * h)
    upper_normal = dome_normal(cx, base - 0.45 * h, 0.55 * w, 0.6 * h, flatten=0.3)
    return [
        Part(sd_union(ankle, toe_box, toe), shaded(colour, upper_normal, light, spec, shine)),
        Part(collar, shaded(np.array([40, 36, 34]), flat_normal(0, 0, 1), light, 0.0, 1)),
        Part(sole, shaded(_trim(rng), flat_normal(0, 0.3, 0.95), light, 0.1, 8)),
    ]


_FAMILIES = {
    "bottle": _bottle,
    "box": _box,
    "can": _can,
    "jar": _jar,
    "sphere": _sphere,
    "shoe": _shoe,
}


def build_product(
    family: str,
    rng: np.random.Generator,
    cx: float,
    base: float,
    width: float,
    height: float,
    colour: np.ndarray,
    light: np.ndarray,
) -> list[Part]:
    """Parts of a ``family`` product inside the box ``[cx +- width/2] x [base - height, base]``."""
    return _FAMILIES[family](rng, cx, base, width, height, np.asarray(colour), light)


def silhouette(parts: list[Part]) -> Field:
    """Signed distance of the whole product (the union of its parts)."""
    return sd_union(*(part.sdf for part in parts))


def render_product(parts: list[Part], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied colour (..., 3) and coverage (...) of the product at pixel centres ``(x, y)``."""
    colour = np.zeros((*x.shape, 3))
    coverage = np.zeros(x.shape)
    for part in parts:
        alpha = np.clip(0.5 - part.sdf(x, y), 0, 1)
        covered = alpha > 0
        if not covered.any():
            continue
        paint = np.zeros_like(colour)
        paint[covered] = part.paint(x[covered], y[covered])
        colour = colour * (1 - alpha[..., None]) + paint * alpha[..., None]
        coverage = coverage * (1 - alpha) + alpha
    return colour, coverage
