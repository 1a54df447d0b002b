"""Opening an input dataset from what a user types: a Hub name, local files, a local folder, or ``bundled:NAME``.

One place for it so every command treats sources alike, and so a broken JSONL line is reported as
``file line N`` before ``datasets`` turns it into a traceback wall.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).parent / "data"
#: ``bundled:NAME`` → a JSONL file shipped in the package (``synthq_hf/data``), so the demo runs offline.
BUNDLED = {
    "seeds": "seeds.jsonl",
    "corpus": "corpus.jsonl",
    "sample_instructions": "sample_instructions.jsonl",
    "personas": "personas.jsonl",
}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def check_jsonl(path: str | os.PathLike, text_column: str | None = None) -> int:
    """Fail on the first bad line with its number, before ``datasets`` turns it into a traceback wall (or, for a
    non-string text, a whole-run failure naming no row); returns the number of rows.

    A bad line: bytes that are not UTF-8, text that is not JSON, JSON that is not an object, or (with
    ``text_column``) a text that is neither a string nor null. A file where no row has ``text_column`` is refused
    too. Blank lines are skipped, as ``datasets`` skips them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    rows, columns = 0, set()
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} line {number} is not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number} is not a JSON object (got {type(row).__name__})")
            text = row.get(text_column)
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"{path} line {number}: column {text_column!r} must hold a string, got {type(text).__name__}"
                )
            rows += 1
            columns.update(row)
    if text_column and rows and text_column not in columns:
        raise ValueError(f"{path} has no column {text_column!r}; its columns are {', '.join(sorted(columns))}")
    return rows


def resolve_source(source: str) -> str:
    """``bundled:NAME`` → the packaged file's path; anything else unchanged."""
    if source.startswith("bundled:"):
        name = source.removeprefix("bundled:")
        if name not in BUNDLED:
            raise ValueError(f"unknown bundled dataset {name!r}; bundled: {', '.join(sorted(BUNDLED))}")
        return str(DATA_DIR / BUNDLED[name])
    return source


def open_dataset(
    source: str | os.PathLike | list[str],
    *,
    config: str | None = None,
    split: str = "train",
    streaming: bool = False,
    text_column: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """A ``Dataset`` (or ``IterableDataset`` when ``streaming``) for a Hub name, a local folder, or local
    file(s) / globs of one format (a list of them is read as one dataset). Local JSONL files are checked line by
    line first (:func:`check_jsonl`, against ``text_column`` when given); all of them empty is refused."""
    sources = (
        [resolve_source(str(s)) for s in source] if isinstance(source, list | tuple) else [resolve_source(str(source))]
    )
    suffixes = {Path(s.removesuffix(".gz")).suffix.lower() for s in sources}
    if len(sources) == 1 and os.path.isdir(sources[0]):
        return datasets.load_dataset(sources[0], config, split=split, streaming=streaming)
    if suffixes & set(LOCAL_BUILDERS):
        if len(suffixes) != 1 or not suffixes <= set(LOCAL_BUILDERS):
            raise ValueError(f"local files must all be one of {sorted(LOCAL_BUILDERS)}; got {sources}")
        files = []
        for pattern in sources:
            found = sorted(glob.glob(pattern))
            if not found:
                raise FileNotFoundError(f"no such file {pattern}")
            files += found
        # rows of a JSONL file, bytes of any other: all zero ends in StopIteration or a traceback in datasets
        sizes = [check_jsonl(file, text_column) if file.endswith(".jsonl") else os.path.getsize(file) for file in files]
        if not any(sizes):
            raise ValueError(f"input file {', '.join(files)} is empty (no rows)")
        return datasets.load_dataset(LOCAL_BUILDERS[suffixes.pop()], data_files=files, split=split, streaming=streaming)
    if len(sources) != 1:
        raise ValueError(f"give one Hub dataset name or local files; got {sources}")
    return datasets.load_dataset(sources[0], config, split=split, streaming=streaming)
