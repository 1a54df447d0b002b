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
BUNDLED = {"seeds": "seeds.jsonl", "corpus": "corpus.jsonl", "sample_instructions": "sample_instructions.jsonl"}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def check_jsonl(path: str | os.PathLike) -> None:
    """Fail on the first broken line with its number, before ``datasets`` turns it into a traceback wall."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno})") from None


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
) -> datasets.Dataset | datasets.IterableDataset:
    """A ``Dataset`` (or ``IterableDataset`` when ``streaming``) for a Hub name, a local folder, or local
    file(s) / globs of one format (a list of them is read as one dataset)."""
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
        for file in files:
            if file.endswith(".jsonl"):
                check_jsonl(file)
        return datasets.load_dataset(LOCAL_BUILDERS[suffixes.pop()], data_files=files, split=split, streaming=streaming)
    if len(sources) != 1:
        raise ValueError(f"give one Hub dataset name or local files; got {sources}")
    return datasets.load_dataset(sources[0], config, split=split, streaming=streaming)
