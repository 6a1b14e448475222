"""Synthetic visual QA: images of coloured shapes on a 3×3 grid, questions about colour, shape, count and position.

Every split comes from its own seed, so the same command always writes the same files:

    python demo/make_data.py --out data/shapes          # train (seed 0), validation (seed 1), test (seed 2)

writes

    data/shapes/images/{train,validation,test}/000000.png ...      96×96 PNG
    data/shapes/train.json              LLaVA format, several turns per image (recipes/finetune.py)
    data/shapes/validation.jsonl        {"image", "question", "answer", "type"} one question per image
    data/shapes/test.jsonl              the same (recipes/evaluate.py)

Image paths inside the files are relative to `data/shapes/images`.

A scene holds 1 to 5 objects, each a (colour, shape) pair seen at most once, in distinct cells of a 3×3 grid (with
a few pixels of jitter in position, size and colour). Positions are the grid's, so relations are never ambiguous:
A is "left of" B when A's column is smaller, "above" B when A's row is smaller. Answers are one word (a colour, a
shape, a digit, "yes" / "no"), so exact match is a fair score. Only questions with exactly one right answer are
asked (a shape is named alone only where it is unique in the scene, and so on). Some training images are asked
"Describe the image." instead, answered by every object and its place ("red circle at top left, blue square at
center"): without that dense signal, a language model trained from scratch learns the answers' prior and ignores
the image.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("color", "shape", "count", "relation_yes_no", "relation_what")
DESCRIBE = "Describe the image."
ROW_NAMES, COL_NAMES = ("top", "middle", "bottom"), ("left", "center", "right")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
# Training asks the relation questions more often: they need two objects found and compared, and are learnt last.
# Validation and test draw the five types uniformly.
TRAIN_TYPE_WEIGHTS = {"color": 1, "shape": 1, "count": 1, "relation_yes_no": 3, "relation_what": 2}

IMAGE_SIZE = 96
GRID = 3
SUPERSAMPLE = 4  # drawn at 4× and downsampled: smooth edges


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def relation_holds(a: Obj, relation: str, b: Obj) -> bool:
    """Whether `a` is `relation` `b` on the grid (strictly: same column is neither left nor right)."""
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def make_scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(1, 5)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return [Obj(color, shape, r, c) for (color, shape), (r, c) in zip(kinds, cells)]


def draw_scene(scene: list[Obj], rng: random.Random) -> Image.Image:
    s = SUPERSAMPLE
    size = IMAGE_SIZE * s
    cell = size / GRID
    background = tuple(rng.randint(235, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        # Objects 20–24 px wide in 32 px cells, moved by at most ±1.5 px: a cell is exactly 2×2 patches of the model's
        # 48 px input, so an object looks about the same wherever it is, which frozen random towers need.
        half = rng.uniform(10, 12) * s
        jitter = 1.5 * s
        cx = (obj.col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (obj.row + 0.5) * cell + rng.uniform(-jitter, jitter)
        fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[obj.color])
        box = (cx - half, cy - half, cx + half, cy + half)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # triangle pointing up
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def ask(scene: list[Obj], qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """One (question, answer) of type `qtype` about `scene`, or None when the scene cannot support one."""
    if qtype == "color":
        unique = [o for o in scene if sum(p.shape == o.shape for p in scene) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"What color is the {o.shape}?", o.color
    if qtype == "shape":
        unique = [o for o in scene if sum(p.color == o.color for p in scene) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"What shape is the {o.color} object?", o.shape
    if qtype == "count":
        kind = rng.choice(("all", "shape", "color"))
        if kind == "all":
            return "How many objects are there?", str(len(scene))
        # mostly kinds that are present, so that "0" does not dominate the answers
        present = rng.random() < 0.8
        if kind == "shape":
            shape = rng.choice(scene).shape if present else rng.choice(SHAPES)
            return f"How many {shape}s are there?", str(sum(o.shape == shape for o in scene))
        color = rng.choice(scene).color if present else rng.choice(list(COLORS))
        return f"How many {color} objects are there?", str(sum(o.color == color for o in scene))
    if qtype == "relation_yes_no":
        if len(scene) < 2:
            return None
        want = rng.choice((True, False))  # balanced yes / no
        options = [(a, rel, b) for a in scene for b in scene if a is not b for rel in RELATIONS
                   if relation_holds(a, rel, b) == want]
        if not options:
            return None
        a, rel, b = rng.choice(options)
        return f"Is the {a.name} {rel} the {b.name}?", "yes" if want else "no"
    if qtype == "relation_what":
        options = []
        for ref in scene:
            for rel in RELATIONS:
                hits = [o for o in scene if o is not ref and relation_holds(o, rel, ref)]
                if len(hits) == 1:
                    options.append((hits[0], rel, ref))
        if not options:
            return None
        hit, rel, ref = rng.choice(options)
        if rng.random() < 0.5:
            return f"What shape is {rel} the {ref.name}?", hit.shape
        return f"What color is the object {rel} the {ref.name}?", hit.color
    raise ValueError(f"Unknown question type {qtype!r}; expected one of {list(QUESTION_TYPES)}")


def place(obj: Obj) -> str:
    """The grid cell in words: "top left", "center", "bottom right", ..."""
    row, col = ROW_NAMES[obj.row], COL_NAMES[obj.col]
    if row == "middle":
        return col
    return row if col == "center" else f"{row} {col}"


def describe(scene: list[Obj]) -> str:
    """Every object with its place, in reading order: "red circle at top left, blue square at center"."""
    ordered = sorted(scene, key=lambda o: (o.row, o.col))
    return ", ".join(f"{o.name} at {place(o)}" for o in ordered)


def ask_any(scene: list[Obj], rng: random.Random, exclude: set[str] = frozenset(), weights: dict | None = None
            ) -> tuple[str, str, str]:
    """A question of a type drawn uniformly (or by `weights`) among those the scene supports (counting always works)."""
    while True:
        if weights:
            qtype = rng.choices(QUESTION_TYPES, [weights[t] for t in QUESTION_TYPES])[0]
        else:
            qtype = rng.choice(QUESTION_TYPES)
        qa = ask(scene, qtype, rng)
        if qa is not None and qa[0] not in exclude:
            return qtype, qa[0], qa[1]


def generate_split(out: Path, split: str, num_images: int, seed: int, turns: int = 1, describe_rate: float = 0.0,
                   type_weights: dict | None = None) -> list[dict]:
    """Writes the split's images and returns its records: for a `describe_rate` fraction of the images, a request
    for a description of the whole scene; for the others, 1 to `turns` distinct questions."""
    rng = random.Random(seed)
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_images):
        scene = make_scene(rng)
        rel_path = f"{split}/{i:06d}.png"
        draw_scene(scene, rng).save(out / "images" / rel_path)
        if describe_rate and rng.random() < describe_rate:
            qas = [("describe", DESCRIBE, describe(scene))]
        else:
            asked: set[str] = set()
            qas = []
            for _ in range(rng.randint(1, turns)):
                qtype, question, answer = ask_any(scene, rng, exclude=asked, weights=type_weights)
                asked.add(question)
                qas.append((qtype, question, answer))
        records.append({"image": rel_path, "scene": [o.__dict__ for o in scene], "qas": qas})
    return records


def to_llava(records: list[dict]) -> list[dict]:
    out = []
    for i, rec in enumerate(records):
        conversations = []
        for turn, (_, question, answer) in enumerate(rec["qas"]):
            conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
        out.append({"id": f"shapes-{i:06d}", "image": rec["image"], "conversations": conversations})
    return out


def to_eval_jsonl(records: list[dict]) -> list[dict]:
    return [
        {"image": rec["image"], "question": question, "answer": answer, "type": qtype}
        for rec in records
        for qtype, question, answer in rec["qas"]
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/shapes"), help="output folder (default: data/shapes)")
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--train-turns", type=int, default=4, help="questions per training image: 1 to N (default 4)")
    parser.add_argument("--train-describe", type=float, default=0.3,
                        help="fraction of training images asked for a full description instead of questions (default "
                             "0.3): dense supervision that teaches the model to read the whole image")
    parser.add_argument("--validation-images", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=600)
    parser.add_argument("--seed-offset", type=int, default=0, help="added to the split seeds (train 0, validation 1, test 2)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.train_images, "validation": args.validation_images, "test": args.test_images}
    for split, n in sizes.items():
        seed = SPLIT_SEEDS[split] + args.seed_offset
        if split == "train":
            records = generate_split(args.out, split, n, seed, turns=args.train_turns,
                                     describe_rate=args.train_describe, type_weights=TRAIN_TYPE_WEIGHTS)
            path = args.out / "train.json"
            path.write_text(json.dumps(to_llava(records), indent=0))
            count = sum(len(r["qas"]) for r in records)
        else:
            records = generate_split(args.out, split, n, seed, turns=1)
            path = args.out / f"{split}.jsonl"
            rows = to_eval_jsonl(records)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            count = len(rows)
        print(f"{split}: {n} images, {count} questions (seed {seed}) → {path}")


if __name__ == "__main__":
    main()
