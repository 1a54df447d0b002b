"""Hub-layout output folder: parquet shards per (config, split) and a README whose YAML ``configs:`` makes
``load_dataset(folder, config)`` — and, once pushed, ``load_dataset(repo, config)`` — just work.

Layout::

    out/
      README.md                       YAML configs + a short card
      run.json                        what ran: config, versions, counts, usage
      <config>/<split>-<digest>-00000-of-00001.parquet

Why the digest in shard names: ``datasets`` caches a local folder under its base name and a hash of the
``configs:`` *patterns* only (not paths, sizes or mtimes; measured with datasets 5.2), so a folder re-written
with different rows, or another folder of the same name, would load the stale cached copy. A content digest in
the pattern changes the cache key exactly when the data changes, and keeps identical runs byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features

SHARD_ROWS = 100_000


class OutputError(RuntimeError):
    """The output folder cannot be written as asked (e.g. it holds another run)."""


def prepare_folder(path: str | Path, overwrite: bool = False) -> Path:
    """An empty output folder; refuses to mix two runs in one folder unless ``overwrite``."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} already holds files; choose another --output or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


class ShardWriter:
    """Rows in, parquet shards out as they fill: a streamed split never sits in memory.

    Shards are written under temporary names and renamed on :meth:`close`, when the shard count and the content
    digest are known (see the module docstring). Memory holds one write batch (``batch_rows`` rows).
    """

    def __init__(
        self,
        out: Path,
        config: str,
        split: str,
        features: Features,
        shard_rows: int = SHARD_ROWS,
        batch_rows: int = 1000,
    ):
        self.folder = out / config
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config, self.split = config, split
        self.schema = features.arrow_schema
        self.shard_rows, self.batch_rows = shard_rows, batch_rows
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._shards: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0

    def add(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.batch_rows:
            self._flush()

    def add_dataset(self, ds: Dataset) -> None:
        for batch in ds.with_format("arrow").iter(self.batch_rows):
            self._write(batch.select(self.schema.names).cast(self.schema))

    def _flush(self) -> None:
        if self._buffer:
            rows, self._buffer = self._buffer, []
            self._write(pa.Table.from_pylist(rows, schema=self.schema))

    def _write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                path = self.folder / f".{self.split}-{len(self._shards):05d}.parquet.tmp"
                self._shards.append(path)
                self._writer = pq.ParquetWriter(path, self.schema)
                self._in_shard = 0
            take = min(table.num_rows, self.shard_rows - self._in_shard)
            self._writer.write_table(table.slice(0, take))
            table = table.slice(take)
            self._in_shard += take
            self.rows += take
            if self._in_shard >= self.shard_rows:
                self._writer.close()
                self._writer = None

    def close(self) -> str | None:
        """Finish the last shard, name every shard ``<split>-<digest>-XXXXX-of-NNNNN``; returns their glob.

        An empty split writes nothing and returns ``None``: ``datasets`` cannot read a parquet file without rows
        ("BatchSize must be greater than 0"), so the split is left out of ``configs:`` instead.
        """
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for old in self.folder.glob(f"{self.split}-*.parquet"):
            old.unlink()
        if not self._shards:
            return None
        digest = hashlib.blake2b(digest_size=4)
        for path in self._shards:
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        tag = digest.hexdigest()
        for index, path in enumerate(self._shards):
            path.rename(self.folder / f"{self.split}-{tag}-{index:05d}-of-{len(self._shards):05d}.parquet")
        return f"{self.config}/{self.split}-{tag}-*.parquet"


def write_split(ds: Dataset, out: Path, config: str, split: str, shard_rows: int = SHARD_ROWS) -> str | None:
    """Write ``ds`` as ``<config>/<split>-<digest>-XXXXX-of-NNNNN.parquet``; returns the glob for ``configs:``
    (``None`` for an empty split, which gets no file)."""
    writer = ShardWriter(out, config, split, ds.features, shard_rows=shard_rows)
    writer.add_dataset(ds)
    return writer.close()


def present(configs: Mapping[str, Mapping[str, str | None]]) -> dict[str, dict[str, str]]:
    """The configs and splits that hold rows: empty splits (``None``) and configs left with none are dropped."""
    kept = {config: {s: p for s, p in splits.items() if p} for config, splits in configs.items()}
    return {config: splits for config, splits in kept.items() if splits}


def configs_yaml(configs: Mapping[str, Mapping[str, str | None]]) -> str:
    """YAML front matter ``configs:`` for {config: {split: path glob}} (the first config is the default);
    empty splits and configs are left out (see :func:`present`)."""
    lines = ["configs:"]
    for number, (config, splits) in enumerate(present(configs).items()):
        lines.append(f"- config_name: {config}")
        if number == 0:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split, pattern in splits.items():
            lines.append(f"  - split: {split}")
            lines.append(f"    path: {pattern}")
    return "\n".join(lines)


def write_readme(out: Path, configs: Mapping[str, Mapping[str, str]], body: str) -> None:
    (out / "README.md").write_text(f"---\n{configs_yaml(configs)}\n---\n\n{body.strip()}\n", encoding="utf-8")


def write_run_report(out: Path, report: Mapping[str, Any]) -> None:
    (out / "run.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the output, for run.json and the card."""
    import importlib.metadata
    import platform

    names = ["synthq-hf", "datasets", "aiohttp", "pydantic", "huggingface_hub", "llama_cpp_python", "tantivy"]
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
