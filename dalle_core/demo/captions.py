"""How the demo world's captions are written: the English templates of crawled
items, and the captions of faulty items (French / Spanish / German, dates and
camera file names, one or two words)."""

from __future__ import annotations

import numpy as np

from .scenes import Scene, SceneObject

# Caption templates for crawled items. Each one is identified as English by
# langid with probability > 0.6 for every composition; the bare form used by
# `Scene.caption()` is not (e.g. "a purple circle above a blue circle").
TEMPLATES = (
    "there is {a} {rel} {b}",
    "a picture of {a} {rel} {b}",
    "{a} is {rel} {b}",
    "{a} {rel} {b} on a {bg} background",
    "a simple drawing of {a} {rel} {b}",
    "an image of {a} {rel} {b}",
    "we can see {a} {rel} {b}",
)


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return scene.caption(template, sizes=tuple(bool(x) for x in rng.integers(0, 2, size=2)))


_FR = {"colours": {"red": "rouge", "orange": "orange", "yellow": "jaune", "green": "vert",
                   "blue": "bleu", "purple": "violet"},
       "shapes": {"circle": "cercle", "square": "carré", "triangle": "triangle"},
       "sizes": {"small": "petit ", "large": "grand "},
       "relations": {"to the left of": "à gauche d'", "to the right of": "à droite d'",
                     "above": "au-dessus d'", "below": "en dessous d'"},
       "templates": ("{a} {rel}{b}", "il y a {a} {rel}{b}", "une image d'{a} {rel}{b}")}
_ES = {"colours": {"red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde",
                   "blue": "azul", "purple": "morado"},
       "shapes": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"},
       "sizes": {"small": "pequeño ", "large": "gran "},
       "relations": {"to the left of": "a la izquierda de", "to the right of": "a la derecha de",
                     "above": "encima de", "below": "debajo de"},
       "templates": ("{a} {rel} {b}", "hay {a} {rel} {b}", "una imagen de {a} {rel} {b}")}
# German adjectives decline: nominative masculine / neuter, and the dative after the relation.
_DE_COLOURS = {"red": "rot", "orange": "orangefarben", "yellow": "gelb", "green": "grün",
               "blue": "blau", "purple": "violett"}
_DE_SHAPES = {"circle": ("Kreis", "er"), "square": ("Quadrat", "es"), "triangle": ("Dreieck", "es")}
_DE_SIZES = {"small": "klein", "large": "groß"}
_DE_RELATIONS = {"to the left of": "links von", "to the right of": "rechts von",
                 "above": "über", "below": "unter"}


def _romance(lang: dict, obj: SceneObject, with_size: bool) -> str:
    size = lang["sizes"][obj.size] if with_size else ""
    return f"un {size}{lang['shapes'][obj.shape]} {lang['colours'][obj.colour]}"


def _german(obj: SceneObject, with_size: bool, dative: bool) -> str:
    noun, ending = _DE_SHAPES[obj.shape]
    ending = "en" if dative else ending
    adjectives = ([_DE_SIZES[obj.size] + ending] if with_size else []) + [_DE_COLOURS[obj.colour] + ending]
    return " ".join(["einem" if dative else "ein", *adjectives, noun])


def foreign_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene described in French, Spanish or German."""
    sa, sb = (bool(x) for x in rng.integers(0, 2, size=2))
    lang = rng.integers(3)
    if lang == 2:
        template = ("{a} {rel} {b}", "auf dem Bild ist {a} {rel} {b}")[rng.integers(2)]
        return template.format(a=_german(scene.a, sa, False), rel=_DE_RELATIONS[scene.relation],
                               b=_german(scene.b, sb, True))
    table = (_FR, _ES)[lang]
    template = table["templates"][rng.integers(len(table["templates"]))]
    return template.format(a=_romance(table, scene.a, sa), rel=table["relations"][scene.relation],
                           b=_romance(table, scene.b, sb))


_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_DATE_TEMPLATES = (
    "photo taken on {d} {month} {y} {hh}:{mi}",
    "uploaded {y}-{mm}-{dd} {hh}:{mi}:{ss}",
    "IMG_{y}{mm}{dd}_{hh}{mi}.jpg {y}-{mm}-{dd} {hh}:{mi}:{ss}",
    "{Month} {d}, {y} at {hh}:{mi}",
    "DSC_{n}.JPG {dd}/{mm}/{y} {hh}:{mi}",
    "{y}-{mm}-{dd} {hh}:{mi}:{ss} {y}{mm}{dd}_{hh}{mi}{ss}.jpg",
)
# one or two words: fewer than any sensible minimum caption length
SHORT_CAPTIONS = ("shapes", "untitled", "image", "photo", "img", "red circle", "two shapes",
                   "my picture", "blue", "geometry")


def date_caption(rng: np.random.Generator) -> str:
    """Boilerplate made of a date (and time or a camera file name), at least three words."""
    m, d = int(rng.integers(12)), int(rng.integers(1, 29))
    return _DATE_TEMPLATES[rng.integers(len(_DATE_TEMPLATES))].format(
        d=d, dd=f"{d:02d}", mm=f"{m + 1:02d}", month=_MONTHS[m], Month=_MONTHS[m].capitalize(),
        y=int(rng.integers(1998, 2016)), hh=f"{rng.integers(24):02d}", mi=f"{rng.integers(60):02d}",
        ss=f"{rng.integers(60):02d}", n=f"{rng.integers(10000):04d}")
