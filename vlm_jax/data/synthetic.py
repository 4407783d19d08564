"""Synthetic shapes: a captioning / VQA dataset that builds offline in seconds.

Legend of dimension letters: S image side (pixels), C colour channels (3), N objects in an
image (1..4).

Each image is S x S RGB on a plain gray background with 1-4 non-overlapping objects. Every
object has a shape (`SHAPES`), a colour (`COLORS`), a size ('small' | 'large') and a
position, all sampled independently of each other, so a caption cannot be guessed without
looking at the image. Per image the builder writes

  * >= 5 (here 6) differently worded reference captions of at most 32 words; every caption
    names the colour and shape of every object; templates cover counting, absolute position
    ("a small green triangle at the top left, a large red circle in the center"; a single
    object: "... at the top of the image"), pairwise spatial relations ("a red circle to
    the left of a blue square") and left-to-right / top-to-bottom orderings;
  * question-answer pairs of types 'count', 'color', 'shape', 'position', 'yesno',
    'relation';
  * each object's bounding box [ymin, xmin, ymax, xmax] normalised to [0, 1], computed from
    the drawn pixels.

Splits are deterministic: example `i` of split `s` is drawn from
`np.random.default_rng([seed, split_code(s), i])`, so the same config always yields the
same data and train/val/test never share an image. Sizes and the seed live in the
`SyntheticShapesConfig`, whose name encodes them (`s64_train6000_val500_test500_seed0`),
so different sizes never collide in one TFDS data_dir.

    builder = SyntheticShapes(data_dir=..., image_size=64, num_train=6000, num_val=500,
                              num_test=500)
    builder.download_and_prepare(file_format='array_record')
    source = builder.as_data_source(split='train')

No TensorFlow is needed: images are yielded as PNG bytes encoded with PIL.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from vlm_jax.data.common import PackageBuilderMixin, caption_features, encode_png

# ---------------------------------------------------------------- attribute vocabulary
#: Colour words and their RGB values; well separated in RGB and from the gray background.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 185, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 210),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
}
#: Colour vocabulary (for attribute precision in the evaluation code).
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
#: Shape vocabulary (for attribute precision in the evaluation code).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
#: Question types written into the `questions` feature.
QTYPES: tuple[str, ...] = ("count", "color", "shape", "position", "yesno", "relation")
MAX_OBJECTS = 4
NUM_CAPTIONS = 6
MAX_CAPTION_WORDS = 32  # longest caption any scene produces (4 objects, position template)

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# Background gray level range (plain background, level drawn per image).
_BG_RANGE = (70, 110)
# Object side length as a fraction of S, per size class (jittered by +-8%).
_SIDE_FRACTION = {"small": 0.17, "large": 0.30}


@dataclasses.dataclass
class _Obj:
    shape: str
    color: str
    size: str
    y0: int = 0          # top-left corner of the object's square window, pixels
    x0: int = 0
    side: int = 0        # window side, pixels
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # drawn pixels, normalised

    @property
    def cy(self) -> float:
        return self.y0 + self.side / 2

    @property
    def cx(self) -> float:
        return self.x0 + self.side / 2


# ------------------------------------------------------------------------- drawing
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask [side, side] of `shape` filling a side x side window."""
    c = (np.arange(side) + 0.5) / side  # pixel centres in (0, 1)
    u, v = c[:, None], c[None, :]       # u: row (down), v: column (right)
    if shape == "circle":
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        m = np.ones((side, side), bool)
    elif shape == "triangle":  # apex up, base along the bottom edge
        m = np.abs(v - 0.5) <= 0.5 * u
    elif shape == "diamond":
        m = np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    elif shape == "cross":  # plus sign with arms one third of the side wide
        m = (np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.broadcast_to(m, (side, side))


def _place(objs: list[_Obj], image_size: int, rng: np.random.Generator) -> None:
    """Sets side and position of every object so that windows do not overlap (1 px gap).

    Rejection sampling; a configuration that gets stuck restarts, and after many restarts
    (only possible at very small S) every side shrinks by a pixel.
    """
    for o in objs:
        frac = _SIDE_FRACTION[o.size] * rng.uniform(0.92, 1.08)
        o.side = max(3 if o.size == "small" else 5, int(round(frac * image_size)))
    margin = max(1, image_size // 32)
    restarts = 0
    while True:
        placed: list[_Obj] = []
        for o in objs:
            hi = image_size - margin - o.side
            for _ in range(100):
                y0, x0 = (int(t) for t in rng.integers(margin, hi + 1, size=2))
                if all(y0 + o.side + 1 <= p.y0 or p.y0 + p.side + 1 <= y0 or
                       x0 + o.side + 1 <= p.x0 or p.x0 + p.side + 1 <= x0 for p in placed):
                    o.y0, o.x0 = y0, x0
                    placed.append(o)
                    break
            else:
                break
        if len(placed) == len(objs):
            return
        restarts += 1
        if restarts % 20 == 0:
            for o in objs:
                o.side = max(2, o.side - 1)


def _draw(objs: list[_Obj], image_size: int, bg: int) -> np.ndarray:
    """uint8 [S, S, 3] image; also sets each object's bbox from its drawn pixels."""
    img = np.full((image_size, image_size, 3), bg, np.uint8)
    for o in objs:
        m = shape_mask(o.shape, o.side)
        window = img[o.y0:o.y0 + o.side, o.x0:o.x0 + o.side]
        window[m] = COLOR_RGB[o.color]
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        o.bbox = ((o.y0 + rows[0]) / image_size, (o.x0 + cols[0]) / image_size,
                  (o.y0 + rows[-1] + 1) / image_size, (o.x0 + cols[-1] + 1) / image_size)
    return img


# --------------------------------------------------------------------- language
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: _Obj, with_size: bool) -> str:
    """Noun phrase: 'a small red circle' / 'a red circle'."""
    words = f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}"
    return f"{_article(words)} {words}"


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _grid_pos(o: _Obj, image_size: int) -> tuple[str, str]:
    """(vertical, horizontal) third of the object's centre: top/middle/bottom, left/center/right."""
    third = image_size / 3
    v = ("top", "middle", "bottom")[min(2, int(o.cy // third))]
    h = ("left", "center", "right")[min(2, int(o.cx // third))]
    return v, h


def position_answer(o: _Obj, image_size: int) -> str:
    """Short position answer: 'top left', 'top', 'left', 'center', 'bottom right', ..."""
    v, h = _grid_pos(o, image_size)
    if v == "middle" and h == "center":
        return "center"
    if v == "middle":
        return h
    if h == "center":
        return v
    return f"{v} {h}"


def _loc_phrase(o: _Obj, image_size: int, long: bool = False) -> str:
    """'at the top left' / 'in the center' ...; long=True: 'in the top left corner of the image'."""
    v, h = _grid_pos(o, image_size)
    if v == "middle" and h == "center":
        phrase = "in the center"
    elif v == "middle":
        phrase = f"on the {h} side" if long else f"on the {h}"
    elif h == "center":
        phrase = f"at the {v}"
    else:
        phrase = f"in the {v} {h} corner" if long else f"at the {v} {h}"
    return phrase + " of the image" if long else phrase


def _relation(a: _Obj, b: _Obj) -> str:
    """Relation of a to b along the axis where their centres differ most."""
    dy, dx = b.cy - a.cy, b.cx - a.cx
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def make_captions(objs: list[_Obj], image_size: int, rng: np.random.Generator) -> list[str]:
    """NUM_CAPTIONS distinct captions, each naming the colour and shape of every object."""
    n = len(objs)

    def shuffled() -> list[_Obj]:
        return [objs[i] for i in rng.permutation(n)]

    def sized() -> bool:
        return bool(rng.random() < 0.5)

    caps = []
    # 1. counting + list
    s = sized()
    listing = _join([_np(o, s) for o in shuffled()])
    caps.append(f"there is one object: {listing}" if n == 1 else
                f"there are {_NUMBER_WORDS[n]} objects: {listing}")
    # 2. pairwise spatial relation (single object: size + background)
    if n == 1:
        o = objs[0]
        caps.append(f"a single {o.size} {o.color} {o.shape} on a gray background")
    else:
        order = shuffled()
        a, b, rest = order[0], order[1], order[2:]
        s = sized()
        cap = f"{_np(a, s)} {_relation(a, b)} {_np(b, s)}"
        if rest:
            cap += ", plus " + _join([_np(o, s) for o in rest])
        caps.append(cap)
    # 3. absolute positions, with sizes (short location phrases keep 4 objects <= 32 words)
    caps.append(", ".join(f"{_np(o, True)} {_loc_phrase(o, image_size)}" for o in shuffled()))
    # 4. left to right
    if n == 1:
        caps.append(f"an image containing only {_np(objs[0], sized())}")
    else:
        s = sized()
        caps.append("from left to right: " +
                    _join([_np(o, s) for o in sorted(objs, key=lambda o: o.cx)]))
    # 5. picture with list
    s = sized()
    lead = ("an image with", "a picture showing", "a gray background with")[rng.integers(3)]
    caps.append(f"{lead} {_join([_np(o, s) for o in shuffled()])}")
    # 6. top to bottom
    if n == 1:
        o = objs[0]
        caps.append(f"the only shape in the image is {_np(o, sized())} "
                    f"{_loc_phrase(o, image_size, long=True)}")
    else:
        s = sized()
        caps.append("from top to bottom: " +
                    _join([_np(o, s) for o in sorted(objs, key=lambda o: o.cy)]))
    assert len(set(caps)) == len(caps) == NUM_CAPTIONS, caps
    return caps


def make_questions(objs: list[_Obj], image_size: int,
                   rng: np.random.Generator) -> list[dict[str, str]]:
    """Question-answer pairs about the image (answers are single words / short phrases)."""
    qs = [dict(question="how many objects are there?", answer=str(len(objs)), qtype="count")]
    color = COLORS[rng.integers(len(COLORS))]
    qs.append(dict(question=f"how many {color} objects are there?",
                   answer=str(sum(o.color == color for o in objs)), qtype="count"))
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objs) for c in COLORS}
    uniq_shape = [o for o in objs if shape_counts[o.shape] == 1]
    if uniq_shape:
        o = uniq_shape[rng.integers(len(uniq_shape))]
        qs.append(dict(question=f"what color is the {o.shape}?", answer=o.color, qtype="color"))
    uniq_color = [o for o in objs if color_counts[o.color] == 1]
    if uniq_color:
        o = uniq_color[rng.integers(len(uniq_color))]
        qs.append(dict(question=f"what shape is the {o.color} object?", answer=o.shape,
                       qtype="shape"))
    o = objs[rng.integers(len(objs))]
    qs.append(dict(question=f"where is the {o.color} {o.shape}?",
                   answer=position_answer(o, image_size), qtype="position"))
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        c, s = sorted(present)[rng.integers(len(present))]
        ans = "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = absent[rng.integers(len(absent))]
        ans = "no"
    qs.append(dict(question=f"is there {_article(c)} {c} {s}?", answer=ans, qtype="yesno"))
    if len(objs) >= 2:
        i, j = rng.choice(len(objs), size=2, replace=False)
        a, b = objs[i], objs[j]
        rel = _relation(a, b)
        rels = ("to the left of", "to the right of", "above", "below")
        asked = rel if rng.random() < 0.5 else rels[(rels.index(rel) + 1 + rng.integers(3)) % 4]
        qs.append(dict(question=f"is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?",
                       answer="yes" if asked == rel else "no", qtype="relation"))
    return qs


_RELATIONS = ("to the left of", "to the right of", "above", "below")
_WHERE = re.compile(r"^where is the (\w+) (\w+)\?$")
_IS_REL = re.compile(r"^is the (\w+) (\w+) (" + "|".join(_RELATIONS) + r") the (\w+) (\w+)\?$")


def answer_evidence(question: dict, captions) -> list[int]:
    """Indices of the ``captions`` of an image that STATE the answer to ``question`` (a
    `make_questions` dict), by this module's grammar; [] where none singles one out.

    Every caption names the colour and shape of every object, so colour, shape, count and
    yes/no answers are in all of them (-> []). Two types are stated by some captions only:
      position  'where is the red circle?'  the captions that give that object's location
                ('... red circle at the top left', '... red circle in the top left corner
                of the image');
      relation  'is the red circle above the blue square?'  the caption that relates that pair
                ('a red circle to the left of a small blue square', either order), else the
                captions that locate both objects.
    Used by `vlm_jax.data.context_text` (``qa_context_caption='stating'``) to build reading
    documents whose context holds the answer, the way a reading-comprehension corpus does.
    """
    q = str(question.get("question", ""))
    located = lambda c, s: [i for i, cap in enumerate(captions)          # noqa: E731
                            if re.search(rf"\b{c} {s} (at|on|in) the ", cap)]
    m = _WHERE.match(q)
    if m:
        return located(m.group(1), m.group(2))
    m = _IS_REL.match(q)
    if m:
        ca, sa, _, cb, sb = m.groups()
        rel = "|".join(_RELATIONS)
        pair = lambda c1, s1, c2, s2: rf"\b{c1} {s1} ({rel}) an? (\w+ )?{c2} {s2}\b"   # noqa: E731
        stated = [i for i, cap in enumerate(captions)
                  if re.search(pair(ca, sa, cb, sb), cap) or re.search(pair(cb, sb, ca, sa), cap)]
        return stated or sorted(set(located(ca, sa)) & set(located(cb, sb)))
    return []


def sample_scene(image_size: int, rng: np.random.Generator):
    """-> (uint8 image [S, S, 3], objects, captions, questions) for one example.

    Colour, shape and size of every object are drawn independently and uniformly; the
    (colour, shape) pair is unique within an image so that every caption is unambiguous
    (a symmetric rejection that keeps colour, shape and size independent).
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    objs: list[_Obj] = []
    while len(objs) < n:
        o = _Obj(shape=SHAPES[rng.integers(len(SHAPES))], color=COLORS[rng.integers(len(COLORS))],
                 size=SIZES[rng.integers(len(SIZES))])
        if all((o.shape, o.color) != (p.shape, p.color) for p in objs):
            objs.append(o)
    _place(objs, image_size, rng)
    bg = int(rng.integers(_BG_RANGE[0], _BG_RANGE[1] + 1))
    img = _draw(objs, image_size, bg)
    return img, objs, make_captions(objs, image_size, rng), make_questions(objs, image_size, rng)


# --------------------------------------------------------------------------- TFDS
def synthetic_config_name(image_size: int, num_train: int, num_val: int, num_test: int,
                          seed: int) -> str:
    return f"s{image_size}_train{num_train}_val{num_val}_test{num_test}_seed{seed}"


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Size / seed of a synthetic_shapes variant. Build one with `SyntheticShapesConfig.make`."""
    image_size: int = 64
    num_train: int = 6000
    num_val: int = 500
    num_test: int = 500
    seed: int = 0

    @classmethod
    def make(cls, image_size: int = 64, num_train: int = 6000, num_val: int = 500,
             num_test: int = 500, seed: int = 0) -> "SyntheticShapesConfig":
        for key, value, low in (("image_size", image_size, 16), ("num_train", num_train, 1),
                                ("num_val", num_val, 1), ("num_test", num_test, 1),
                                ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"synthetic_shapes: {key}={value!r} must be an int >= {low}.")
        return cls(name=synthetic_config_name(image_size, num_train, num_val, num_test, seed),
                   description=f"{image_size}px, {num_train}/{num_val}/{num_test} "
                               f"train/val/test images, seed {seed}",
                   image_size=int(image_size), num_train=int(num_train), num_val=int(num_val),
                   num_test=int(num_test), seed=int(seed))


class SyntheticShapes(PackageBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """Colored shapes on a gray background with captions, questions and boxes.

    Construct with a config or with size kwargs:
      SyntheticShapes(data_dir=d)                               # default 64px 6000/500/500
      SyntheticShapes(data_dir=d, image_size=32, num_train=64)  # config built from kwargs
      SyntheticShapes(data_dir=d, config=SyntheticShapesConfig.make(...))
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [SyntheticShapesConfig.make()]

    def __init__(self, *, image_size: int | None = None, num_train: int | None = None,
                 num_val: int | None = None, num_test: int | None = None,
                 seed: int | None = None, **kwargs):
        sizes = dict(image_size=image_size, num_train=num_train, num_val=num_val,
                     num_test=num_test, seed=seed)
        if any(v is not None for v in sizes.values()):
            if kwargs.get("config") is not None:
                raise ValueError("SyntheticShapes: pass either config= or the size kwargs "
                                 f"{sorted(k for k, v in sizes.items() if v is not None)}, not both.")
            defaults = self.BUILDER_CONFIGS[0]
            cfg = SyntheticShapesConfig.make(**{
                k: getattr(defaults, k) if v is None else v for k, v in sizes.items()})
            # A predefined config of the same name must be passed as that very object.
            kwargs["config"] = self.builder_configs.get(cfg.name, cfg)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[1],
            features=caption_features((s, s, 3), "png"),
            disable_shuffling=True,  # records stored in image_id order
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train, 0),
                "val": self._generate_examples("val", c.num_val, c.num_train),
                "test": self._generate_examples("test", c.num_test, c.num_train + c.num_val)}

    def _generate_examples(self, split: str, num: int, id_offset: int):
        c = self.builder_config
        for i in range(num):
            rng = np.random.default_rng([c.seed, _SPLIT_CODES[split], i])
            img, objs, captions, questions = sample_scene(c.image_size, rng)
            image_id = id_offset + i
            yield image_id, {
                "image": encode_png(img),
                "image_id": image_id,
                "captions": captions,
                "objects": [dict(shape=o.shape, color=o.color, size=o.size,
                                 bbox=np.asarray(o.bbox, np.float32)) for o in objs],
                "questions": questions,
            }


_CLAUSE = re.compile(r"^(an? (?:small |large )?\w+ \w+) ((?:at|on|in) the [a-z ]+)$")
#: The clause forms of `paraphrase_location`: {np} the object ('a small red circle'), {loc} its place ('at the top')
LOCATION_FORMS = ("{np} {loc}", "{loc} there is {np}", "{np} is {loc}", "{loc} is {np}")


def paraphrase_location(caption: str, rng: np.random.Generator) -> str | None:
    """A location caption ('a large red circle at the top left, a small blue square in the center')
    said another way, or None when ``caption`` is not one: its clauses in a random order, each in a
    random form of `LOCATION_FORMS` ('at the top left there is a large red circle', 'a small blue
    square is in the center', ...), with the same objects and places. Only words the captions
    already use. The stage-0 text corpus uses it (`vlm_jax.data.context_text`, ``paraphrase``) so
    the stand-in LM reads *where* an object is whatever the wording, as a web-pretrained LM does."""
    clauses = [_CLAUSE.match(c) for c in caption.split(", ")]
    if not clauses or not all(clauses):
        return None
    order = rng.permutation(len(clauses))
    return ", ".join(LOCATION_FORMS[int(rng.integers(len(LOCATION_FORMS)))].format(np=clauses[i].group(1),
                                                                                  loc=clauses[i].group(2))
                     for i in order)
