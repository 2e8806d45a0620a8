"""``lacot-train distill``: a teacher writes rationales for (image, question, short answer) rows; the ones whose
final answer matches the row's answer become SFT data (LLaVA-Reasoner's first stage: GPT-4o rationales for VQA
rows, filtered by the short answer, 193k CoT examples; shared/research/dpo_grpo.md §1.1).

    lacot-train distill [CONFIG.yaml] [section.key=value ...]

Per input row the teacher samples ``sampling.num_samples`` rationales. The teacher is

* ``teacher.kind=local``: a transformers checkpoint (text or Qwen2-VL-style vision-language) on this machine. With
  ``teacher.template=trainer`` (default) it writes in the trainer's layout (rationale turn, ⊤, answer turn:
  :class:`~.config.FormatConfig`), so its rationale and its answer arrive separately; with ``chat`` (text models)
  the tokenizer's chat template is applied and the answer is read from the reply;
* ``teacher.kind=openai``: any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, ...) through the ``openai``
  client, ``teacher.base_url`` + ``teacher.model``, the API key from the environment variable
  ``teacher.api_key_env``; images are sent as base64 data URLs; ``teacher.concurrency`` requests in flight.

The final answer is extracted from the reply (:func:`extract_answer`: "The answer is X", "Answer: X", "\\boxed{X}",
else the last line) and compared with the row's answer by :func:`answers_match` (numbers as numbers, option
letters, yes/no, else normalized text). Matching rationales are written as JSONL rows ``question, answer,
rationale, image`` that ``lacot-train sft`` reads, each with a ``provenance`` object (teacher, prompt template,
sampling settings, source row, sample index, the teacher's extracted answer).

**Crash safety.** The output is append-only. After all samples of a row are written and fsync'ed, one line is
appended (and fsync'ed) to ``<output>.done``: the row index, the output's byte length after the row, tried and
kept. A restarted run truncates the output to the last recorded length (dropping a row that was being written
when the process died), skips every row in the done index and carries on: no row is done twice and none is lost.
``<output>.summary.json`` holds kept / tried per row and overall.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig, FormatConfig, apply_mapping, parse_override, read_yaml_file
from .data import Example, load_examples

DEFAULT_PROMPT = (
    "{question}\nThink step by step and explain your reasoning, then give the final answer on the last line "
    "as 'The answer is X.'"
)


@dataclass
class TeacherConfig:
    kind: str = "local"  # local (a transformers checkpoint) | openai (an OpenAI-compatible chat endpoint)
    path: str = ""  # local: checkpoint directory
    template: str = "trainer"  # local: trainer (the trainer's layout) | chat (the tokenizer's chat template)
    dtype: str = "float32"  # local: float32 | bfloat16 | float16
    device: str = "auto"  # local: auto | cpu | cuda
    batch_rows: int = 8  # local: rows per generate call (x num_samples sequences)
    model: str = ""  # openai: the model name at the endpoint
    base_url: str = ""  # openai: e.g. http://127.0.0.1:8000/v1 ("" = the client's default, api.openai.com)
    api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable holding the key (never the key)
    concurrency: int = 8  # openai: requests in flight
    timeout_s: float = 120.0  # openai: per request
    max_retries: int = 3  # openai: the client's retries on connection errors, 429 and 5xx
    prompt: str = DEFAULT_PROMPT  # the user message; {question} is replaced by the row's question
    system: str = ""  # system message (chat template / endpoint); "" = none


@dataclass
class SamplingConfig:
    num_samples: int = 4  # rationales per row
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512  # rationale (and reply) token budget
    answer_max_tokens: int = 32  # local trainer layout: the answer turn's budget
    seed: int = 0


@dataclass
class DistillData:
    input_file: str = ""  # .json / .jsonl / .parquet rows with question, answer (image optional)
    output_file: str = ""  # .jsonl, appended to (see crash safety above)
    question_field: str = "question"
    answer_field: str = "answer"
    image_field: str = "image"
    image_root: str = ""
    limit: int = 0  # only the first rows (0 = all)
    progress: bool = True  # a progress bar on stderr


@dataclass
class FilterConfig:
    keep_per_row: int = 0  # at most this many matching rationales per row (0 = all of them)
    number_tolerance: float = 0.0  # relative tolerance of numeric answers (ChartQA's relaxed accuracy: 0.05)


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DistillData = field(default_factory=DistillData)
    filter: FilterConfig = field(default_factory=FilterConfig)
    format: FormatConfig = field(default_factory=FormatConfig)  # the trainer layout (local, template=trainer)

    def validate(self) -> DistillConfig:
        def need(ok: bool, key: str, expected: str, got: object) -> None:
            if not ok:
                raise ValueError(f"config {key}: expected {expected}, got {got!r}")

        t, s, d = self.teacher, self.sampling, self.data
        need(t.kind in ("local", "openai"), "teacher.kind", "local | openai", t.kind)
        need(t.kind != "local" or bool(t.path), "teacher.path", "a checkpoint directory (teacher.kind=local)", t.path)
        need(t.kind != "openai" or bool(t.model), "teacher.model", "the endpoint's model name", t.model)
        need(t.template in ("trainer", "chat"), "teacher.template", "trainer | chat", t.template)
        need(t.concurrency >= 1, "teacher.concurrency", ">= 1", t.concurrency)
        need(t.batch_rows >= 1, "teacher.batch_rows", ">= 1", t.batch_rows)
        need(s.num_samples >= 1, "sampling.num_samples", ">= 1", s.num_samples)
        need(s.temperature >= 0, "sampling.temperature", ">= 0 (0 = greedy)", s.temperature)
        need(0 < s.top_p <= 1, "sampling.top_p", "in (0, 1]", s.top_p)
        need(s.max_new_tokens >= 1, "sampling.max_new_tokens", ">= 1", s.max_new_tokens)
        need(bool(d.input_file), "data.input_file", "a data file", d.input_file)
        need(d.output_file.endswith(".jsonl"), "data.output_file", "a .jsonl path", d.output_file)
        need("{question}" in t.prompt, "teacher.prompt", "a template containing {question}", t.prompt)
        need(self.filter.keep_per_row >= 0, "filter.keep_per_row", ">= 0", self.filter.keep_per_row)
        need(self.filter.number_tolerance >= 0, "filter.number_tolerance", ">= 0", self.filter.number_tolerance)
        return self


def load_distill_config(path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any):
    """Defaults <- YAML file <- dotted ``section.key=value`` overrides, then validation (as the trainer's config)."""
    cfg = DistillConfig()
    if defaults:
        apply_mapping(cfg, defaults, "defaults")
    if path:
        apply_mapping(cfg, read_yaml_file(path), str(path))
    for text in overrides or []:
        key = text.removeprefix("--").split("=", 1)[0]
        if "=" in text and _is_str_field(cfg, key):  # prompts hold "{question}" and ": ", not YAML mappings
            value: Any = text.split("=", 1)[1]
        else:
            key, value = parse_override(text)
        apply_mapping(cfg, {key: value}, "command line")
    return cfg.validate()


def _is_str_field(obj: Any, key: str) -> bool:
    for name in key.split("."):
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, name)
    return isinstance(obj, str)


