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

from datasets import Dataset

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


def write_split(ds: Dataset, out: Path, config: str, split: str) -> str:
    """Write ``ds`` as ``<config>/<split>-<digest>-XXXXX-of-NNNNN.parquet``; returns the glob for ``configs:``."""
    folder = out / config
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-len(ds) // SHARD_ROWS))
    digest = hashlib.blake2b(digest_size=4)
    written = []
    for index in range(num_shards):
        tmp = folder / f".{split}-{index:05d}.parquet.tmp"
        ds.shard(num_shards, index, contiguous=True).to_parquet(str(tmp))
        digest.update(tmp.read_bytes())
        written.append(tmp)
    tag = digest.hexdigest()
    for index, tmp in enumerate(written):
        tmp.rename(folder / f"{split}-{tag}-{index:05d}-of-{num_shards:05d}.parquet")
    return f"{config}/{split}-{tag}-*.parquet"


def configs_yaml(configs: Mapping[str, Mapping[str, str]]) -> str:
    """YAML front matter ``configs:`` for {config: {split: path glob}} (the first config is the default)."""
    lines = ["configs:"]
    for number, (config, splits) in enumerate(configs.items()):
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
