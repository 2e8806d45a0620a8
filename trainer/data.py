"""Datasets: JSON / JSONL / Parquet rows with an image, a question, an answer and (optionally) a rationale.

Rows are read with ``datasets`` and validated once, up front: a malformed row is a ``ValueError`` naming the
file, the row number (0-based) and the field. Images are decoded lazily (each step only opens its batch).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig

SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A malformed data file or row (the message names file, row and field)."""


@dataclass
class Example:
    question: str
    answer: str
    rationale: str | None
    image: Any  # None, a file path, raw bytes, or a PIL image
    where: str  # "file:row", for error messages

    def load_image(self):
        from PIL import Image

        if self.image is None:
            return None
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        if isinstance(self.image, (bytes, bytearray)):
            return Image.open(io.BytesIO(self.image)).convert("RGB")
        with Image.open(self.image) as im:
            return im.convert("RGB")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import datasets

    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (expected .json, .jsonl or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # arrow cast errors name neither the row nor the field: find them ourselves
        if kind == "json":
            _locate_json_error(path)
        raise DataError(f"{path}: cannot be read as {kind}: {exc}") from exc
    return ds.to_list()


def _locate_json_error(path: Path) -> None:
    """Re-read a JSON/JSONL file by hand to name the first row that breaks it (syntax or a type change)."""
    text = path.read_text()
    try:
        rows = json.loads(text)
        if not isinstance(rows, list):
            rows = [rows]
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {i}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    seen: dict[str, type] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        for k, v in row.items():
            if v is None:
                continue
            if (
                k in seen
                and not isinstance(v, seen[k])
                and not (isinstance(v, (int, float)) and seen[k] in (int, float))
            ):
                raise DataError(
                    f"{path}: row {i}: field {k!r} is {type(v).__name__} but earlier rows have {seen[k].__name__}"
                )
            seen.setdefault(k, type(v))


def _text(value: Any, path: Path, i: int, field: str, *, allow_number: bool = False) -> str:
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}: row {i}: field {field!r} must be a string, got {type(value).__name__} ({value!r})")
    if not value.strip():
        raise DataError(f"{path}: row {i}: field {field!r} is empty")
    return value


def _image(value: Any, path: Path, i: int, field: str, root: Path) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):  # the datasets Image feature stored in parquet: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if value is None:
            raise DataError(f"{path}: row {i}: field {field!r} has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        p = Path(value) if os.path.isabs(value) else root / value
        if not p.is_file():
            raise DataError(f"{path}: row {i}: field {field!r}: image file {str(p)!r} does not exist")
        return str(p)
    if hasattr(value, "convert"):  # a PIL image (datasets decoded it)
        return value
    raise DataError(f"{path}: row {i}: field {field!r} must be a path, bytes or an image, got {type(value).__name__}")


def load_examples(file: str | Path, cfg: DataConfig, *, need_rationale: bool, limit: int = 0) -> list[Example]:
    """Read and validate every row of a data file (the first `limit` rows when > 0)."""
    path = Path(file)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    columns = set(rows[0])
    for field, needed in (
        (cfg.question_field, True),
        (cfg.answer_field, True),
        (cfg.rationale_field, need_rationale),
    ):
        if needed and field not in columns:
            raise DataError(f"{path}: field {field!r} is missing (columns: {sorted(columns)}); set data.*_field")
    out = []
    for i, row in enumerate(rows[:limit] if limit > 0 else rows):
        rationale = row.get(cfg.rationale_field)
        if need_rationale or rationale is not None:
            rationale = _text(rationale, path, i, cfg.rationale_field)
        out.append(
            Example(
                question=_text(row.get(cfg.question_field), path, i, cfg.question_field),
                answer=_text(row.get(cfg.answer_field), path, i, cfg.answer_field, allow_number=True).strip(),
                rationale=rationale,
                image=_image(row.get(cfg.image_field), path, i, cfg.image_field, root),
                where=f"{path}:{i}",
            )
        )
    return out


def direct_answer_mix(examples: list[Example], ratio: float, *, seed: int, step: int) -> list[Example]:
    """The SFT mix of chain-of-thought and direct answers (LLaVA-Reasoner trains on both forms of its questions).

    A row without a rationale is always a direct answer. A row with one is trained as a direct answer (its
    rationale dropped) with probability ``ratio``, drawn per (seed, step, position in the batch), so a resumed
    run draws the same mix. ``ratio`` = 0.5 gives about as many direct as CoT examples, the proportion of the
    LLaVA-Reasoner SFT data (193k CoT rows of 404k).
    """
    if ratio <= 0.0:
        return examples
    import dataclasses
    import random

    rng = random.Random(seed * 1_000_003 + step * 7919 + 101)
    out = []
    for e in examples:
        if e.rationale is not None and rng.random() < ratio:
            e = dataclasses.replace(e, rationale=None)
        out.append(e)
    return out


class Sampler:
    """Deterministic, resumable order over a dataset: epoch e is a permutation seeded by (seed, e).

    ``state()`` / ``load_state()`` give the data position a checkpoint restores. With several processes each
    rank takes every world_size-th index of the same global order.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        import random

        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_indices(self, global_batch: int) -> list[int]:
        """The next global batch of indices (wrapping into a new epoch), this rank's share of them."""
        out = []
        while len(out) < global_batch:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            take = min(global_batch - len(out), self.n - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out[self.rank :: self.world]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()
