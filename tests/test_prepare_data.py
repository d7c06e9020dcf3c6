"""python -m pretrain.prepare_data: real text round-trips through the shards in the seeded order, a run killed at
random moments resumes to byte-identical output, every input format and a bucket URL work, bad input exits 2.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

from pretrain.data.format import discover_shards, inspect_shards
from pretrain.prepare import command as prepare_data
from pretrain.prepare import readers, tokenizing
from pretrain.prepare.inputs import materialize_inputs, plan_inputs
from pretrain.prepare.sample_text import write_sample_text
from pretrain.prepare.shuffle import document_keys
from pretrain.storage import StorageOptions, open_storage

REPO = Path(__file__).resolve().parent.parent
DATASET_KEYS = {"format_version", "tokenizer", "vocab_size", "eos_token_id", "dtype", "seq_len_hint", "shards",
                "eval_shards", "sources", "totals", "eval_split", "packing_efficiency", "seed"}
VOCAB = 600
KILL_TIMEOUT_SECONDS = 120


def prep(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.prepare_data", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def read_documents(path: Path) -> list[tuple[int, str]]:
    """(byte offset of the line, text) of every line of a .jsonl file."""
    documents, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        documents.append((offset, json.loads(line)["text"]))
        offset += len(line)
    return documents


def decoded_documents(out: Path) -> tuple[dict, list[np.ndarray]]:
    """Every document in stream order: the training shards', then the eval split's (the end of the key order)."""
    meta = json.loads((out / "dataset.json").read_text())
    ids = np.concatenate([np.load(out / shard["path"])["input_ids"] for shard in meta["shards"] + meta["eval_shards"]])
    ends = np.flatnonzero(ids == meta["eos_token_id"])
    assert len(ends) and ends[-1] == len(ids) - 1, "the stream must end with EOS"
    return meta, [doc[:-1] for doc in np.split(ids, ends + 1)[:-1]]


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 400 kB of stdlib docstrings, re-split into four .jsonl files so the run has several sources."""
    raw = tmp_path_factory.mktemp("sample-text-raw")
    lines = b"".join(p.read_bytes() for p in write_sample_text(raw, 400_000)).splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("corpus")
    for index in range(4):
        (folder / f"part_{index}.jsonl").write_bytes(b"".join(lines[index::4]))
    return folder


@pytest.fixture(scope="session")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted reference run with a trained tokenizer."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = prep(str(corpus), "--out", str(out), "--train-tokenizer", "--vocab-size", str(VOCAB),
                  "--shard-tokens", "7000", "--bucket-tokens", "20000", "--workers", "2", "--seq-len-hint", "128")
    assert result.returncode == 0, result.stderr
    return out


def expected_order(corpus: Path, seed: int) -> list[str]:
    """The documented order: every document sorted by its key hash(seed, source index, byte offset)."""
    texts, keys = [], []
    for source_index, path in enumerate(sorted(corpus.glob("*.jsonl"), key=str)):
        documents = read_documents(path)
        texts.extend(text for _, text in documents)
        keys.append(document_keys(seed, np.full(len(documents), source_index), np.array([o for o, _ in documents])))
    return [texts[i] for i in np.argsort(np.concatenate(keys), kind="stable")]


