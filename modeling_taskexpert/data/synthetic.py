"""An embedded multi-task benchmark: procedurally generated 3-D scenes rendered by ray casting.

Every image shows a room (floor, up to three walls, open sky above) seen from a random camera,
with random spheres, boxes and vertical cylinders standing on the floor and up to two
articulated person-like figures built from a head and capsule limbs. Textures (checkers, stripes,
wave noise), directional light with cast shadows, ambient light, exposure and sensor noise make
the images non-trivial, while every label comes from the same ray hits as the pixels, so the
labels are exactly consistent with the image:

- semseg: `SEMSEG_CLASSES` (sky is a class; there are no unlabelled pixels),
- human_parts: the 7 PASCAL part groups on figure pixels, 0 elsewhere; no map when no figure is
  visible (as for PASCAL-Context images without persons),
- saliency: 1 on objects and figures, 0 on floor, walls and sky,
- normals: unit surface normals in the camera frame (x right, y up, z pointing from the scene
  towards the camera), invalid on sky,
- depth: metres along the camera's optical axis, 0 (invalid) on sky,
- edge: occlusion boundaries between instances (each object, figure, wall, the floor and the
  sky is one): where two 4-neighbouring pixels belong to different instances, the pixel of the
  nearer surface is a boundary pixel, so boundaries are one pixel wide and lie on the occluder.

Generation is deterministic: sample `i` of a split depends only on (seed, split, i), so the
output does not depend on the number of worker processes.
"""

import abc
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np

from ..task_definitions import PASCAL_HUMAN_PARTS_CLASSES, make_task_spec
from .labels import encode_depth, encode_normals, encode_png, encode_raw_png
from .schema import build_features, build_metadata, render_card
from .writer import DEFAULT_MAX_SHARD_BYTES, write_dataset

NAME = "synthetic"
TASKS = ("semseg", "human_parts", "saliency", "normals", "edge", "depth")
SEMSEG_CLASSES = ("floor", "wall", "sky", "sphere", "box", "cylinder", "person")
FLOOR, WALL, SKY, SPHERE, BOX, CYLINDER, PERSON = range(len(SEMSEG_CLASSES))
HUMAN_PART_CLASSES = PASCAL_HUMAN_PARTS_CLASSES  # figures carry the PASCAL-Context part groups
SALIENT_CLASSES = (SPHERE, BOX, CYLINDER, PERSON)
HEAD, TORSO, UPPER_ARM, LOWER_ARM, UPPER_LEG, LOWER_LEG = range(1, len(HUMAN_PART_CLASSES))
SPLIT_CODES = {"train": 0, "validation": 1}
BOUNDARY_TOLERANCE = 0.0075
# Defaults: generation of the default dataset takes about a minute on 2 cores.
DEFAULT_TRAIN_SIZE = 1000
DEFAULT_VAL_SIZE = 200
DEFAULT_IMAGE_SIZE = 128

_EPS = 1e-6
_NO_HIT = np.inf


# ----------------------------------------------------------------------------- materials


@dataclass
class Material:
    """Albedo as a function of the world position: a base colour with an optional pattern."""

    color: np.ndarray
    pattern: str = "solid"  # "solid" | "checker" | "stripes" | "noise"
    second_color: Optional[np.ndarray] = None
    scale: float = 1.0
    waves: Optional[np.ndarray] = None  # (K, 4): wave vector (3) and phase, for "noise" and "stripes"
    specular: float = 0.0

    def albedo(self, points: np.ndarray) -> np.ndarray:
        base = np.broadcast_to(self.color, points.shape).astype(np.float64)
        if self.pattern == "checker":
            cells = np.floor(points / self.scale).astype(np.int64).sum(axis=1) % 2 == 1
            return np.where(cells[:, None], self.second_color, base)
        if self.pattern == "stripes":
            phase = points @ self.waves[0, :3] + self.waves[0, 3]
            return np.where((np.sin(phase) > 0)[:, None], self.second_color, base)
        if self.pattern == "noise":
            value = np.sin(points @ self.waves[:, :3].T + self.waves[:, 3]).mean(axis=1)
            return base * (1.0 + self.scale * value)[:, None]
        return base