# ---- answers -------------------------------------------------------------------------------------------------

_FINAL = [
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"\*\*\s*answer\s*:?\s*\*\*\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"(?:final )?answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"(?:final )?answer\s*:\s*(.+)", re.IGNORECASE),
]
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$")
_OPTION = re.compile(r"^(?:\(([a-h])\)|([a-h])[.):]?)(?:\s.*)?$")  # "b", "(b) cat", "b. cat", "b) cat"


def extract_answer(text: str) -> str:
    """The final answer stated in a reply: the last "\\boxed{X}", "**Answer:** X", "The answer is X" or "Answer: X"
    (the rest of that line), else the reply's last non-empty line."""
    for pattern in _FINAL:
        hits = list(pattern.finditer(text))
        if hits:
            return hits[-1].group(1).splitlines()[0].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize_final(text: str) -> str:
    """Canonical form for matching: lower case, no markdown / quotes / trailing period; a number as a number
    ("1,000.0" -> "1000", "50%" -> "50"), an option "(B) cat" -> "b", "Yes, it is" -> "yes"."""
    t = text.strip().strip("*`'\" ").lower()
    t = re.sub(r"\s+", " ", t).rstrip(".").strip()
    t = re.sub(r"^(?:the |a |an )", "", t)
    if t.startswith(("yes", "no")) and re.match(r"^(yes|no)\b", t):
        return t.split(None, 1)[0].strip(",.!")
    num = t.replace(",", "").replace("$", "").rstrip("%").strip()
    if _NUMBER.match(num):
        value = float(num)
        return str(int(value)) if value.is_integer() else repr(value)
    m = _OPTION.match(t)
    return (m.group(1) or m.group(2)) if m else t