def test_real_text_round_trips_in_the_seeded_order(corpus: Path, trained: Path):
    meta, documents = decoded_documents(trained)
    tokenizer = Tokenizer.from_file(str(trained / "tokenizer.json"))
    expected = expected_order(corpus, seed=0)
    assert [tokenizer.decode(doc.tolist()) for doc in documents] == expected
    assert [doc.tolist() for doc in documents] == [tokenizer.encode(t).ids for t in expected]
    assert set(meta) == DATASET_KEYS
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["seed"] == 0
    assert meta["tokenizer"]["file"] == "tokenizer.json"
    assert meta["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert meta["totals"] == {"documents": len(expected),
                              "tokens": sum(len(d) + 1 for d in documents)}
    assert [s["num_tokens"] for s in meta["shards"][:-1]] == [7000] * (len(meta["shards"]) - 1)
    assert meta["seq_len_hint"] == 128 and 0.9 < meta["packing_efficiency"] < 1.0
    assert len(meta["shards"]) >= 10  # several shards, several shuffle buckets
    # The corpus order is gone: the first documents of the first shard come from all over the corpus.
    in_corpus_order = [t for p in sorted(corpus.glob("*.jsonl"), key=str) for _, t in read_documents(p)]
    assert expected != in_corpus_order
    # The default eval split: whole documents at the end of the key order, at least the auto target of tokens, in
    # shards of their own; the training shards end with a whole document.
    split = meta["eval_split"]
    total = meta["totals"]["tokens"]
    target = min(max(round(0.01 * total), 16_384), int(0.1 * total))
    eval_tokens = sum(s["num_tokens"] for s in meta["eval_shards"])
    assert split["requested"] == "auto" and split["tokens"] == eval_tokens >= target
    assert eval_tokens - target < max(len(d) + 1 for d in documents)  # the last document that crosses the cut
    assert sum(len(d) + 1 for d in documents[-split["documents"]:]) == eval_tokens
    train_stream = np.concatenate([np.load(trained / s["path"])["input_ids"] for s in meta["shards"]])
    assert train_stream[-1] == meta["eos_token_id"] and len(train_stream) == total - eval_tokens
    assert [s["path"] for s in meta["eval_shards"]] == [f"eval_{i:05d}.npz" for i in range(len(meta["eval_shards"]))]
    # The trainer's own shard checks accept every shard.
    infos = inspect_shards(trained, discover_shards(trained), 128, meta["vocab_size"])
    assert [i.to_dict() for i in infos] == meta["eval_shards"] + meta["shards"]