def _random_color(rng, saturation=(0.3, 0.9), value=(0.35, 0.95)) -> np.ndarray:
    """An RGB colour in [0, 1] from a random hue and the given saturation/value ranges."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value)
    channel = np.array([0.0, 2.0 / 3.0, 1.0 / 3.0])
    return val * (1.0 - sat + sat * (0.5 + 0.5 * np.cos(2 * np.pi * (hue + channel))))


def _random_material(rng, allow_patterns=True) -> Material:
    pattern = rng.choice(["solid", "checker", "stripes", "noise"]) if allow_patterns else "solid"
    color = _random_color(rng)
    waves = np.concatenate([rng.normal(size=(4, 3)) * rng.uniform(2.0, 8.0), rng.uniform(0, 2 * np.pi, (4, 1))], axis=1)
    return Material(
        color=color,
        pattern=str(pattern),
        second_color=np.clip(color * rng.uniform(0.4, 0.8) + rng.uniform(0, 0.3, 3), 0, 1),
        scale=rng.uniform(0.15, 0.5) if pattern == "checker" else rng.uniform(0.1, 0.3),
        waves=waves,
        specular=rng.choice([0.0, 0.3, 0.6]),
    )


# ----------------------------------------------------------------------------- primitives
# Each primitive returns, for rays (origins (N, 3) or (1, 3), unit directions (N, 3)), the ray
# parameter of the nearest hit in front of the origin (inf where missed) and, for hit points,
# the outward unit normal.


def _dot(a, b):
    return np.einsum("ij,ij->i", *np.broadcast_arrays(a, b))


@dataclass
class Primitive(abc.ABC):
    semantic: int
    instance: int
    material: Material
    part: int = 0

    @abc.abstractmethod
    def intersect(self, origins, directions):
        """Ray parameters t of the first hit of each ray (inf where it misses)."""

    @abc.abstractmethod
    def normal(self, points):
        """Unit surface normals at `points` on the primitive."""


@dataclass
class Rectangle(Primitive):
    """An axis-aligned rectangle `x[axis] = offset`, bounded on the two other axes."""

    axis: int = 1
    offset: float = 0.0
    facing: float = 1.0  # sign of the normal along `axis`
    low: np.ndarray = field(default_factory=lambda: np.full(3, -np.inf))
    high: np.ndarray = field(default_factory=lambda: np.full(3, np.inf))

    def intersect(self, origins, directions):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.offset - origins[:, self.axis]) / directions[:, self.axis]
        points = origins + t[:, None] * directions
        inside = np.all((points >= self.low) & (points <= self.high), axis=1)
        return np.where((t > _EPS) & inside, t, _NO_HIT)

    def normal(self, points):
        normals = np.zeros_like(points)
        normals[:, self.axis] = self.facing
        return normals


@dataclass
class Sphere(Primitive):
    center: np.ndarray = None
    radius: float = 1.0

    def intersect(self, origins, directions):
        offset = origins - self.center
        b = _dot(offset, directions)
        c = _dot(offset, offset) - self.radius**2
        disc = b * b - c
        root = np.sqrt(np.maximum(disc, 0.0))
        near, far = -b - root, -b + root
        t = np.where(near > _EPS, near, far)
        return np.where((disc >= 0) & (t > _EPS), t, _NO_HIT)

    def normal(self, points):
        return (points - self.center) / self.radius


@dataclass
class Box(Primitive):
    """A box standing on the floor, rotated by `yaw` about the vertical axis."""

    center: np.ndarray = None
    half: np.ndarray = None
    yaw: float = 0.0

    def _rotation(self):
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # world -> local

    def intersect(self, origins, directions):
        rotation = self._rotation()
        local_origins = (origins - self.center) @ rotation.T
        local_directions = directions @ rotation.T
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse = 1.0 / local_directions
            t1 = (-self.half - local_origins) * inverse
            t2 = (self.half - local_origins) * inverse
        t_near = np.nanmax(np.minimum(t1, t2), axis=1)
        t_far = np.nanmin(np.maximum(t1, t2), axis=1)
        t = np.where(t_near > _EPS, t_near, t_far)
        return np.where((t_near <= t_far) & (t > _EPS), t, _NO_HIT)

    def normal(self, points):
        rotation = self._rotation()
        local = (points - self.center) @ rotation.T / self.half
        axis = np.argmax(np.abs(local), axis=1)
        normals = np.zeros_like(points)
        normals[np.arange(len(points)), axis] = np.sign(local[np.arange(len(points)), axis])
        return normals @ rotation


@dataclass
class Cylinder(Primitive):
    """A vertical cylinder standing on the floor, with a flat top."""

    base: np.ndarray = None  # centre of the bottom disc
    radius: float = 1.0
    height: float = 1.0

    def intersect(self, origins, directions):
        ox, oz = origins[:, 0] - self.base[0], origins[:, 2] - self.base[2]
        dx, dz = directions[:, 0], directions[:, 2]
        a = dx * dx + dz * dz
        b = ox * dx + oz * dz
        c = ox * ox + oz * oz - self.radius**2
        disc = b * b - a * c
        with np.errstate(divide="ignore", invalid="ignore"):
            t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        y_side = origins[:, 1] + t_side * directions[:, 1] - self.base[1]
        side_ok = (disc >= 0) & (a > 0) & (t_side > _EPS) & (y_side >= 0) & (y_side <= self.height)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_top = (self.base[1] + self.height - origins[:, 1]) / directions[:, 1]
        px, pz = ox + t_top * dx, oz + t_top * dz
        top_ok = (t_top > _EPS) & (px * px + pz * pz <= self.radius**2)
        return np.minimum(np.where(side_ok, t_side, _NO_HIT), np.where(top_ok, t_top, _NO_HIT))

    def normal(self, points):
        relative = points - self.base
        normals = np.stack([relative[:, 0], np.zeros(len(points)), relative[:, 2]], axis=1) / self.radius
        on_top = relative[:, 1] >= self.height - 1e-6
        normals[on_top] = (0.0, 1.0, 0.0)
        return normals


@dataclass
class Capsule(Primitive):
    """A segment `start`-`end` swept by a sphere of `radius` (limbs and torso of the figures)."""

    start: np.ndarray = None
    end: np.ndarray = None
    radius: float = 0.1

    def intersect(self, origins, directions):
        axis = self.end - self.start
        offset = origins - self.start
        axis_len2 = axis @ axis
        axis_dir = directions @ axis
        axis_off = offset @ axis
        a = axis_len2 - axis_dir * axis_dir
        b = axis_len2 * _dot(offset, directions) - axis_off * axis_dir
        c = axis_len2 * _dot(offset, offset) - axis_off * axis_off - self.radius**2 * axis_len2
        disc = b * b - a * c
        with np.errstate(divide="ignore", invalid="ignore"):
            t_body = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        along = axis_off + t_body * axis_dir
        body_ok = (disc >= 0) & (along > 0) & (along < axis_len2) & (t_body > _EPS)
        # Otherwise the nearest hit, if any, is on the sphere capping the nearer end.
        cap_center = np.where((along <= 0)[:, None], self.start, self.end)
        cap_offset = origins - cap_center
        cb = _dot(cap_offset, directions)
        cc = _dot(cap_offset, cap_offset) - self.radius**2
        cap_disc = cb * cb - cc
        t_cap = -cb - np.sqrt(np.maximum(cap_disc, 0.0))
        cap_ok = (disc >= 0) & ~body_ok & (cap_disc > 0) & (t_cap > _EPS)
        return np.where(body_ok, t_body, np.where(cap_ok, t_cap, _NO_HIT))

    def normal(self, points):
        axis = self.end - self.start
        along = np.clip((points - self.start) @ axis / (axis @ axis), 0.0, 1.0)
        return (points - self.start - along[:, None] * axis) / self.radius


@dataclass
class Group:
    """Primitives tested together; rays missing the bounding sphere skip them all."""

    primitives: list
    center: Optional[np.ndarray] = None
    radius: float = np.inf
    casts_shadow: bool = True

    def candidates(self, origins, directions, best_t):
        """Indices of the rays that may hit a primitive of the group before `best_t`."""
        if self.center is None:
            return np.arange(len(directions))
        offset = origins - self.center
        b = _dot(offset, directions)
        disc = b * b - (_dot(offset, offset) - self.radius**2)
        inside = _dot(offset, offset) <= self.radius**2
        reach = -b + np.sqrt(np.maximum(disc, 0.0))
        near = -b - np.sqrt(np.maximum(disc, 0.0))
        return np.flatnonzero((disc >= 0) & (reach > _EPS) & ((near < best_t) | inside))


def _cast(origins, directions, groups, primitives):
    """Nearest hit of each ray: (t, index into `primitives` or -1)."""
    best_t = np.full(len(directions), _NO_HIT)
    best = np.full(len(directions), -1)
    index = {id(p): i for i, p in enumerate(primitives)}
    for group in groups:
        rays = group.candidates(origins, directions, best_t)
        if rays.size == 0:
            continue
        group_origins = origins if len(origins) == 1 else origins[rays]
        for primitive in group.primitives:
            t = primitive.intersect(group_origins, directions[rays])
            closer = t < best_t[rays]
            best_t[rays[closer]] = t[closer]
            best[rays[closer]] = index[id(primitive)]
    return best_t, best


# ----------------------------------------------------------------------------- scene


def _figure(rng, position, yaw, height, instance, skin, shirt, trousers) -> Group:
    """An articulated person-like figure standing at `position` (on the floor), facing `yaw`."""
    s = height / 1.75
    c, si = np.cos(yaw), np.sin(yaw)

    def world(x, y, z):  # figure frame (x right, y up, z forward) -> world offset
        return np.array([c * x + si * z, y, -si * x + c * z])

    def direction(sideways, down, forward):
        vector = np.array([sideways, -down, forward], dtype=np.float64)
        return vector / np.linalg.norm(vector)

    parts = []  # (part, start (figure frame), end (figure frame), radius, material)
    for side in (-1.0, 1.0):
        hip = np.array([0.09 * side, 0.95, 0.0]) * s
        swing, bend = rng.uniform(-0.5, 0.5), rng.uniform(0.0, 0.7)
        knee = hip + 0.45 * s * direction(0.05 * side, np.cos(swing), np.sin(swing))
        ankle = knee + 0.45 * s * direction(0.0, np.cos(swing - bend), np.sin(swing - bend))
        parts += [(UPPER_LEG, hip, knee, 0.07 * s, trousers), (LOWER_LEG, knee, ankle, 0.055 * s, trousers)]
        shoulder = np.array([0.2 * side, 1.42, 0.0]) * s
        raise_, swing_arm, elbow_bend = rng.uniform(0.05, 1.3), rng.uniform(-0.7, 0.7), rng.uniform(0.0, 1.2)
        elbow = shoulder + 0.3 * s * direction(np.sin(raise_) * side, np.cos(raise_) * np.cos(swing_arm), np.sin(swing_arm))
        forearm = direction(np.sin(raise_) * side, np.cos(raise_ + elbow_bend) * np.cos(swing_arm), np.sin(swing_arm + elbow_bend))
        wrist = elbow + 0.28 * s * forearm
        parts += [(UPPER_ARM, shoulder, elbow, 0.05 * s, shirt), (LOWER_ARM, elbow, wrist, 0.042 * s, skin)]
    parts.append((TORSO, np.array([0.0, 1.0, 0.0]) * s, np.array([0.0, 1.42, 0.0]) * s, 0.17 * s, shirt))
    # Stand on the floor: the lowest point of the figure touches y = 0.
    lowest = min(min(start[1], end[1]) - radius for _, start, end, radius, _ in parts)
    lift = np.array([0.0, -lowest, 0.0])
    origin = np.asarray(position, dtype=np.float64)
    primitives = [
        Capsule(PERSON, instance, material, part=part, start=origin + world(*(a + lift)), end=origin + world(*(b + lift)), radius=r)
        for part, a, b, r, material in parts
    ]
    head_center = origin + world(*(np.array([0.0, 1.62 * s, 0.0]) + lift))
    primitives.append(Sphere(PERSON, instance, skin, part=HEAD, center=head_center, radius=0.12 * s))
    return Group(primitives, center=origin + np.array([0.0, 0.9 * s + lift[1], 0.0]), radius=1.2 * s)


@dataclass
class Scene:
    groups: list
    light: np.ndarray  # unit vector towards the light
    ambient: float
    sun: float
    sky_top: np.ndarray
    sky_horizon: np.ndarray

    @property
    def primitives(self):
        return [p for g in self.groups for p in g.primitives]


def _random_scene(rng) -> tuple[Scene, dict]:
    """A random room with objects and figures, and a camera looking into it."""
    depth, left, right, wall_height = rng.uniform(6, 11), rng.uniform(2.5, 6), rng.uniform(2.5, 6), rng.uniform(2.2, 4.5)
    floor_material = _random_material(rng)
    floor_material.specular = 0.0
    room = [
        Rectangle(FLOOR, 1, floor_material, axis=1, offset=0.0, facing=1.0,
                  low=np.array([-left, -1.0, -depth]), high=np.array([right, 1.0, 2.0])),
        Rectangle(WALL, 2, _random_material(rng), axis=2, offset=-depth, facing=1.0,
                  low=np.array([-left, 0.0, -depth - 1]), high=np.array([right, wall_height, -depth + 1])),
        Rectangle(WALL, 3, _random_material(rng), axis=0, offset=-left, facing=1.0,
                  low=np.array([-left - 1, 0.0, -depth]), high=np.array([-left + 1, wall_height, 2.0])),
        Rectangle(WALL, 4, _random_material(rng), axis=0, offset=right, facing=-1.0,
                  low=np.array([right - 1, 0.0, -depth]), high=np.array([right + 1, wall_height, 2.0])),
    ]  # fmt: skip
    for wall in room[1:]:
        wall.material.specular = 0.0
    groups = [Group(room, casts_shadow=False)]

    camera = {
        "position": np.array([rng.uniform(-0.5, 0.5), rng.uniform(1.2, 2.2), rng.uniform(0.0, 1.0)]),
        "yaw": rng.uniform(-0.35, 0.35),
        "pitch": rng.uniform(-0.4, -0.05),
        "fov": np.deg2rad(rng.uniform(50, 70)),
    }
    footprints = []  # (x, z, radius) of what stands on the floor, to avoid interpenetration

    def is_free(x, z, radius):
        inside = -left + radius + 0.2 < x < right - radius - 0.2 and -depth + radius + 0.2 < z < -radius
        return inside and all((x - fx) ** 2 + (z - fz) ** 2 > (radius + fr + 0.05) ** 2 for fx, fz, fr in footprints)

    def first_free(radius, propose):
        """The first of up to 20 spots `propose()` gives where a footprint of `radius` is free (and taken), or None."""
        for _ in range(20):
            x, z = propose()
            if is_free(x, z, radius):
                footprints.append((x, z, radius))
                return x, z
        return None

    def place(radius):
        """A free floor spot for a footprint of `radius`, at least 2 m in front of z = 0."""
        return first_free(radius, lambda: (rng.uniform(-left + radius + 0.2, right - radius - 0.2),
                                           rng.uniform(-depth + radius + 0.2, -2.0 - radius)))  # fmt: skip

    def place_in_view(radius, nearest, farthest):
        """A free floor spot `nearest`-`farthest` metres ahead of the camera, within the middle of its field of view."""

        def propose():
            distance = rng.uniform(nearest, farthest)
            angle = camera["yaw"] + rng.uniform(-0.5, 0.5) * camera["fov"] / 2
            return camera["position"][0] + distance * np.sin(angle), camera["position"][2] - distance * np.cos(angle)

        return first_free(radius, propose)

    # Figures first, close to the camera: their parts must span enough pixels to be learnable at 128 px
    # (PASCAL-Context's people are mostly large too).
    instance = 5
    figures = []
    for _ in range(rng.choice([0, 1, 1, 2, 2])):
        height = rng.uniform(1.4, 1.9)
        spot = place_in_view(0.5 * height / 1.75 + 0.25, nearest=1.7, farthest=3.8)
        if spot is None:
            continue
        skin = Material(color=np.array([0.55, 0.38, 0.28]) * rng.uniform(0.6, 1.5))
        shirt, trousers = _random_material(rng, allow_patterns=rng.uniform() < 0.5), _random_material(rng, False)
        figures.append(_figure(rng, (spot[0], 0.0, spot[1]), rng.uniform(0, 2 * np.pi), height, instance, skin, shirt, trousers))
        instance += 1

    for _ in range(rng.integers(2, 7)):
        kind = rng.choice([SPHERE, BOX, CYLINDER])
        material = _random_material(rng)
        if kind == SPHERE:
            radius = rng.uniform(0.25, 0.8)
            spot = place(radius)
            if spot:
                primitive = Sphere(SPHERE, instance, material, center=np.array([spot[0], radius, spot[1]]), radius=radius)
        elif kind == BOX:
            half = rng.uniform([0.2, 0.2, 0.2], [0.7, 0.9, 0.7])
            spot = place(float(np.hypot(half[0], half[2])))
            if spot:
                primitive = Box(BOX, instance, material, center=np.array([spot[0], half[1], spot[1]]), half=half,
                                yaw=rng.uniform(0, np.pi))
        else:
            radius, height = rng.uniform(0.15, 0.5), rng.uniform(0.4, 2.0)
            spot = place(radius)
            if spot:
                primitive = Cylinder(CYLINDER, instance, material, base=np.array([spot[0], 0.0, spot[1]]),
                                     radius=radius, height=height)
        if spot:
            groups.append(Group([primitive]))
            instance += 1

    groups += figures

    azimuth, elevation = rng.uniform(-1.2, 1.2), rng.uniform(0.4, 1.2)
    light = np.array([np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation)])
    scene = Scene(
        groups=groups, light=light, ambient=rng.uniform(0.15, 0.4), sun=rng.uniform(0.7, 1.1),
        sky_top=_random_color(rng, (0.3, 0.7), (0.6, 1.0)), sky_horizon=np.array([0.9, 0.9, 0.92]) * rng.uniform(0.8, 1.0),
    )  # fmt: skip
    return scene, camera


def _camera_rays(camera: dict, size: int):
    """Unit ray directions (N, 3), the camera axes (right, up, forward), and d·forward per ray."""
    yaw, pitch = camera["yaw"], camera["pitch"]
    forward = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), -np.cos(yaw) * np.cos(pitch)])
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    half = np.tan(camera["fov"] / 2)
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(coords * half, -coords * half)
    directions = forward + x.reshape(-1, 1) * right + y.reshape(-1, 1) * up
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions, np.stack([right, up, forward])


def render_sample(seed: int, split: str, index: int, image_size: int, extras: bool = False) -> dict:
    """Render one sample: uint8 image, every label as arrays (see the module docstring), and the
    instance map (`instance`, int32, not stored) the boundaries come from. With `extras`, also what the Taskonomy
    style derives its tasks from: `euclidean_depth` (metres along the ray, 0 on sky), `shading` (the Lambert term of
    the light) and `normals_camera` (unit normals, (0, 0, 1) on sky)."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    scene, camera = _random_scene(rng)
    primitives = scene.primitives
    directions, axes = _camera_rays(camera, image_size)
    origin = camera["position"][None, :]
    t, hit = _cast(origin, directions, scene.groups, primitives)

    num_rays = len(directions)
    semantic = np.full(num_rays, SKY, dtype=np.uint8)
    parts = np.zeros(num_rays, dtype=np.uint8)
    instance = np.zeros(num_rays, dtype=np.int32)
    normals_world = np.zeros((num_rays, 3))
    albedo = np.zeros((num_rays, 3))
    specular = np.zeros(num_rays)
    points = origin + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
    for k, primitive in enumerate(primitives):
        rays = np.flatnonzero(hit == k)
        if rays.size == 0:
            continue
        semantic[rays], parts[rays], instance[rays] = primitive.semantic, primitive.part, primitive.instance
        normals_world[rays] = primitive.normal(points[rays])
        albedo[rays] = primitive.material.albedo(points[rays])
        specular[rays] = primitive.material.specular
    normals_world /= np.maximum(np.linalg.norm(normals_world, axis=1, keepdims=True), _EPS)
    is_hit = hit >= 0

    # Shading: ambient + sun (Lambert, cast shadows from objects and figures) + a specular highlight.
    shadow_rays = np.flatnonzero(is_hit & (normals_world @ scene.light > 0))
    shadow_origins = points[shadow_rays] + 1e-4 * normals_world[shadow_rays]
    shadow_directions = np.broadcast_to(scene.light, shadow_origins.shape)
    casters = [g for g in scene.groups if g.casts_shadow]
    blocked_t, _ = _cast(shadow_origins, np.ascontiguousarray(shadow_directions), casters, [p for g in casters for p in g.primitives])
    lit = np.zeros(num_rays)
    lit[shadow_rays] = np.isinf(blocked_t)
    lambert = np.clip(normals_world @ scene.light, 0, None) * lit
    reflected = directions - 2 * _dot(directions, normals_world)[:, None] * normals_world
    highlight = specular * np.clip(reflected @ scene.light, 0, None) ** 20 * lit
    color = albedo * (scene.ambient + scene.sun * lambert)[:, None] + highlight[:, None]
    elevation = np.clip(directions[:, 1], 0, 1)[:, None]
    sky = scene.sky_horizon * (1 - elevation) + scene.sky_top * elevation
    color = np.where(is_hit[:, None], color, sky)
    color = color * rng.uniform(0.8, 1.2) + rng.normal(0, 0.015, color.shape)
    image = np.clip(np.rint(color * 255), 0, 255).astype(np.uint8).reshape(image_size, image_size, 3)

    shape = (image_size, image_size)
    normals_camera = normals_world @ axes.T * np.array([1.0, 1.0, -1.0])  # (right, up, backwards)
    depth = np.where(is_hit, t * (directions @ axes[2]), 0.0).astype(np.float32)
    instance_map = instance.reshape(shape)
    parts_map = parts.reshape(shape)
    arrays = {
        "image": image,
        "semseg": semantic.reshape(shape),
        "human_parts": parts_map if (semantic == PERSON).any() else None,
        "saliency": np.isin(semantic, SALIENT_CLASSES).astype(np.uint8).reshape(shape),
        "normals": encode_normals(normals_camera.reshape(*shape, 3), is_hit.reshape(shape)),
        "edge": occlusion_boundaries(instance_map, depth.reshape(shape)),
        "instance": instance_map,
        "depth": depth.reshape(shape),
    }
    if extras:
        arrays["euclidean_depth"] = np.where(is_hit, t, 0.0).astype(np.float32).reshape(shape)
        arrays["shading"] = (np.clip(normals_world @ scene.light, 0, 1) * is_hit).reshape(shape)
        arrays["normals_camera"] = np.where(is_hit[:, None], normals_camera, [0.0, 0.0, 1.0]).reshape(*shape, 3)
    return arrays