def answers_match(predicted: str, gold: str, *, number_tolerance: float = 0.0) -> bool:
    """LLaVA-Reasoner-style answer matching on normalized forms: numbers within a relative tolerance (exact by
    default), option letters, yes/no, else equal text."""
    p, g = normalize_final(predicted), normalize_final(gold)
    if not g:
        return False
    if _NUMBER.match(p) and _NUMBER.match(g):
        a, b = float(p), float(g)
        return abs(a - b) <= number_tolerance * abs(b) if number_tolerance > 0 else a == b
    return p == g


# ---- teachers ------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    rationale: str  # the text kept as the SFT rationale
    answer: str  # the teacher's final answer as stated (before normalization)


class LocalTeacher:
    """A transformers checkpoint sampling on this machine (batched: rows x samples per ``generate``)."""

    def __init__(self, cfg: DistillConfig):
        import torch

        from .config import ModelConfig
        from .modeling import Codec, load_model

        t = cfg.teacher
        want_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if want_cuda else "cpu")
        mcfg = ModelConfig(path=t.path, dtype=t.dtype)
        self.model, self.tok, self.image_processor = load_model(mcfg, self.device, trainable=False)
        self.codec = Codec(self.tok, self.image_processor, cfg.format)
        self.cfg = cfg
        if t.template == "chat":
            if self.image_processor is not None:
                raise ValueError(
                    "teacher.template=chat is for text models; serve a vision-language teacher through "
                    "teacher.kind=openai (e.g. vLLM) or use teacher.template=trainer"
                )
            if not getattr(self.tok, "chat_template", None):
                raise ValueError(f"teacher.template=chat: the tokenizer of {t.path!r} has no chat template")

    def name(self) -> str:
        return f"local:{self.cfg.teacher.path}"

    def sample_rows(self, rows: list[Example]) -> list[list[Reply]]:
        from .rollout import generate, sample_chains

        s, n = self.cfg.sampling, self.cfg.sampling.num_samples
        temperature = s.temperature if s.temperature > 0 else None
        prompted = [dataclasses.replace(e, question=self.cfg.teacher.prompt.format(question=e.question)) for e in rows]
        if self.cfg.teacher.template == "trainer":
            prompts = [self.codec.prompt(e) for e in prompted for _ in range(n)]
            chains = sample_chains(
                self.model,
                self.codec,
                prompts,
                max_rationale_tokens=s.max_new_tokens,
                max_answer_tokens=s.answer_max_tokens,
                rationale_temperature=temperature,
                answer_temperature=None,
            )
            replies = [
                Reply(self.codec.decode(c.rationale).strip(), self.codec.decode(c.answer).strip()) for c in chains
            ]
        else:
            from .modeling import Prompt

            prompts = []
            for e in prompted:
                messages = (
                    [{"role": "system", "content": self.cfg.teacher.system}] if self.cfg.teacher.system else []
                ) + [{"role": "user", "content": e.question}]
                ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
                prompts += [Prompt(ids)] * n
            eos = self.tok.eos_token_id
            out = generate(
                self.model, self.codec, prompts, max_new_tokens=s.max_new_tokens, eos_id=eos, temperature=temperature
            )
            texts = [self.codec.decode(ids).strip() for ids, _ in out]
            replies = [Reply(t, extract_answer(t)) for t in texts]
        return [replies[i * n : (i + 1) * n] for i in range(len(rows))]


