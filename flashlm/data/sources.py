"""Reading a corpus: find its data files, validate them, and open them through ``datasets``.

Local text and jsonl files are read by flashlm's own generators, so that a bad file is
named precisely: text that is not UTF-8 (file and line), a jsonl line that is not JSON or
lacks the text field (file and line). Parquet and arrow files and hub datasets go through
``datasets.load_dataset``; a missing text column names the file or dataset.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".parquet": "parquet", ".arrow": "arrow"}


class DataError(ValueError):
    """Data or data settings that cannot be used; the message names the file or field."""


def resolve_files(path: str, fmt: str = "auto") -> tuple[str, list[Path]]:
    """The data files that ``path`` (file, folder or glob) names, and their format.

    A folder contributes the files (recursively) whose extension is known, or, with an
    explicit ``fmt``, those of that format. Raises ``DataError`` for a missing path, no
    matching files, mixed formats under ``fmt="auto"`` or an empty file."""
    if any(c in path for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"path={path!r}: no files match this pattern")
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and
                       EXTENSIONS.get(p.suffix.lower()) in ((fmt,) if fmt != "auto" else EXTENSIONS.values()))
        if not files:
            wanted = sorted(e for e, f in EXTENSIONS.items() if fmt in ("auto", f))
            raise DataError(f"path={path!r}: the folder holds no data files ({', '.join(wanted)})")
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise DataError(f"path={path!r}: no such file or folder (for a hub dataset set format: hub)")
    if fmt == "auto":
        found = {EXTENSIONS.get(p.suffix.lower()) for p in files}
        if None in found:
            odd = next(p for p in files if p.suffix.lower() not in EXTENSIONS)
            raise DataError(f"{odd}: unknown data file extension; set format to one of text, jsonl, parquet, arrow")
        if len(found) > 1:
            raise DataError(f"path={path!r}: mixes formats {sorted(found)}; point it at one kind or set format")
        fmt = found.pop()
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p}: empty data file")
    return fmt, files


def _decode(raw: bytes, file: Path, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line if line is not None else raw[: e.start].count(b"\n") + 1
        raise DataError(f"{file}: not UTF-8 text (line {line}, byte {e.start}: {e.reason})") from None


def _read_text_docs(files: list[Path], text_field: str, sample_by: str) -> Iterator[dict]:
    """Documents of text files, validated: ``{text_field: str}`` rows."""
    for file in files:
        text = _decode(file.read_bytes(), file)
        if sample_by == "document":
            pieces = [text]
        elif sample_by == "paragraph":
            pieces = re.split(r"\n[ \t]*\n", text)
        else:
            pieces = text.splitlines()
        for piece in pieces:
            if piece.strip():
                yield {text_field: piece}


def _read_jsonl_docs(files: list[Path], text_field: str, sample_by: str = "document") -> Iterator[dict]:
    """Documents of jsonl files, validated line by line: ``{text_field: str}`` rows."""
    for file in files:
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, file, lineno).strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise DataError(f"{file}:{lineno}: no {text_field!r} field in this line "
                                    "(set text_field to the field holding the text)")
                text = row[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{file}:{lineno}: field {text_field!r} is a "
                                    f"{type(text).__name__}, not a string")
                if text.strip():
                    yield {text_field: text}


def iter_texts(path: str, *, format: str = "auto", text_field: str = "text",
               sample_by: str = "document") -> Iterator[str]:
    """Yield the document strings of a local corpus, validated as in training."""
    if format == "hub":
        raise DataError("format='hub': iter_texts reads local files only")
    fmt, files = resolve_files(path, format)
    if fmt in ("text", "jsonl"):  # flashlm's own readers: no datasets install needed
        rows = local_rows(fmt, files, text_field, sample_by)
    else:
        rows = open_dataset(fmt, files, text_field, sample_by, streaming=True, cache_dir=None)
    for row in rows:
        yield row[text_field]


def local_rows(fmt: str, files: list[Path], text_field: str, sample_by: str) -> Iterator[dict]:
    """The ``{text_field: str}`` rows of local text or jsonl files, validated, read without
    ``datasets``: the same rows ``open_dataset`` gives for them."""
    reader = _read_text_docs if fmt == "text" else _read_jsonl_docs
    return _path_generator(reader)([str(f) for f in files], text_field, sample_by)


def open_dataset(fmt, files, text_field, sample_by, *, streaming, cache_dir, hub=None):
    """A ``datasets`` Dataset (or IterableDataset when streaming) with a ``text_field`` column."""
    import datasets

    if fmt in ("text", "jsonl"):
        reader = _read_text_docs if fmt == "text" else _read_jsonl_docs
        kwargs = {"files": [str(f) for f in files], "text_field": text_field, "sample_by": sample_by}
        gen = _path_generator(reader)
        features = datasets.Features({text_field: datasets.Value("string")})
        if streaming:
            return datasets.IterableDataset.from_generator(gen, features=features, gen_kwargs=kwargs)
        try:
            return datasets.Dataset.from_generator(gen, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, DataError):  # ours, raised inside the generator
                raise e.__cause__ from None
            raise
    if fmt == "hub":
        name, config, split = hub
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=cache_dir)
        where = f"hub dataset {name!r}"
    else:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train",
                                   streaming=streaming, cache_dir=cache_dir)
        where = f"{files[0]}" if len(files) == 1 else f"{len(files)} {fmt} files under {files[0].parent}"
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"{where}: no {text_field!r} column (columns: {columns}); set text_field")
    return ds


def _path_generator(reader):
    # datasets shards a generator by its list-valued kwargs; paths travel as strings.
    def generate(files, text_field, sample_by):
        n = 0
        for n, row in enumerate(reader([Path(f) for f in files], text_field, sample_by), 1):
            yield row
        if n == 0:
            where = files[0] if len(files) == 1 else f"{len(files)} files from {files[0]} on"
            raise DataError(f"{where}: holds no non-empty documents")

    generate.__name__ = f"generate_{reader.__name__.strip('_')}"
    return generate
