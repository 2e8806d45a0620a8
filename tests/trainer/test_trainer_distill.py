"""``lacot-train distill``: answer matching, a local teacher, an OpenAI-protocol endpoint, crash safety."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from lacot_kernels.trainer import distill
from lacot_kernels.trainer.data import Example, load_examples
from lacot_kernels.trainer.distill import answers_match, extract_answer, load_distill_config, normalize_final


@pytest.mark.parametrize(
    "reply, stated, norm",
    [
        ("I count 3 and 2.\nThe answer is 5.", "5.", "5"),
        ("First 3, then 4. Final answer: 1,000", "1,000", "1000"),
        ("so x = \\boxed{12.50}. Done.", "12.50", "12.5"),
        ("Reasoning...\n**Answer:** (B) a cat", "(B) a cat", "b"),
        ("It is raining.\nAnswer: Yes, it is.", "Yes, it is.", "yes"),
        ("The answer is no.", "no.", "no"),
        ("The answer is C. Paris", "C. Paris", "c"),
        ("some text\nThe Eiffel Tower", "The Eiffel Tower", "eiffel tower"),
        ("The answer is 50%.", "50%.", "50"),
        ("", "", ""),
    ],
)
def test_extract_and_normalize(reply, stated, norm):
    assert extract_answer(reply) == stated
    assert normalize_final(stated) == norm


def test_answers_match_rules():
    assert answers_match("1,000.0", "1000") and answers_match("$5", "5.00")
    assert not answers_match("5.2", "5") and answers_match("5.2", "5", number_tolerance=0.05)
    assert answers_match("(b) cat", "B") and not answers_match("(c) dog", "B")
    assert answers_match("No.", "no") and not answers_match("not sure", "no") and not answers_match("none", "no")
    assert answers_match("the Eiffel Tower", "Eiffel tower") and not answers_match("Paris", "Eiffel tower")
    assert not answers_match("", "")  # an empty gold answer never matches


def _cfg(teacher_dir: Path, data: Path, out: Path, **sections):
    mapping = {
        "teacher": {"kind": "local", "path": str(teacher_dir), "prompt": "{question}", "batch_rows": 4},
        "sampling": {"num_samples": 4, "temperature": 1.0, "max_new_tokens": 24, "answer_max_tokens": 3},
        "data": {"input_file": str(data), "output_file": str(out), "limit": 12, "progress": False},
    }
    for k, v in sections.items():
        mapping.setdefault(k, {}).update(v)
    return load_distill_config(None, [], **mapping)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_output(res, gold: list[Example]) -> list[dict]:
    rows = _rows(res.output)
    done = [json.loads(line) for line in Path(str(res.output) + ".done").read_text().splitlines()]
    assert sorted(d["row"] for d in done) == list(range(len(gold))), "every row exactly once in the done index"
    for d in done:  # the output holds exactly the kept rationales of each row, once
        mine = [r for r in rows if r["provenance"]["source"].endswith(f":{d['row']}")]
        assert len(mine) == d["kept"] and d["tried"] == 4
        assert len({r["provenance"]["sample"] for r in mine}) == len(mine)
    for r in rows:
        src = int(r["provenance"]["source"].rsplit(":", 1)[1])
        assert r["answer"] == gold[src].answer and r["question"] == gold[src].question
        assert answers_match(r["provenance"]["teacher_answer"], r["answer"])
        assert r["rationale"].strip()
    summary = json.loads(res.summary_path.read_text())
    assert summary["tried"] == 4 * len(gold) and summary["kept"] == len(rows)
    assert [p["kept"] for p in summary["per_row"]] == [d["kept"] for d in sorted(done, key=lambda d: d["row"])]
    return rows


def test_local_teacher_keeps_exactly_the_matching_rationales(sft_text_model, text_data, tmp_path, monkeypatch):
    seen: list[list[distill.Reply]] = []
    original = distill.LocalTeacher.sample_rows

    def spy(self, rows):
        out = original(self, rows)
        seen.extend(out)
        return out

    monkeypatch.setattr(distill.LocalTeacher, "sample_rows", spy)
    cfg = _cfg(sft_text_model, text_data["train"], tmp_path / "cot.jsonl")
    res = distill.run(cfg)
    gold = load_examples(text_data["train"], cfg_data(), need_rationale=False, limit=12)
    rows = _check_output(res, gold)
    # Kept = the replies whose final answer matches, no more, no less (rows are done in order here).
    expected = [
        (i, j)
        for i, replies in enumerate(seen)
        for j, r in enumerate(replies)
        if answers_match(r.answer, gold[i].answer)
    ]
    got = [(int(r["provenance"]["source"].rsplit(":", 1)[1]), r["provenance"]["sample"]) for r in rows]
    assert got == expected
    assert 0 < res.kept < res.tried, f"the tiny SFT teacher should be right only sometimes: {res.kept}/{res.tried}"
    prov = rows[0]["provenance"]
    assert prov["teacher"] == f"local:{sft_text_model}" and prov["prompt"] == "{question}"
    assert prov["sampling"]["temperature"] == 1.0 and prov["sampling"]["num_samples"] == 4
    # The output is SFT data as it stands.
    assert len(load_examples(res.output, cfg_data(), need_rationale=True)) == len(rows)
    print(f"\nlocal teacher: kept {res.kept} / {res.tried} rationales, {res.rows_with_kept} / {res.rows} rows")


def cfg_data():
    from lacot_kernels.trainer.config import DataConfig

    return DataConfig()


def test_crash_between_output_and_done_index_redoes_only_that_row(sft_text_model, text_data, tmp_path, monkeypatch):
    """A crash after a row's lines reached the output but before its done record: the rerun drops those lines
    (truncates to the last recorded length) and redoes that row only."""
    out = tmp_path / "cot.jsonl"
    cfg = _cfg(sft_text_model, text_data["train"], out, teacher={"batch_rows": 1})
    real_write = distill.Output.write_row
    calls = {"n": 0}

    def crashing(self, row, records, tried):
        calls["n"] += 1
        if calls["n"] == 5:
            with open(self.path, "ab") as f:  # the row's lines land, then the process "dies"
                f.write(b'{"question": "torn row", "answer": "1", "rationale": "x"}\n{"question": "to')
            raise KeyboardInterrupt
        return real_write(self, row, records, tried)

    monkeypatch.setattr(distill.Output, "write_row", crashing)
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg)
    assert len((Path(str(out) + ".done")).read_text().splitlines()) == 4
    monkeypatch.setattr(distill.Output, "write_row", real_write)
    res = distill.run(cfg)
    assert res.rows_done_now == 8
    assert "torn row" not in out.read_text()
    _check_output(res, load_examples(text_data["train"], cfg_data(), need_rationale=False, limit=12))


def test_sigkill_and_resume(sft_text_model, text_data, tmp_path):
    """``lacot-train distill`` killed with SIGKILL mid-run, then rerun: every row done once, none lost."""
    out = tmp_path / "cot.jsonl"
    done = Path(str(out) + ".done")
    args = [
        f"teacher.path={sft_text_model}",
        "teacher.kind=local",
        "teacher.prompt={question}",
        "teacher.batch_rows=1",
        "sampling.num_samples=4",
        "sampling.temperature=1.0",
        "sampling.max_new_tokens=24",
        "sampling.answer_max_tokens=3",
        f"data.input_file={text_data['train']}",
        f"data.output_file={out}",
        "data.limit=40",
        "data.progress=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lacot_kernels.trainer", "distill", *args], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if done.exists() and len(done.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(done.read_text().splitlines())
    assert 3 <= before < 40
    r = subprocess.run(
        [sys.executable, "-m", "lacot_kernels.trainer", "distill", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept" in r.stdout and f"{40 - before} rows this run" in r.stdout
    res = distill.DistillResult(out, 40, 40 - before, 0, 0, 0, Path(str(out) + ".summary.json"), 0.0)
    _check_output(res, load_examples(text_data["train"], cfg_data(), need_rationale=False, limit=40))


# ---- the endpoint path: an OpenAI-protocol server on 127.0.0.1, backed by the tiny model -------------------------


class _Server:
    """``POST /v1/chat/completions`` answered by a :class:`distill.LocalTeacher` (trainer layout) on the tiny
    model; the reply text is ``<rationale>\\nThe answer is <answer>.``. Records every request."""

    def __init__(self, model_dir: Path):
        cfg = load_distill_config(
            None,
            [],
            teacher={"kind": "local", "path": str(model_dir), "prompt": "{question}"},
            sampling={"max_new_tokens": 24, "answer_max_tokens": 3},
            data={"input_file": "unused", "output_file": "unused.jsonl"},
        )
        self.teacher = distill.LocalTeacher(cfg)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["_auth"] = self.headers.get("Authorization")
                body["_path"] = self.path
                content = body["messages"][-1]["content"]
                text, image = content, None
                if isinstance(content, list):
                    from PIL import Image

                    text = next(c["text"] for c in content if c["type"] == "text")
                    url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
                    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                with server.lock:
                    server.requests.append(body)
                    server.teacher.cfg.sampling.num_samples = body["n"]
                    server.teacher.cfg.sampling.temperature = body["temperature"]
                    (replies,) = server.teacher.sample_rows([Example(text, "", None, image, "http")])
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": f"{r.rationale}\nThe answer is {r.answer}."},
                        "finish_reason": "stop",
                    }
                    for i, r in enumerate(replies)
                ]
                payload = json.dumps(
                    {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_openai_endpoint_teacher(kind, tmp_path, monkeypatch, request):
    pytest.importorskip("openai")
    model = request.getfixturevalue(f"sft_{kind}_model")
    data = request.getfixturevalue(f"{kind}_data")["train"]
    server = _Server(model)
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-test-123")
    try:
        cfg = load_distill_config(
            None,
            [],
            teacher={
                "kind": "openai",
                "model": "tiny",
                "base_url": server.url,
                "api_key_env": "TEST_TEACHER_KEY",
                "concurrency": 4,
                "prompt": "{question}",
                "max_retries": 0,
            },
            sampling={"num_samples": 3, "temperature": 0.9, "max_new_tokens": 24},
            data={"input_file": str(data), "output_file": str(tmp_path / "cot.jsonl"), "limit": 8, "progress": False},
        )
        res = distill.run(cfg)
    finally:
        server.close()
    assert len(server.requests) == 8
    for body in server.requests:
        assert body["_auth"] == "Bearer sk-test-123" and body["_path"] == "/v1/chat/completions"
        assert body["model"] == "tiny" and body["n"] == 3 and body["temperature"] == 0.9 and body["max_tokens"] == 24
        has_image = isinstance(body["messages"][-1]["content"], list)
        assert has_image == (kind == "vl")
    rows = [json.loads(line) for line in res.output.read_text().splitlines()]
    assert res.tried == 24 and res.kept == len(rows)
    for r in rows:
        assert answers_match(r["provenance"]["teacher_answer"], r["answer"])
        assert r["provenance"]["teacher"] == f"openai:tiny@{server.url}"
        assert r["rationale"].endswith(f"The answer is {r['provenance']['teacher_answer']}")
        if kind == "vl":
            assert Path(r["image"]).is_file()
    print(f"\nendpoint teacher ({kind}): kept {res.kept} / {res.tried}, {res.rows_with_kept} / {res.rows} rows")


def test_endpoint_without_key_is_a_clear_error(tmp_path, monkeypatch, text_data):
    pytest.importorskip("openai")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cfg = load_distill_config(
        None,
        [],
        teacher={"kind": "openai", "model": "m", "api_key_env": "NO_SUCH_KEY_VAR"},
        data={"input_file": str(text_data["train"]), "output_file": str(tmp_path / "o.jsonl"), "progress": False},
    )
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        distill.run(cfg)


@pytest.mark.parametrize(
    "override, match",
    [
        ("teacher.kind=http", "teacher.kind"),
        ("data.output_file=out.parquet", "data.output_file"),
        ("teacher.prompt=no placeholder", "teacher.prompt"),
        ("sampling.num_samples=0", "sampling.num_samples"),
        ("teacher.nope=1", "nope"),
    ],
)
def test_config_errors_name_the_key(override, match):
    base = ["teacher.path=x", "data.input_file=a.jsonl", "data.output_file=b.jsonl"]
    with pytest.raises(ValueError, match=match):
        load_distill_config(None, [*base, override])


def test_shipped_distill_config_loads():
    import lacot_kernels.trainer as trainer_pkg

    path = Path(trainer_pkg.__file__).parent / "configs" / "distill.yaml"
    cfg = load_distill_config(path, ["teacher.model=gpt-4o", "data.input_file=a.jsonl", "data.output_file=b.jsonl"])
    assert cfg.teacher.kind == "openai" and "{question}" in cfg.teacher.prompt and cfg.sampling.num_samples == 4


def test_cli_help_and_bad_override(capsys):
    from lacot_kernels.trainer.__main__ import main

    with pytest.raises(SystemExit) as exit_:  # tyro's --help lists every DistillConfig field
        main(["distill", "--help"])
    assert exit_.value.code == 0
    flat = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for key in ("--teacher.kind ", "--teacher.base_url ", "--sampling.num_samples ", "--data.output_file "):
        assert key in flat, key
    assert main(["distill", "teacher.kind=http", "data.input_file=a.jsonl", "data.output_file=b.jsonl"]) == 2
    assert "teacher.kind" in capsys.readouterr().err
