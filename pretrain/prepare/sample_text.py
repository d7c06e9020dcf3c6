"""A small real-English corpus built at run time from the docstrings and comments of Python's standard library.

Nothing is downloaded or shipped: every machine with Python has the text. Run as
`python -m pretrain.sample_text --out text --max-bytes 4000000`.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

FILE_BYTES = 1 << 20
# Tests and tooling hold generated data, long tables and little prose.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__", "encodings"}
MIN_DOCUMENT_CHARS = 200


def stdlib_sources() -> list[Path]:
    """Every .py file of the standard library outside tests and installed packages, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_text(path: Path) -> str:
    """The module's docstrings (module, classes, functions) and comments in source order, as plain prose."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""  # a few stdlib files are templates or in another encoding: not worth special-casing
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                pieces.append((getattr(node, "lineno", 0), docstring.strip()))
    comments: list[tuple[int, str]] = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                text = token.string.lstrip("#").strip()
                if len(text) > 2 and not text.startswith(("!", "-*-", "type:", "noqa", "pragma")):
                    comments.append((token.start[0], text))
    except (tokenize.TokenError, SyntaxError):
        pass
    # Consecutive comment lines form one paragraph.
    merged: list[tuple[int, str]] = []
    for line, text in comments:
        if merged and line == merged[-1][0] + 1:
            merged[-1] = (line, f"{merged[-1][1]} {text}")
        else:
            merged.append((line, text))
    pieces.extend(merged)
    pieces.sort(key=lambda item: item[0])
    return "\n\n".join(text for _, text in pieces)


def documents() -> Iterator[tuple[str, str]]:
    """(module name, text) for every stdlib module with enough prose, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_sources():
        text = module_text(path)
        if len(text) >= MIN_DOCUMENT_CHARS:
            yield path.relative_to(root).with_suffix("").as_posix().replace("/", "."), text


def _json_line(source: str, text: str) -> bytes:
    return (json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode("utf-8")


def write_sample_text(out_dir: Path, max_bytes: int) -> list[Path]:
    """Writes at most max_bytes of documents as JSON lines ({"text", "source"}), about 1 MiB per file.

    The same Python version gives the same files byte for byte.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes is {max_bytes}; expected a positive number of bytes")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    written = 0
    buffer: list[bytes] = []
    buffered = 0

    def flush() -> None:
        nonlocal buffer, buffered
        if buffer:
            path = out_dir / f"stdlib_{len(paths):03d}.jsonl"
            path.write_bytes(b"".join(buffer))
            paths.append(path)
            buffer, buffered = [], 0

    for source, text in documents():
        line = _json_line(source, text)
        if written + len(line) > max_bytes:
            # The last document is cut at a paragraph so the corpus fills its budget.
            paragraphs = text.split("\n\n")
            while paragraphs and written + len(line) > max_bytes:
                paragraphs.pop()
                line = _json_line(source, "\n\n".join(paragraphs))
            if paragraphs and len(line) >= MIN_DOCUMENT_CHARS:
                buffer.append(line)
                written += len(line)
            break
        buffer.append(line)
        buffered += len(line)
        written += len(line)
        if buffered >= FILE_BYTES:
            flush()
    flush()
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .jsonl files")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="size cap of the corpus")
    args = parser.parse_args(argv)
    try:
        paths = write_sample_text(args.out, args.max_bytes)
    except ValueError as error:
        print(f"--max-bytes: {error}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {total:,} bytes of stdlib docstrings and comments to {args.out}")
    return 0