def occlusion_boundaries(instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """{0, 1} uint8 map marking, for each pair of 4-neighbours of different instances, the nearer pixel.

    Depth 0 (sky) counts as infinitely far; equal depths (surfaces in contact) mark the pixel of
    the lower instance number.
    """
    distance = np.where(depth > 0, depth, np.inf)
    edge = np.zeros(instance.shape, dtype=bool)
    for first, second in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                          ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):  # fmt: skip
        differ = instance[first] != instance[second]
        first_in_front = (distance[first] < distance[second]) | (
            (distance[first] == distance[second]) & (instance[first] < instance[second])
        )
        edge[first] |= differ & first_in_front
        edge[second] |= differ & ~first_in_front
    return edge.astype(np.uint8)


def sample_id(split: str, index: int) -> str:
    return f"synthetic_{split}_{index:06d}"


def make_row(seed: int, image_size: int, split: str, sample_id_: str) -> dict:
    """Render the sample named `sample_id_` and encode it as a row of the schema."""
    index = int(sample_id_.rsplit("_", 1)[1])
    arrays = render_sample(seed, split, index, image_size)
    row = {"id": sample_id_, "image": encode_png(arrays["image"]), "depth": encode_depth(arrays["depth"])}
    for task in ("semseg", "human_parts", "saliency", "normals", "edge"):
        row[task] = None if arrays[task] is None else encode_png(arrays[task])
    return row