def _image_data_url(example: Example) -> str | None:
    image = example.load_image()
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class EndpointTeacher:
    """An OpenAI-compatible chat endpoint through the ``openai`` client (optional dependency)."""

    def __init__(self, cfg: DistillConfig):
        try:
            import openai
        except ImportError as exc:
            raise ImportError(
                "teacher.kind=openai needs the openai package: pip install 'lacot-kernels[distill]' (or openai)"
            ) from exc
        t = cfg.teacher
        key = os.environ.get(t.api_key_env, "")
        if not key:
            raise ValueError(
                f"teacher.kind=openai: the environment variable {t.api_key_env} (teacher.api_key_env) is empty; "
                "export the API key there (a local server that ignores keys still needs some value, e.g. EMPTY)"
            )
        self.client = openai.OpenAI(
            api_key=key, base_url=t.base_url or None, timeout=t.timeout_s, max_retries=t.max_retries
        )
        self.cfg = cfg

    def name(self) -> str:
        t = self.cfg.teacher
        return f"openai:{t.model}@{t.base_url or 'default'}"

    def sample_row(self, row: Example, index: int = 0) -> list[Reply]:
        s = self.cfg.sampling
        text = self.cfg.teacher.prompt.format(question=row.question)
        url = _image_data_url(row)
        content: Any = text if url is None else [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ]  # fmt: skip
        messages = ([{"role": "system", "content": self.cfg.teacher.system}] if self.cfg.teacher.system else []) + [
            {"role": "user", "content": content}
        ]
        resp = self.client.chat.completions.create(
            model=self.cfg.teacher.model,
            messages=messages,
            n=s.num_samples,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            seed=s.seed + index,  # per row: rows with the same text (other images) must not share samples
        )
        texts = [(c.message.content or "").strip() for c in resp.choices]
        if len(texts) != s.num_samples:
            raise RuntimeError(f"the endpoint returned {len(texts)} choices, asked for n={s.num_samples}")
        return [Reply(t, extract_answer(t)) for t in texts]


# ---- the crash-safe writer -------------------------------------------------------------------------------------


