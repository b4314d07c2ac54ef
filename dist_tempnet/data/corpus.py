"""Reading corpora in the formats people have: rows of records from text, JSON lines, Parquet and
Hugging Face `datasets` directories (`save_to_disk`).

Inputs are files, directories and glob patterns (``data/*.parquet``, ``corpus/**/*.jsonl``),
expanded in sorted order so a corpus always enumerates the same way. Formats, by input:

- ``.jsonl`` (also ``.json`` with one object per line): one record per non-empty line;
- ``.parquet``: one record per row (read in column batches with pyarrow);
- a directory written by ``datasets.Dataset.save_to_disk`` (``state.json``) or
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``, splits in sorted order): one record per row;
- any other file (``.txt``, ``.md``, ...): the whole file is one record ``{"text": ...}``;
- any other directory: every file of a known format below it.

A row is addressed by (source, row): 1-based line for JSON lines (as editors number them), 0-based
row index for Parquet and datasets, None for a whole text file.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".text")
_BATCH_ROWS = 1024


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def source_format(path: Path) -> str:
    """'datasets', 'jsonl', 'parquet' or 'text'."""
    if is_datasets_dir(path):
        return "datasets"
    if path.suffix in JSONL_SUFFIXES:
        return "jsonl"
    if path.suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def expand_sources(inputs: Sequence[str | Path]) -> list[Path]:
    """Files and `datasets` directories named by ``inputs`` (paths, directories, globs), in order."""
    sources: list[Path] = []
    for item in map(str, inputs):
        if glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"corpus pattern '{item}' matches nothing")
        else:
            matches = [Path(item)]
        for path in matches:
            if not path.exists():
                raise FileNotFoundError(f"corpus input '{path}' does not exist")
            if path.is_file() or is_datasets_dir(path):
                sources.append(path)
                continue
            inside = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
            )
            inside += sorted(p for p in path.rglob("*") if is_datasets_dir(p))
            if not inside:
                raise FileNotFoundError(f"corpus directory '{path}' holds no .txt/.jsonl/.parquet/datasets")
            sources += inside
    return sources


def _load_dataset(path: Path) -> Any:
    try:
        from datasets import DatasetDict, concatenate_datasets, load_from_disk
    except ImportError as exc:
        raise ImportError(
            f"'{path}' is a Hugging Face datasets directory: install the `datasets` package "
            "(pip install 'dist_tempnet[data]')"
        ) from exc
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = concatenate_datasets([ds[split] for split in sorted(ds)])
    return ds


def _check_columns(path: Path, available: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(available)})")


def count_rows(path: Path) -> list[int | None]:
    """The row addresses of one source (see the module docstring)."""
    fmt = source_format(path)
    if fmt == "text":
        return [None]
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            return [n for n, line in enumerate(handle, 1) if line.strip()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(range(pq.ParquetFile(path).metadata.num_rows))
    return list(range(len(_load_dataset(path))))


def iter_records(
    path: Path, columns: Sequence[str], rows: set[int | None] | None = None
) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """(row, record) of one source in row order, only ``rows`` when given; records hold ``columns``
    (a missing column is an error naming the file). Whole text files are ``{"text": content}``."""
    fmt = source_format(path)
    if fmt == "text":
        if rows is None or None in rows:
            yield None, {"text": path.read_text(encoding="utf-8")}
        return
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            for n, line in enumerate(handle, 1):
                if not line.strip() or (rows is not None and n not in rows):
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from exc
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
                _check_columns(Path(f"{path}:{n}"), list(record), columns)
                yield n, record
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        _check_columns(path, file.schema_arrow.names, columns)
        batches = (b.to_pylist() for b in file.iter_batches(batch_size=_BATCH_ROWS, columns=list(columns)))
    else:
        ds = _load_dataset(path)
        _check_columns(path, ds.column_names, columns)
        ds = ds.select_columns(list(columns))
        batches = (
            [dict(zip(batch, values)) for values in zip(*batch.values())]
            for batch in ds.iter(batch_size=_BATCH_ROWS)
        )
    row = 0
    for batch in batches:
        for record in batch:
            if rows is None or row in rows:
                yield row, record
            row += 1


def text_of(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value
