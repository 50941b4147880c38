"""Names of everything the toy scenes vary (colours, materials, lights, products) and the prompts.

Every name here appears verbatim in the English prompt, and its Chinese word in ``prompt_zh``, so
that a model can learn the text condition and evaluation can read the target back from the meta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Colour:
    """A palette entry: the English name used in prompts, its RGB value and its Chinese word."""

    name: str
    rgb: tuple[int, int, int]
    zh: str


# Well separated hues and lightnesses, so that "which colour is the background" has one answer.
PALETTE: dict[str, Colour] = {
    c.name: c
    for c in (
        Colour("white", (236, 236, 230), "白色"),
        Colour("black", (36, 36, 40), "黑色"),
        Colour("grey", (128, 128, 132), "灰色"),
        Colour("red", (196, 40, 44), "红色"),
        Colour("orange", (232, 128, 36), "橙色"),
        Colour("yellow", (234, 202, 56), "黄色"),
        Colour("green", (56, 150, 68), "绿色"),
        Colour("teal", (32, 138, 140), "青色"),
        Colour("blue", (46, 88, 196), "蓝色"),
        Colour("purple", (120, 68, 164), "紫色"),
        Colour("pink", (234, 150, 182), "粉色"),
        Colour("brown", (118, 78, 48), "棕色"),
        Colour("beige", (216, 196, 158), "米色"),
    )
}

# Floor materials: English word in the prompt, Chinese word, and whether the surface is glossy
# (None: decided per sample). "plain" is worded "glossy" or "matte" in the prompts.
MATERIALS = ("wood", "marble", "fabric", "plain")
MATERIAL_GLOSSY: dict[str, bool | None] = {"wood": False, "marble": True, "fabric": False, "plain": None}
MATERIAL_ZH = {"wood": "木纹", "marble": "大理石", "fabric": "布艺", "glossy": "亮面", "matte": "哑光"}

SURFACES = {"table": "桌面", "floor": "地面"}

# Light direction -> (unit vector pointing towards the light in x right / y up / z to the camera,
# English phrase, Chinese phrase).
LIGHTS: dict[str, tuple[tuple[float, float, float], str, str]] = {
    "left": ((-0.8, 0.45, 0.4), "from the left", "左侧"),
    "right": ((0.8, 0.45, 0.4), "from the right", "右侧"),
    "top": ((0.0, 1.0, 0.3), "from above", "顶部"),
    "front": ((0.0, 0.35, 0.95), "from the front", "正面"),
    "back": ((0.0, 0.45, -0.9), "from behind", "背后"),
}
# Light colour multipliers (applied to the whole scene) and their words.
LIGHT_TINTS: dict[str, tuple[tuple[float, float, float], str]] = {
    "warm": ((1.06, 1.0, 0.9), "暖光"),
    "cool": ((0.92, 0.98, 1.07), "冷光"),
    "soft": ((1.0, 1.0, 1.0), "柔光"),
}

CATEGORIES: dict[str, str] = {
    "bottle": "瓶子",
    "box": "盒子",
    "can": "易拉罐",
    "jar": "罐子",
    "sphere": "球",
    "shoe": "鞋子",
}

_EN_TEMPLATES = (
    "{article} {product_colour} {category} on a {floor_colour} {material} {surface} in front of a {wall_colour} wall, {tint} light {light}",
    "{product_colour} {category} standing on a {floor_colour} {material} {surface}, {wall_colour} wall behind, {tint} light {light}",
    "product photo of {article} {product_colour} {category}, {floor_colour} {material} {surface}, {wall_colour} wall, {tint} light {light}",
)
_ZH_TEMPLATES = (
    "{floor_colour}{material}{surface}上的{product_colour}{category}，{wall_colour}墙面，{light}{tint}",
    "{product_colour}{category}放在{floor_colour}{material}{surface}上，背景是{wall_colour}墙，{light}{tint}",
)


def material_word(material: str, glossy: bool) -> str:
    """The word a prompt uses for ``material`` (``plain`` is worded by its finish)."""
    if material == "plain":
        return "glossy" if glossy else "matte"
    return material


def make_prompts(meta: dict, rng: np.random.Generator) -> tuple[str, str]:
    """English and Chinese prompts naming product, colours, material, surface and light of ``meta``."""
    word = material_word(meta["material"], meta["glossy"])
    en = _EN_TEMPLATES[int(rng.integers(len(_EN_TEMPLATES)))].format(
        article="an" if meta["product_colour"][0] in "aeiou" else "a",
        product_colour=meta["product_colour"],
        category=meta["category"],
        floor_colour=meta["floor_colour"],
        material=word,
        surface=meta["surface"],
        wall_colour=meta["wall_colour"],
        tint=meta["light_tint"],
        light=LIGHTS[meta["light"]][1],
    )
    zh = _ZH_TEMPLATES[int(rng.integers(len(_ZH_TEMPLATES)))].format(
        product_colour=PALETTE[meta["product_colour"]].zh,
        category=CATEGORIES[meta["category"]],
        floor_colour=PALETTE[meta["floor_colour"]].zh,
        material=MATERIAL_ZH[word],
        surface=SURFACES[meta["surface"]],
        wall_colour=PALETTE[meta["wall_colour"]].zh,
        tint=LIGHT_TINTS[meta["light_tint"]][1],
        light=LIGHTS[meta["light"]][2],
    )
    return en, zh
