"""An offline demo set for MLLM instruction tuning: images with known content, written as real PNG files,
and LLaVA-format JSON about them.

Two kinds of 32x32 RGB images: scikit-learn's 8x8 handwritten digits (scaled up, jittered) and coloured
shapes (1-4 circles, squares or triangles of one colour on a 2x2 grid). Question types: ``digit`` (which
digit), ``count`` (how many shapes), ``color``, ``shape``. Every question comes in two answer styles that
conflict (LLaVA-MoLE's mixed-data setting): ``brief`` ("answer with one word." -> "three") and ``sentence``
("answer with a sentence." -> "there are three shapes.").

Files written under ``root`` (``{split}`` is train or eval):

- ``images/{split}_{i}.png``
- ``instruct_{split}.json``: every question of every image in both styles (the mixed set)
- ``instruct_{split}_brief.json``, ``instruct_{split}_sentence.json``: one style only
- ``captions_{split}.json``: "<image> describe the image." -> "three red circles." (projector pre-training)
- ``text_{split}.json``: text-only records where the description stands in for the image, e.g. "the image
  shows three red circles. how many shapes are there? answer with one word." -> "three", and the same for
  "describe the image." (a miniature
  stand-in for a pretrained LLM's language skills: the LLM learns the answers from words, the MLLM then
  has to get the words' content from the image)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
STYLES = {"brief": "answer with one word.", "sentence": "answer with a sentence."}
QUESTIONS = {"digit": "what digit is shown?", "count": "how many shapes are there?",
             "color": "what color are the shapes?", "shape": "what shape are they?"}
SPLITS = ("train", "eval")
IMAGE_SIZE = 32


@dataclass
class Scene:
    """What an image shows: a digit, or ``count`` shapes of one ``shape`` and ``color``."""

    kind: str  # "digit" or "shapes"
    digit: int = 0
    count: int = 0
    color: str = ""
    shape: str = ""

    def description(self) -> str:
        if self.kind == "digit":
            return f"the digit {NUMBERS[self.digit]}"
        return f"{NUMBERS[self.count]} {self.color} {self.shape}{'s' if self.count > 1 else ''}"

    def question_types(self) -> list[str]:
        return ["digit"] if self.kind == "digit" else ["count", "color", "shape"]

    def answer(self, qtype: str, style: str) -> str:
        plural = "s" if self.count > 1 else ""
        brief = {"digit": NUMBERS[self.digit], "count": NUMBERS[self.count], "color": self.color,
                 "shape": self.shape}[qtype]
        if style == "brief":
            return brief
        return {"digit": f"the digit is {brief}.", "count": f"there {'are' if self.count > 1 else 'is'} "
                f"{brief} shape{plural}.", "color": f"the shape{plural} {'are' if self.count > 1 else 'is'} "
                f"{brief}.", "shape": f"{'they are' if self.count > 1 else 'it is a'} {brief}{plural}."}[qtype]


def _digit_image(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    big = np.kron(pixels / 16.0, np.ones((3, 3)))  # 8x8 -> 24x24
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    top, left = rng.randint(0, IMAGE_SIZE - 24), rng.randint(0, IMAGE_SIZE - 24)
    canvas[top:top + 24, left:left + 24] = big
    return np.repeat((canvas * 255).astype(np.uint8)[..., None], 3, axis=2)


def _shapes_image(scene: Scene, rng: random.Random) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE // 2
    for slot in rng.sample(range(4), scene.count):
        cx = (slot % 2) * cell + cell // 2 + rng.randint(-1, 1)
        cy = (slot // 2) * cell + cell // 2 + rng.randint(-1, 1)
        half = rng.randint(4, 6)
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[scene.color]
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def make_scenes(count: int, rng: random.Random, digit_share: float = 0.25) -> list[Scene]:
    scenes = []
    for _ in range(count):
        if rng.random() < digit_share:
            scenes.append(Scene("digit", digit=rng.randrange(10)))
        else:
            scenes.append(Scene("shapes", count=rng.randint(1, 4), color=rng.choice(sorted(COLORS)),
                                shape=rng.choice(SHAPES)))
    return scenes


def _records(scenes: list[Scene], names: list[str], split: str) -> dict[str, list[dict]]:
    files: dict[str, list[dict]] = {f"instruct_{split}": [], f"captions_{split}": [], f"text_{split}": [],
                                    **{f"instruct_{split}_{style}": [] for style in STYLES}}
    for i, (scene, name) in enumerate(zip(scenes, names, strict=True)):
        caption = [{"from": "human", "value": "<image>\ndescribe the image."},
                   {"from": "gpt", "value": scene.description() + "."}]
        files[f"captions_{split}"].append({"id": f"{split}-{i}-caption", "image": name, "type": "caption",
                                           "style": "caption", "conversations": caption})
        files[f"text_{split}"].append({"id": f"{split}-{i}-caption-text", "type": "caption", "style": "caption",
                                       "conversations": [{"from": "human", "value": f"the image shows "
                                                          f"{scene.description()}. describe the image."},
                                                         caption[1]]})
        for qtype in scene.question_types():
            for style, cue in STYLES.items():
                rid = f"{split}-{i}-{qtype}-{style}"
                answer = scene.answer(qtype, style)
                record = {"id": rid, "image": name, "type": qtype, "style": style, "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTIONS[qtype]} {cue}"},
                    {"from": "gpt", "value": answer}]}
                files[f"instruct_{split}"].append(record)
                files[f"instruct_{split}_{style}"].append(record)
                files[f"text_{split}"].append({"id": rid + "-text", "type": qtype, "style": style, "conversations": [
                    {"from": "human", "value": f"the image shows {scene.description()}. {QUESTIONS[qtype]} {cue}"},
                    {"from": "gpt", "value": answer}]})
    return files


def make_fake_instruct(root: str | Path, images_per_split: int | dict[str, int] = 200, *, seed: int = 0,
                       digit_share: float = 0.25) -> dict[str, Path]:
    """Write the demo set under ``root``; returns file stem -> path. Same arguments, same bytes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from mm.state import atomic_write

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    half = len(digits.images) * 4 // 5  # train digits from the first 80%, eval digits from the rest
    pools = {"train": range(half), "eval": range(half, len(digits.images))}
    counts = images_per_split if isinstance(images_per_split, dict) else dict.fromkeys(SPLITS, images_per_split)
    written: dict[str, Path] = {}
    for split_index, split in enumerate(SPLITS):
        rng = random.Random(seed * 1000 + split_index)
        scenes = make_scenes(counts[split], rng, digit_share)
        names = []
        for i, scene in enumerate(scenes):
            if scene.kind == "digit":
                candidates = [j for j in pools[split] if digits.target[j] == scene.digit]
                image = Image.fromarray(_digit_image(digits.images[rng.choice(candidates)], rng))
            else:
                image = _shapes_image(scene, rng)
            name = f"images/{split}_{i:05d}.png"
            atomic_write(root / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
            names.append(name)
        for stem, records in _records(scenes, names, split).items():
            text = json.dumps(records, indent=1)
            written[stem] = atomic_write(root / f"{stem}.json", lambda tmp, text=text: Path(tmp).write_text(text))
    return written


def demo_texts() -> list[str]:
    """Every word the demo set can use (for a word-level tokenizer that covers train and eval alike)."""
    scenes = [Scene("digit", digit=d) for d in range(10)] + [
        Scene("shapes", count=n, color=c, shape=s) for n in range(1, 5) for c in COLORS for s in SHAPES]
    texts = [*QUESTIONS.values(), *STYLES.values(), "describe the image.", "the image shows"]
    for scene in scenes:
        texts.append(scene.description())
        texts += [scene.answer(q, style) for q in scene.question_types() for style in STYLES]
    return texts