# --------------------------------------------------------------------------------------------------------------------
# Taskonomy style: the same scenes, with Taskonomy's 13 tasks stored as raw maps in its encodings
# --------------------------------------------------------------------------------------------------------------------
TASKONOMY_OBJECT_CLASSES = ("sphere", "box", "cylinder", "person")
TASKONOMY_SCENE_CLASSES = ("empty room", "objects only", "figures only", "objects and figures")
_NO_DEPTH = 65535


def taskonomy_task_kinds() -> dict:
    """The declarations of the Taskonomy style: Taskonomy's (data/taskonomy.py), the image-level tasks over this
    benchmark's classes."""
    from .taskonomy import TASK_KINDS

    kinds = {task: dict(declaration) for task, declaration in TASK_KINDS.items()}
    kinds["class_object"]["num_classes"] = len(TASKONOMY_OBJECT_CLASSES)
    kinds["class_object"]["description"] = "object classification (share of each object class)"
    kinds["class_scene"]["num_classes"] = len(TASKONOMY_SCENE_CLASSES)
    kinds["class_scene"]["description"] = "scene classification (soft label)"
    return kinds


def _gradient_magnitude(values: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.hypot(ndimage.sobel(values, axis=0), ndimage.sobel(values, axis=1))


def _corner_response(values: np.ndarray) -> np.ndarray:
    """|det| of the smoothed structure tensor: high at corners (the keypoint tasks' stand-in)."""
    from scipy import ndimage

    dy, dx = ndimage.sobel(values, axis=0), ndimage.sobel(values, axis=1)
    xx, yy, xy = (ndimage.gaussian_filter(v, 1.0) for v in (dx * dx, dy * dy, dx * dy))
    return np.abs(xx * yy - xy * xy)


def _scaled_uint(values: np.ndarray, high: float, dtype) -> np.ndarray:
    """`values` mapped to [0, high] by their 99th percentile, as integers of `dtype`."""
    top = float(np.percentile(values, 99)) or 1.0
    return np.clip(np.rint(values / top * high), 0, high).astype(dtype)


def taskonomy_arrays(arrays: dict) -> dict:
    """The raw Taskonomy-style maps (uint8 / uint16, as the raw release stores them) and soft labels of one rendered
    sample (`render_sample(..., extras=True)`)."""
    hit = arrays["depth"] > 0
    gray = arrays["image"].astype(np.float64).mean(axis=-1) / 255.0
    zbuffer = np.where(hit, np.clip(np.rint(arrays["depth"] * 512), 0, _NO_DEPTH - 1), _NO_DEPTH).astype(np.uint16)
    euclid = arrays["euclidean_depth"]
    euclidean = np.where(hit, np.clip(np.rint(euclid * 512), 0, _NO_DEPTH - 1), _NO_DEPTH).astype(np.uint16)
    normal = np.clip(np.rint((arrays["normals_camera"] + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    depth_m = np.where(hit, arrays["depth"], arrays["depth"].max(initial=1.0))
    from scipy import ndimage

    curvature = np.stack([ndimage.laplace(ndimage.gaussian_filter(depth_m, 1.0)) * k for k in (-10.0, 10.0)], -1)
    principal = np.zeros((*hit.shape, 3), np.uint8)
    principal[..., 0] = np.clip(np.rint(123.572 + 31.922 * curvature[..., 0]), 0, 255)
    principal[..., 1] = np.clip(np.rint(120.1 + 21.658 * curvature[..., 1]), 0, 255)
    instance = arrays["instance"].astype(np.int64)
    depth_bins = np.floor(depth_m).astype(np.int64)
    semantic = arrays["semseg"]
    object_pixels = np.array([(semantic == c).sum() for c in (SPHERE, BOX, CYLINDER, PERSON)], dtype=np.float64)
    has_objects, has_figures = object_pixels[:3].sum() > 0, object_pixels[3] > 0
    scene = 2 * int(has_figures) + int(has_objects)
    scene_label = np.full(len(TASKONOMY_SCENE_CLASSES), 0.05)
    scene_label[scene] = 1.0 - 0.05 * (len(TASKONOMY_SCENE_CLASSES) - 1)
    return {
        "class_object": (object_pixels / object_pixels.sum()).tolist() if object_pixels.sum() else None,
        "class_scene": scene_label.tolist(),
        "depth_euclidean": euclidean,
        "depth_zbuffer": zbuffer,
        "edge_occlusion": (arrays["edge"].astype(np.uint16) * 300),
        "edge_texture": _scaled_uint(_gradient_magnitude(gray), 5000, np.uint16),
        "keypoints2d": _scaled_uint(_corner_response(gray), 320, np.uint16),
        "keypoints3d": _scaled_uint(_corner_response(depth_m), 60000, np.uint16),
        "normal": normal,
        "principal_curvature": principal,
        "reshading": np.clip(np.rint(arrays["shading"] * 255), 0, 255).astype(np.uint8),
        "segment_unsup2d": ((instance * 37) % 256).astype(np.uint8),
        "segment_unsup25d": ((instance * 53 + depth_bins * 17) % 256).astype(np.uint8),
    }


def make_taskonomy_row(seed: int, image_size: int, split: str, sample_id_: str) -> dict:
    """The Taskonomy-style row of the sample named `sample_id_`: raw maps as PNG, soft labels as lists."""
    index = int(sample_id_.rsplit("_", 1)[1])
    arrays = render_sample(seed, split, index, image_size, extras=True)
    row = {"id": sample_id_, "image": encode_png(arrays["image"])}
    for task, value in taskonomy_arrays(arrays).items():
        row[task] = value if value is None or isinstance(value, list) else encode_raw_png(value)
    return row


CARD_BODY = f"""\
A procedurally generated multi-task benchmark embedded in `modeling_taskexpert` (no download):
rooms with a floor, walls and open sky, random spheres, boxes and cylinders, and articulated
person-like figures, rendered by ray casting with textures (checkers, stripes, wave noise), a
directional light with cast shadows, ambient light, exposure changes and sensor noise. All labels
come from the same ray hits as the pixels, so they are exactly consistent with the image.
Generated by `python -m modeling_taskexpert.data synthetic`; the same seed gives the same data.

## Labels
- `semseg`: {len(SEMSEG_CLASSES)} classes ({", ".join(SEMSEG_CLASSES)}); every pixel is labelled.
- `human_parts`: the 7 PASCAL-Context part groups ({", ".join(HUMAN_PART_CLASSES)}) on figure
  pixels, 0 elsewhere; no map (None) where no figure is visible.
- `saliency`: 1 on objects and figures, 0 on floor, walls and sky.
- `normals`: unit surface normals in the camera frame, x to the right, y up, z pointing from the
  scene towards the camera; (0, 0, 0) = invalid on sky.
- `depth`: metres along the optical axis; 0 (invalid) on sky.
- `edge`: occlusion boundaries between instances (each object, figure, wall, the floor and the
  sky is one): where two 4-neighbouring pixels belong to different instances, the pixel of the
  nearer surface (ties: the lower instance number) is marked. Evaluation tolerance
  {BOUNDARY_TOLERANCE} of the diagonal.
"""

TASKONOMY_CARD_BODY = """\
The package's procedural scenes (see the `synthetic` dataset) with Taskonomy's 13 tasks, generated by
`python -m modeling_taskexpert.data synthetic --style taskonomy`, stored in Taskonomy's raw encodings (16-bit depth
in 1/512 m with 65535 = no depth (sky), 8-bit normals and reshading, 16-bit edges and keypoints, curvature around
(123.572, 120.1)) and read back through the same `decode` steps as the converted Taskonomy, so that a model and
recipe for Taskonomy train on it offline. Stand-ins where the scene has no such annotation: texture edges are the
image gradient, the keypoint maps a corner response of the image (2D) and of the depth (3D), curvature the Laplacian
of the depth, the unsupervised segments hash the instances (2D) and instances with 1 m depth bins (2.5D), reshading
is the Lambert term of the light. `class_object` is the share of each object class among the object pixels (no
label without objects), `class_scene` a soft label of which of objects and figures the room holds.
"""

CARD_LICENCE = """\
## Licence
Generated data, released under Apache-2.0 like the package.
"""


def generate_synthetic_dataset(
    output_dir,
    train_size: int = DEFAULT_TRAIN_SIZE,
    val_size: int = DEFAULT_VAL_SIZE,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    num_workers: Optional[int] = None,
    overwrite: bool = False,
    style: str = "pascal",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
):
    """Generate the synthetic benchmark into the dataset folder `output_dir`.

    Args:
        train_size, val_size: number of samples of the `train` and `validation` splits.
        image_size: side of the square images (also the train and eval size of the metadata).
        seed: the dataset seed; the output depends only on it and the sizes.
        num_workers: worker processes (None = all cores); does not change the output.
        overwrite: replace an existing `output_dir`.
        style: "pascal" (the six tasks of PASCAL-Context / NYUD-v2) or "taskonomy" (Taskonomy's 13 tasks from the
            same scenes, stored in Taskonomy's raw encodings with its decode steps, and its resize-and-crop
            geometry: images of `image_size`, resized to it and cropped to 7/8 of it).
    """
    if style not in ("pascal", "taskonomy"):
        raise ValueError(f"style must be 'pascal' or 'taskonomy', got {style!r}.")
    for name, value, minimum in (("train_size", train_size, 1), ("val_size", val_size, 1), ("image_size", image_size, 16)):
        if int(value) != value or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    split_ids = {
        "train": [sample_id("train", i) for i in range(train_size)],
        "validation": [sample_id("validation", i) for i in range(val_size)],
    }

    if style == "taskonomy":
        class_names = {"class_object": TASKONOMY_OBJECT_CLASSES, "class_scene": TASKONOMY_SCENE_CLASSES}
        kinds = taskonomy_task_kinds()
        specs = {task: make_task_spec(task, kinds[task], class_names.get(task)) for task in kinds}
        crop = max(image_size * 7 // 8 // 8 * 8, 8)  # Taskonomy's 224 of 256, to a multiple of 8
        sizes, geometry, row = (crop, crop), {"kind": "resize_crop", "resize": image_size}, make_taskonomy_row
        name, title, body = f"{NAME}-taskonomy", "Synthetic scenes in Taskonomy's tasks", TASKONOMY_CARD_BODY
    else:
        class_names = {"semseg": SEMSEG_CLASSES, "human_parts": HUMAN_PART_CLASSES}
        specs = {task: make_task_spec(task, None, class_names.get(task)) for task in TASKS}
        sizes, geometry, row = (image_size, image_size), None, make_row
        name, title, body = NAME, "TaskExpert synthetic multi-task scenes", CARD_BODY

    def finalize(split_sizes):
        metadata = build_metadata(name, specs, sizes, sizes, BOUNDARY_TOLERANCE, split_sizes, geometry=geometry)
        card = render_card(metadata, build_features(specs), title, body, "apache-2.0", CARD_LICENCE)
        return metadata, card

    return write_dataset(
        output_dir, split_ids, partial(row, seed, image_size), specs, finalize,
        num_workers=num_workers, overwrite=overwrite, description="Synthetic scenes", max_shard_bytes=max_shard_bytes,
    )  # fmt: skip
