"""Hub-layout output folder: parquet shards per (config, split) and a README whose YAML ``configs:`` makes
``load_dataset(folder, config)`` — and, once pushed, ``load_dataset(repo, config)`` — just work.

Layout::

    out/
      README.md                       YAML configs + a short card
      run.json                        what ran: config, versions, counts, usage
      <config>/<split>-00000-of-00001.parquet
"""

from __future__ import annotations

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


def write_split(ds: Dataset, out: Path, config: str, split: str) -> list[str]:
    """Write ``ds`` as parquet shards ``<config>/<split>-XXXXX-of-NNNNN.parquet``; returns relative paths."""
    folder = out / config
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-len(ds) // SHARD_ROWS))
    paths = []
    for index in range(num_shards):
        rel = f"{config}/{split}-{index:05d}-of-{num_shards:05d}.parquet"
        ds.shard(num_shards, index, contiguous=True).to_parquet(str(out / rel))
        paths.append(rel)
    return paths


def configs_yaml(configs: Mapping[str, list[str]]) -> str:
    """YAML front matter ``configs:`` for {config: [split, ...]} (first config is the default)."""
    lines = ["configs:"]
    for number, (config, splits) in enumerate(configs.items()):
        lines.append(f"- config_name: {config}")
        if number == 0:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split in splits:
            lines.append(f"  - split: {split}")
            lines.append(f"    path: {config}/{split}-*.parquet")
    return "\n".join(lines)


def write_readme(out: Path, configs: Mapping[str, list[str]], body: str) -> None:
    (out / "README.md").write_text(f"---\n{configs_yaml(configs)}\n---\n\n{body.strip()}\n", encoding="utf-8")


def write_run_report(out: Path, report: Mapping[str, Any]) -> None:
    (out / "run.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
