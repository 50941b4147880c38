"""Procedural toy backgrounds: a wall, a horizon and a textured floor or table top in perspective.

All images are float64 arrays in [0, 255] computed with whole-array numpy operations (float64 so
that SIMD differences between CPUs stay far below the uint8 rounding step). Textures
live in floor coordinates (``u`` across, ``z`` into the scene) so that planks and veins converge
to the horizon, and fine detail fades where a pixel covers more texture than it can show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Scene:
    """Background parameters of one toy sample (pixel units, RGB in [0, 255])."""

    resolution: int
    horizon: float  # y of the wall/floor line
    edge: float  # y of a table's front edge; == resolution for a floor
    floor_rgb: np.ndarray
    wall_rgb: np.ndarray
    material: str
    glossy: bool
    light: np.ndarray  # unit vector towards the light (x right, y up, z to the camera)
    tint: np.ndarray  # RGB multipliers of the light colour
    surface: str = "floor"  # "table" or "floor" (prompt words)
    light_name: str = "front"
    tint_name: str = "soft"

    def floor_region(self, y: np.ndarray) -> np.ndarray:
        """Rows of the horizontal surface that shadows and reflections fall on."""
        return (y >= self.horizon) & (y < self.edge)


def pixel_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` as float64 arrays of shape (H, W)."""
    axis = np.arange(resolution) + 0.5
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return x, y