class Output:
    """Append-only JSONL output + ``.done`` index (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done_path = self.path.with_name(self.path.name + ".done")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[int, dict[str, int]] = {}
        length = 0
        if self.done_path.exists():
            for line in self.done_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line: that row was not finished
                    break
                self.done[int(rec["row"])] = rec
                length = max(length, int(rec["bytes"]))
            self._rewrite_done()
        # Drop anything after the last finished row (a row cut off by a crash is redone).
        with open(self.path, "ab") as f:
            if f.tell() != length:
                f.truncate(length)
                f.flush()
                os.fsync(f.fileno())

    def _rewrite_done(self) -> None:
        tmp = self.done_path.with_name(self.done_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.done.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.done_path)

    def write_row(self, row: int, records: list[dict[str, Any]], tried: int) -> None:
        with open(self.path, "ab") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        rec = {"row": row, "bytes": size, "tried": tried, "kept": len(records)}
        with open(self.done_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row] = rec


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    output: Path
    rows: int  # input rows
    rows_done_now: int  # rows processed by this call (the rest were done before a restart)
    tried: int  # rationales sampled, over all rows
    kept: int  # rationales kept, over all rows
    rows_with_kept: int
    summary_path: Path
    seconds: float


def _image_for_output(e: Example, out_dir: Path, row: int) -> Any:
    if e.image is None:
        return None
    if isinstance(e.image, str):
        return os.path.abspath(e.image)
    path = out_dir / f"{row:08d}.png"  # bytes or a decoded image: written next to the output
    path.parent.mkdir(parents=True, exist_ok=True)
    e.load_image().save(path)
    return os.path.abspath(path)


def _records(
    cfg: DistillConfig, teacher_name: str, row: int, e: Example, replies: list[Reply], out: Output
) -> list[dict[str, Any]]:
    s = cfg.sampling
    provenance_base = {
        "teacher": teacher_name,
        "template": cfg.teacher.template if cfg.teacher.kind == "local" else "chat",
        "prompt": cfg.teacher.prompt,
        "system": cfg.teacher.system,
        "sampling": dataclasses.asdict(s),
        "source": f"{cfg.data.input_file}:{row}",
    }
    kept = []
    for j, r in enumerate(replies):
        if not r.rationale or not answers_match(r.answer, e.answer, number_tolerance=cfg.filter.number_tolerance):
            continue
        kept.append(
            {
                "question": e.question,
                "answer": e.answer,
                "rationale": r.rationale,
                "image": _image_for_output(e, out.path.with_name(out.path.stem + "_images"), row),
                "provenance": {**provenance_base, "sample": j, "teacher_answer": r.answer},
            }
        )
        if cfg.filter.keep_per_row and len(kept) >= cfg.filter.keep_per_row:
            break
    return kept


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run(cfg: DistillConfig) -> DistillResult:
    """Distill every row of ``data.input_file`` not yet in the done index; write the summary."""
    cfg.validate()
    start = time.perf_counter()
    d = cfg.data
    data_cfg = DataConfig(
        question_field=d.question_field,
        answer_field=d.answer_field,
        image_field=d.image_field,
        image_root=d.image_root,
    )
    examples = load_examples(d.input_file, data_cfg, need_rationale=False, limit=d.limit)
    out = Output(Path(d.output_file))
    todo = [i for i in range(len(examples)) if i not in out.done]
    teacher = LocalTeacher(cfg) if cfg.teacher.kind == "local" else EndpointTeacher(cfg)
    name = teacher.name()
    bar = None
    if d.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="distill", unit="row", file=sys.stderr)
    totals = {"kept": sum(r["kept"] for r in out.done.values()), "tried": sum(r["tried"] for r in out.done.values())}

    def finish(i: int, replies: list[Reply]) -> None:
        records = _records(cfg, name, i, examples[i], replies, out)
        out.write_row(i, records, tried=len(replies))
        totals["kept"] += len(records)
        totals["tried"] += len(replies)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kept=f"{totals['kept']}/{totals['tried']}")

    if isinstance(teacher, LocalTeacher):
        import torch

        torch.manual_seed(cfg.sampling.seed)
        for chunk in _batches(todo, cfg.teacher.batch_rows):
            for i, replies in zip(chunk, teacher.sample_rows([examples[i] for i in chunk]), strict=True):
                finish(i, replies)
    else:
        _run_concurrent(teacher, examples, todo, cfg.teacher.concurrency, finish)
    if bar is not None:
        bar.close()
    summary = _summary(out, len(examples))
    summary_path = out.path.with_name(out.path.name + ".summary.json")
    summary.update(teacher=name, seconds_this_call=time.perf_counter() - start)
    summary_path.write_text(json.dumps(summary, indent=2))
    return DistillResult(
        out.path,
        len(examples),
        len(todo),
        summary["tried"],
        summary["kept"],
        summary["rows_with_kept"],
        summary_path,
        time.perf_counter() - start,
    )


def _run_concurrent(teacher: EndpointTeacher, examples: list[Example], todo: Iterable[int], workers: int, finish):
    """Requests in flight from a thread pool; results are written by this thread only, as they complete."""
    pending: dict[Future, int] = {}
    it = iter(todo)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            while len(pending) < 2 * workers:  # a bounded window: never queue the whole dataset
                i = next(it, None)
                if i is None:
                    break
                pending[pool.submit(teacher.sample_row, examples[i], i)] = i
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                finish(i, fut.result())  # an error that outlived the client's retries stops the run (resumable)


def _summary(out: Output, rows: int) -> dict[str, Any]:
    recs = sorted(out.done.values(), key=lambda r: r["row"])
    tried = sum(r["tried"] for r in recs)
    kept = sum(r["kept"] for r in recs)
    hist: dict[str, int] = {}
    for r in recs:
        hist[str(r["kept"])] = hist.get(str(r["kept"]), 0) + 1
    return {
        "rows": rows,
        "rows_done": len(recs),
        "tried": tried,
        "kept": kept,
        "kept_fraction": kept / tried if tried else 0.0,
        "rows_with_kept": sum(r["kept"] > 0 for r in recs),
        "rows_by_kept": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "per_row": [{"row": r["row"], "tried": r["tried"], "kept": r["kept"]} for r in recs],
    }


def run_cli(cfg: DistillConfig) -> DistillResult:
    """``lacot-train distill``: :func:`run` and a summary line."""
    res = run(cfg)
    print(
        f"distill: kept {res.kept} / {res.tried} rationales ({res.kept / max(1, res.tried):.1%}); "
        f"{res.rows_with_kept} / {res.rows} rows have at least one; {res.rows_done_now} rows this run, "
        f"{res.seconds:.0f}s\noutput:  {res.output}\nsummary: {res.summary_path}"
    )
    return res


def main(argv: list[str]) -> int:
    """The ``distill`` subcommand without the trainer's CLI (kept for scripts)."""
    if argv and argv[0] in ("-h", "--help"):
        print((__doc__ or "").strip())
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_distill_config(path, argv[1:] if path else argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lacot-train distill: {exc}", file=sys.stderr)
        return 2
    res = run(cfg)
    print(
        f"distill: kept {res.kept} / {res.tried} rationales ({res.kept / max(1, res.tried):.1%}); "
        f"{res.rows_with_kept} / {res.rows} rows have at least one; {res.rows_done_now} rows this run, "
        f"{res.seconds:.0f}s\noutput:  {res.output}\nsummary: {res.summary_path}"
    )
    return 0