def test_order_does_not_depend_on_workers_or_how_work_is_split(corpus: Path, trained: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(readers, "UNIT_BYTES", 10_000)
    monkeypatch.setattr(tokenizing, "PART_TOKENS", 3_000)
    monkeypatch.setattr(tokenizing, "ENCODE_BATCH_CHARS", 5_000)
    out = tmp_path / "out"
    code = prepare_data.main([str(corpus), "--out", str(out), "--tokenizer", str(trained / "tokenizer.json"),
                              "--shard-tokens", "7000", "--bucket-tokens", "5000", "--workers", "1",
                              "--seq-len-hint", "128"])
    assert code == 0
    assert output_files(out) == output_files(trained)


def test_other_seed_other_order(corpus: Path, trained: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = prep(str(corpus), "--out", str(out), "--tokenizer", str(trained / "tokenizer.json"), "--seed", "7",
                  "--shard-tokens", "7000", "--workers", "2")
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    _, documents = decoded_documents(out)
    decoded = [tokenizer.decode(doc.tolist()) for doc in documents]
    assert decoded == expected_order(corpus, seed=7)
    assert decoded != expected_order(corpus, seed=0)


def test_killed_at_random_moments_resumes_to_identical_output(corpus: Path, trained: Path, tmp_path: Path):
    """SIGKILL to the whole process group at seeded moments, each one right after the run recorded new progress (a
    file in its work folder), so every kill lands mid-run whatever the machine's speed; then re-runs to the end."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pretrain.prepare_data", str(corpus), "--out", str(out), "--train-tokenizer",
               "--vocab-size", str(VOCAB), "--shard-tokens", "7000", "--bucket-tokens", "20000", "--workers", "2",
               "--seq-len-hint", "128"]
    rng = random.Random(1234)
    kills, progress_at_last_kill = 0, -1
    for attempt in range(10):
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        if attempt < 6:
            deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
            while process.poll() is None and work_files(out) <= progress_at_last_kill:
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.2))
            if process.poll() is None:
                progress_at_last_kill = work_files(out)
                os.killpg(process.pid, signal.SIGKILL)  # the workers too, as a preempted VM would
                kills += 1
        _, stderr = process.communicate(timeout=KILL_TIMEOUT_SECONDS)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr.decode()
    assert process.returncode == 0
    assert kills >= 2, "the run should have been interrupted at least twice"
    assert output_files(out) == output_files(trained)
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=KILL_TIMEOUT_SECONDS)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def work_files(out: Path) -> int:
    """Files the run has completed so far (its work folder and outputs), each written whole by a rename."""
    return sum(1 for path in out.rglob("*") if path.is_file() and not path.name.endswith(".partial")) if out.exists() else 0


def test_rerun_with_other_arguments_is_refused(corpus: Path, trained: Path, tmp_path: Path):
    out = tmp_path / "out"
    common = [str(corpus), "--out", str(out), "--tokenizer", str(trained / "tokenizer.json"), "--shard-tokens", "7000"]
    assert prep(*common, "--workers", "1").returncode == 0
    refused = prep(*common, "--seed", "3")
    assert refused.returncode == 2
    assert len(error_lines(refused)) == 1 and "--seed 0" in refused.stderr and "delete" in refused.stderr
    assert prep(*common, "--workers", "2").returncode == 0  # the worker count does not change the output


@pytest.fixture(scope="session")
def small_docs(corpus: Path) -> list[str]:
    return [text for _, text in read_documents(sorted(corpus.glob("*.jsonl"))[0])][:40]


def write_formats(folder: Path, documents: list[str]) -> dict[str, list[str]]:
    """The same documents as .jsonl.gz, .jsonl.zst, parquet (several row groups), and .txt; input args per format."""
    folder.mkdir(parents=True)
    lines = b"".join(json.dumps({"text": t, "id": i}).encode() + b"\n" for i, t in enumerate(documents))
    (folder / "docs.jsonl.gz").write_bytes(gzip.compress(lines, mtime=0))
    (folder / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"id": list(range(len(documents))), "body": documents}), folder / "docs.parquet",
                   row_group_size=7)
    txt = folder / "txt"
    txt.mkdir()
    for i, text in enumerate(documents):
        (txt / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
    (folder / "joined.txt").write_text("\n<doc>\n".join(documents), encoding="utf-8")
    return {
        "gz": [str(folder / "docs.jsonl.gz")],
        "zst": [str(folder / "docs.jsonl.zst")],
        "parquet": [str(folder / "docs.parquet"), "--text-field", "body"],
        "txt-files": [str(txt / "*.txt")],
        "txt-separator": [str(folder / "joined.txt"), "--separator", "\n<doc>\n"],
    }


@pytest.mark.parametrize("form", ["gz", "zst", "parquet", "txt-files", "txt-separator"])
def test_every_input_format(form: str, small_docs: list[str], trained: Path, tmp_path: Path):
    inputs = write_formats(tmp_path / "in", small_docs)[form]
    out = tmp_path / "out"
    result = prep(*inputs, "--out", str(out), "--tokenizer", str(trained / "tokenizer.json"), "--workers", "2",
                  "--shard-tokens", "3000")
    assert result.returncode == 0, result.stderr
    meta, documents = decoded_documents(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    decoded = [tokenizer.decode(doc.tolist()) for doc in documents]
    assert sorted(decoded) == sorted(small_docs)
    assert decoded != small_docs
    assert meta["totals"]["documents"] == len(small_docs)


MD_BREAK = b"\n---\n"


def read_markdown(source: readers.Source, span: readers.Span, text_field: str,
                  separator: str | None) -> Iterator[readers.Document]:
    """A toy format: one document per `---`-separated section of a .md file, at the section's byte offset."""
    position = 0
    for section in Path(source.path).read_bytes().split(MD_BREAK):
        yield source.index, position, section.decode(), len(section) + len(MD_BREAK)
        position += len(section) + len(MD_BREAK)


def test_a_new_input_format_is_one_registry_entry(small_docs: list[str], trained: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    notes = tmp_path / "notes"
    notes.mkdir()
    sections = {"a.md": small_docs[:12], "b.MD": small_docs[12:20]}
    for name, texts in sections.items():
        (notes / name).write_bytes(MD_BREAK.join(t.encode() for t in texts))
    (notes / "c.rst").write_text("not an input")
    common = ["--tokenizer", str(trained / "tokenizer.json"), "--workers", "1"]

    assert readers.kind_of("a.md") is None
    assert prepare_data.main([str(notes / "a.md"), "--out", str(tmp_path / "refused"), *common]) == 2
    assert "unsupported file type" in capsys.readouterr().err

    monkeypatch.setitem(readers.FORMATS, "markdown", readers.Format("markdown", (".md",), read_markdown))
    # Recognising and planning: the folder's .md files (any case) are inputs, each its own unit.
    assert readers.kind_of("notes/B.MD") == "markdown"
    sources = materialize_inputs(plan_inputs([str(notes)], StorageOptions()), tmp_path / "work")
    assert [(Path(s.url).name, s.kind) for s in sources] == [("a.md", "markdown"), ("b.MD", "markdown")]
    units = readers.plan_units(sources, "text", None)
    assert [u.sources for u in units] == [(0,), (1,)]
    # Reading: the sections, at their byte offsets.
    read = list(readers.read_unit(sources, units[1], "text", None))
    assert [text for _, _, text, _ in read] == sections["b.MD"]
    assert [position for _, position, _, _ in read] == [0, *itertools.accumulate(
        len(t.encode()) + len(MD_BREAK) for t in sections["b.MD"][:-1])]
    # Preparing: every section is a document, in the seeded order of (source index, byte offset).
    out = tmp_path / "out"
    assert prepare_data.main([str(notes), "--out", str(out), *common]) == 0
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    meta, documents = decoded_documents(out)
    every = [document for unit in units for document in readers.read_unit(sources, unit, "text", None)]
    assert [text for _, _, text, _ in every] == [t for texts in sections.values() for t in texts]
    keys = document_keys(0, np.array([d[0] for d in every]), np.array([d[1] for d in every], dtype=np.uint64))
    assert [tokenizer.decode(d.tolist()) for d in documents] == [every[i][2] for i in np.argsort(keys, kind="stable")]
    assert [s["url"] for s in meta["sources"]] == [str(notes / "a.md"), str(notes / "b.MD")]
    # Every message that lists the formats, and the help, take it from the registry.
    capsys.readouterr()
    assert prepare_data.main([str(notes / "c.rst"), "--out", str(tmp_path / "refused"), *common]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "unsupported file type; expected .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .md")
    assert prepare_data.main([str(notes / "*.rst"), "--out", str(tmp_path / "refused"), *common]) == 2
    assert "matches no .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .md file" in capsys.readouterr().err
    assert ".md" in " ".join(prepare_data.build_parser().format_help().split())


def test_output_to_a_bucket_url(corpus: Path, trained: Path, tmp_path: Path):
    url = (tmp_path / "bucket" / "datasets" / "stdlib").as_uri()
    result = prep(str(corpus), "--out", url, "--tokenizer", str(trained / "tokenizer.json"), "--shard-tokens", "7000",
                  "--bucket-tokens", "20000", "--seq-len-hint", "128", "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    storage = open_storage(url)
    keys = [info.key for info in storage.list()]
    assert keys == sorted(output_files(trained))
    for key in keys:
        storage.download(key, tmp_path / "fetched" / key)
    assert output_files(tmp_path / "fetched") == output_files(trained)
    assert not (tmp_path / "work" / "stage").exists()  # the staged copy is removed once uploaded


def test_s3_input_and_output(small_docs: list[str], trained: Path, tmp_path: Path, new_bucket, activate):
    bucket = activate(new_bucket("s3"))
    inputs = open_storage(bucket.url + "/raw")
    local = tmp_path / "docs.jsonl.gz"
    local.write_bytes(gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in small_docs), mtime=0))
    inputs.upload(local, "a/docs.jsonl.gz")
    code = prepare_data.main([bucket.url + "/raw/a/*.jsonl.gz", "--out", bucket.url + "/prepared", "--tokenizer",
                              str(trained / "tokenizer.json"), "--shard-tokens", "3000",
                              "--work-dir", str(tmp_path / "work")])
    assert code == 0
    out = open_storage(bucket.url + "/prepared")
    for info in out.list():
        out.download(info.key, tmp_path / "fetched" / info.key)
    meta, documents = decoded_documents(tmp_path / "fetched")
    assert meta["sources"][0]["url"] == bucket.url + "/raw/a/docs.jsonl.gz"
    assert len(documents) == len(small_docs)


def bad_jsonl(tmp_path: Path) -> list[str]:
    path = tmp_path / "a.jsonl"
    path.write_text('{"content": "hello"}\n')
    return [str(path), "--train-tokenizer", "--vocab-size", "300"]


def corrupt_gz(tmp_path: Path) -> list[str]:
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(b"this is not gzip data at all")
    return [str(path), "--train-tokenizer", "--vocab-size", "300"]


def corrupt_parquet(tmp_path: Path) -> list[str]:
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1 truncated")
    return [str(path), "--train-tokenizer", "--vocab-size", "300"]


def empty_corpus(tmp_path: Path) -> list[str]:
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.txt").write_text("")
    return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), "--train-tokenizer", "--vocab-size", "300"]