def value_noise(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1]: ``grid`` (a G x G random table, G a power of two, tiled)
    sampled at ``(u, v)``."""
    size = grid.shape[0]
    flat = grid.ravel()
    u0 = np.floor(u)
    v0 = np.floor(v)
    fu = u - u0
    fv = v - v0
    fu = fu * fu * (3 - 2 * fu)
    fv = fv * fv * (3 - 2 * fv)
    i0 = u0.astype(np.int64) & (size - 1)
    j0 = (v0.astype(np.int64) & (size - 1)) * size
    i1 = (i0 + 1) & (size - 1)
    j1 = (j0 + size) & (size * size - 1)
    top = flat[j0 + i0] + (flat[j0 + i1] - flat[j0 + i0]) * fu
    bottom = flat[j1 + i0] + (flat[j1 + i1] - flat[j1 + i0]) * fu
    return top + (bottom - top) * fv


def fbm(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, octaves: int = 3) -> np.ndarray:
    """Fractal noise in about [-1, 1]: ``octaves`` value-noise layers, each twice the frequency."""
    total = np.zeros(u.shape)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        grid = rng.random((16, 16))
        scale = 2.0**octave
        total += amplitude * (value_noise(grid, u * scale, v * scale) * 2 - 1)
        norm += amplitude
        amplitude *= 0.5
    return total / norm


def _fade(frequency: float, footprint: np.ndarray) -> np.ndarray:
    """Contrast left to a pattern of ``frequency`` when a pixel spans ``footprint`` texture units."""
    return np.clip(1.0 - 2.0 * frequency * footprint, 0.0, 1.0)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _wood(rng: np.random.Generator, u, z, fu, fz) -> np.ndarray:
    across = rng.random() < 0.5  # planks running across the view or into it
    coord, other, foot = (z, u, fz) if across else (u, z, fu)
    width = rng.uniform(0.18, 0.4) * (2.5 if across else 1.0)
    plank = np.floor(coord / width)
    shades = rng.uniform(0.82, 1.12, size=64)
    shade = shades[plank.astype(np.int64) % 64]
    grain_freq = rng.uniform(6, 12) / width
    warp = fbm(rng, other * 1.5, coord * 4.0, octaves=2)
    grain = np.sin(2 * np.pi * (coord * grain_freq + 1.5 * warp + plank * 0.37))
    grain = grain * 0.09 * _fade(grain_freq, foot)
    gap = (np.mod(coord / width, 1.0) < 0.06) * 0.35 * _fade(1 / width * 8, foot)
    return shade * (1 + grain) * (1 - gap)


def _marble(rng: np.random.Generator, u, z, fu, fz, base: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(1.5, 3.0)
    along = u * np.cos(angle) + z * 0.5 * np.sin(angle)
    turbulence = fbm(rng, u * 2.0, z * 1.0, octaves=3)
    veins = np.abs(np.sin(np.pi * (along * freq + 2.2 * turbulence))) ** 0.25
    veins = (1 - veins) * _fade(freq * 3, np.maximum(fu, fz * 0.5))
    target = base * 0.45 if _luminance(base) > 90 else base + (255 - base) * 0.5
    cloud = 1 + 0.05 * fbm(rng, u * 3, z * 1.5, octaves=2)
    return base * cloud[..., None] + (target - base) * (0.8 * veins)[..., None]


def _fabric(rng: np.random.Generator, u, z, fu, fz, x, y) -> np.ndarray:
    folds = fbm(rng, u * 1.2, z * 0.6, octaves=2)
    weave_freq = rng.uniform(14, 24)
    weave = np.sin(2 * np.pi * u * weave_freq) * np.sin(2 * np.pi * z * weave_freq)
    weave = weave * _fade(weave_freq, np.maximum(fu, fz))
    fuzz = value_noise(rng.random((64, 64)), x * 0.9, y * 0.9) - 0.5
    return 1 + 0.12 * folds + 0.07 * weave + 0.12 * fuzz


def first_row_below(level: float) -> int:
    """Index of the first pixel row whose centre lies at or below ``y = level``."""
    return max(int(np.ceil(level - 0.5)), 0)


def render_background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene without any product: float64 (H, W, 3) in [0, 255] (not yet clipped)."""
    res = scene.resolution
    x, y = pixel_grid(res)
    light_x, light_y, light_z = (float(c) for c in scene.light)
    split = first_row_below(scene.horizon)
    image = np.empty((res, res, 3))

    # Wall: paint with faint plaster noise, lit from the light's side.
    wx, wy = x[:split], y[:split]
    wall_shade = 1 + 0.04 * fbm(rng, wx / res * 6, wy / res * 6, octaves=2)
    wall_shade += 0.12 * light_x * (2 * wx / res - 1) + 0.06 * light_y * (1 - wy / max(scene.horizon, 1))
    image[:split] = scene.wall_rgb * wall_shade[..., None]

    # Floor: perspective coordinates, texture, light falloff, contact darkening at the wall.
    fx, fy = x[split:], y[split:]
    depth = np.maximum(fy - scene.horizon, 0.5)
    u = (fx - res / 2) / depth
    z = 0.5 * res / depth
    fu = 1.0 / depth  # texture units per pixel across
    fz = 0.5 * res / depth**2  # and into the scene
    base = scene.floor_rgb
    if scene.material == "wood":
        floor = base * _wood(rng, u, z, fu, fz)[..., None]
    elif scene.material == "marble":
        floor = _marble(rng, u, z, fu, fz, base)
    elif scene.material == "fabric":
        floor = base * _fabric(rng, u, z, fu, fz, fx, fy)[..., None]
    else:
        floor = base * (1 + 0.025 * fbm(rng, u * 2, z, octaves=2))[..., None]
    near = (fy - scene.horizon) / max(res - scene.horizon, 1)
    floor_shade = 1 + 0.1 * light_x * (2 * fx / res - 1) + 0.08 * light_z * (near - 0.5)
    floor_shade -= 0.12 * np.exp(-np.maximum(fy - scene.horizon, 0) / (0.04 * res))
    image[split:] = floor * floor_shade[..., None]

    # A table's front face: darker, with a bright lip along the edge.
    edge = first_row_below(scene.edge)
    if edge < res:
        face = image[edge - 1] * 0.62
        lip = np.where(y[edge:, :1] - scene.edge < max(res / 64, 1.0), 1.25, 1.0)
        image[edge:] = face[None] * lip[..., None]
    return image * scene.tint
