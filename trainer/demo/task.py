"""The embedded visual reasoning tasks: count coloured squares, with a programmatic reference rationale.

56 x 56 images (4 merged Qwen2-VL image tokens), 6 x 6 squares in distinct cells of a 7 x 7 grid of 8-pixel
cells. The background is the CLIP normalisation mean: a background that normalises to ~0 leaves the squares as
the only signal (on white, the tiny model never learned to look; see shared/research/demo_feasibility.md).

* ``count``: 0..4 red and 0..4 blue squares, one rationale form ("I see 2 red and 3 blue. 2 + 3 = 5.").
  Chance (always answering the most frequent total, 4) is 20%.
* ``paths``: the same images; the reference rationale counts the colours in either order, drawn per example
  ("I see 3 blue and 2 red. 3 + 2 = 5." or "I see 2 red and 3 blue. 2 + 3 = 5."), so two reasoning paths lead to
  one answer and a sampled rationale can take the path the reference did not (a three-colour version, 0..3 of
  each, stayed near chance after the demo's SFT budget: 26.5% greedy). Chance is 20%.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SIZE = 56
CELL = 8
SQUARE = 6
BACKGROUND = (123, 117, 104)  # ~ CLIP mean * 255: normalises to ~0
RED = (230, 40, 40)
BLUE = (40, 90, 235)
TASKS = ("count", "paths")
QUESTION = "How many squares are there?"


@dataclass(frozen=True)
class Sample:
    red: int
    blue: int
    cells: tuple[int, ...]  # grid cells of the red squares first, then the blue ones
    blue_first: bool = False  # ``paths``: the rationale counts blue, then red

    @property
    def answer(self) -> str:
        return str(self.red + self.blue)

    @property
    def rationale(self) -> str:
        if self.blue_first:
            return f"I see {self.blue} blue and {self.red} red. {self.blue} + {self.red} = {self.red + self.blue}."
        return f"I see {self.red} red and {self.blue} blue. {self.red} + {self.blue} = {self.red + self.blue}."


def draw_sample(rng: random.Random, max_per_colour: int = 4, task: str = "count") -> Sample:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    grid = SIZE // CELL
    red, blue = rng.randint(0, max_per_colour), rng.randint(0, max_per_colour)
    cells = tuple(rng.sample(range(grid * grid), red + blue))
    return Sample(red, blue, cells, blue_first=task == "paths" and rng.random() < 0.5)


def render(sample: Sample) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    px = img.load()
    grid = SIZE // CELL
    for k, cell in enumerate(sample.cells):
        colour = RED if k < sample.red else BLUE
        x0, y0 = (cell % grid) * CELL + 1, (cell // grid) * CELL + 1
        for y in range(y0, y0 + SQUARE):
            for x in range(x0, x0 + SQUARE):
                px[x, y] = colour
    return img


def write_split(out_dir: Path, name: str, n: int, seed: int, task: str = "count") -> Path:
    """Write ``<name>.jsonl`` (question, answer, rationale, image path relative to the file) + PNG images."""
    rng = random.Random(seed)
    img_dir = out_dir / f"{name}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with path.open("w") as f:
        for i in range(n):
            s = draw_sample(rng, task=task)
            rel = f"{name}_images/{i:06d}.png"
            render(s).save(out_dir / rel)
            row = {"image": rel, "question": QUESTION, "answer": s.answer, "rationale": s.rationale}
            f.write(json.dumps(row) + "\n")
    return path


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Text the demo tokenizer is trained on: every phrase the task and the chat format produce."""
    rng = random.Random(seed)
    out = [QUESTION, "user", "analyzer", "assistant", "The answer is"]
    for _ in range(n):
        s = draw_sample(rng)
        out += [s.rationale, s.answer]
    for r in range(5):
        for b in range(5):
            out.append(Sample(r, b, ()).rationale)
            out.append(Sample(r, b, (), blue_first=True).rationale)
    return out