def missing_input(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "nope.jsonl"), "--train-tokenizer", "--vocab-size", "300"]


def vocab_too_large(tmp_path: Path, tokenizer: Path) -> list[str]:
    (tmp_path / "a.txt").write_text("some text")
    return [str(tmp_path / "a.txt"), "--tokenizer", str(tokenizer), "--max-vocab-size", "512"]


def no_vocab_size(tmp_path: Path) -> list[str]:
    (tmp_path / "a.txt").write_text("some text")
    return [str(tmp_path / "a.txt"), "--train-tokenizer"]


def not_a_tokenizer(tmp_path: Path) -> list[str]:
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "tok.json").write_text("{}")
    return [str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok.json")]


@pytest.mark.parametrize("make, named", [
    (bad_jsonl, "a.jsonl"), (corrupt_gz, "a.jsonl.gz"), (corrupt_parquet, "a.parquet"), (empty_corpus, "a.jsonl"),
    (missing_input, "nope.jsonl"), (vocab_too_large, "--max-vocab-size"), (no_vocab_size, "--vocab-size"),
    (not_a_tokenizer, "tok.json"),
])
def test_bad_input_is_one_line_and_exit_2(make, named: str, trained: Path, tmp_path: Path):
    args = make(tmp_path, trained / "tokenizer.json") if make is vocab_too_large else make(tmp_path)
    result = prep(*args, "--out", str(tmp_path / "out"))
    lines = error_lines(result)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_text_field_deep_in_a_file_stops_with_one_line(trained: Path, tmp_path: Path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n' * 50 + '{"body": "oops"}\n')
    result = prep(str(path), "--out", str(tmp_path / "out"), "--tokenizer", str(trained / "tokenizer.json"),
                  "--workers", "2")
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "a.jsonl" in lines[0] and "'text'" in lines[0] and "--text-field" in lines[0]


def test_refuses_a_non_empty_output_folder(corpus: Path, trained: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_shard.npz").write_bytes(b"x")
    result = prep(str(corpus), "--out", str(out), "--tokenizer", str(trained / "tokenizer.json"))
    assert result.returncode == 2 and len(error_lines(result)) == 1 and "--out" in result.stderr


def test_sample_text_is_deterministic_real_text(tmp_path: Path):
    first = write_sample_text(tmp_path / "a", 80_000)
    second = write_sample_text(tmp_path / "b", 80_000)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    total = sum(p.stat().st_size for p in first)
    assert 70_000 < total <= 80_000
    texts = [json.loads(line)["text"] for p in first for line in p.read_text().splitlines()]
    words = " ".join(texts).split()
    assert len(words) > 5_000 and sum(w.lower() in {"the", "a", "of", "is"} for w in words) > len(words) / 50


def test_tokenizer_folder_eos_comes_from_its_config(small_docs: list[str], trained: Path, tmp_path: Path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((trained / "tokenizer.json").read_bytes())
    eos_name = Tokenizer.from_file(str(trained / "tokenizer.json")).id_to_token(300)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos_name}}))
    inputs = write_formats(tmp_path / "in", small_docs)["gz"]
    assert prepare_data.main([*inputs, "--out", str(tmp_path / "out"), "--tokenizer", str(folder),
                              "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["eos_token_id"] == 300


@pytest.mark.parametrize("split", ["0", "0.25", "5000"])
def test_the_eval_split_is_whole_documents_at_the_end_of_the_order(split: str, corpus: Path, trained: Path,
                                                                   tmp_path: Path):
    out = tmp_path / "out"
    assert prepare_data.main([str(corpus), "--out", str(out), "--tokenizer", str(trained / "tokenizer.json"),
                              "--shard-tokens", "7000", "--bucket-tokens", "20000", "--workers", "1",
                              "--eval-split", split]) == 0
    meta, documents = decoded_documents(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tokenizer.decode(doc.tolist()) for doc in documents] == expected_order(corpus, seed=0)
    total, held = meta["totals"]["tokens"], sum(s["num_tokens"] for s in meta["eval_shards"])
    target = {"0": 0, "0.25": round(0.25 * total), "5000": 5000}[split]
    assert meta["eval_split"] == {"requested": split, "documents": meta["eval_split"]["documents"], "tokens": held}
    assert target <= held < target + max(len(d) + 1 for d in documents)
    if split == "0":  # no split: the shards of before, every one a training shard
        assert meta["eval_shards"] == [] and not list(out.glob("eval_*.npz"))
        assert [s["num_tokens"] for s in meta["shards"][:-1]] == [7000] * (len(meta["shards"]) - 1)
    else:
        assert sum(len(d) + 1 for d in documents[-meta["eval_split"]["documents"]:]) == held
        assert [s["num_tokens"] for s in meta["eval_shards"][:-1]] == [7000] * (len(meta["eval_shards"]) - 1)


@pytest.mark.parametrize("split, fragment", [("lots", "--eval-split lots: expected auto"),
                                             ("10000000", "leaves no training text"), ("-1", "--eval-split -1")])
def test_a_bad_eval_split_is_one_line_and_exit_2(split: str, fragment: str, small_docs: list[str], trained: Path,
                                                 tmp_path: Path):
    inputs = write_formats(tmp_path / "in", small_docs)["gz"]
    result = prep(*inputs, "--out", str(tmp_path / "out"), "--tokenizer", str(trained / "tokenizer.json"),
                  "--eval-split", split)
    errors = [line for line in error_lines(result) if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr
    assert error_lines(result)[-1] == errors[0]  # a split too large is known once tokenized: the last line


def test_a_rerun_with_another_eval_split_is_refused(small_docs: list[str], trained: Path, tmp_path: Path):
    inputs = write_formats(tmp_path / "in", small_docs)["gz"]
    common = [*inputs, "--out", str(tmp_path / "out"), "--tokenizer", str(trained / "tokenizer.json")]
    assert prep(*common).returncode == 0
    refused = prep(*common, "--eval-split", "0")
    assert refused.returncode == 2 and "--eval-split 'auto', this run has '0'" in refused.stderr
