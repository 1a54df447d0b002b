"""``synthq index build``: the argparse hook the main CLI mounts (``add_index_commands(subparsers)``)."""

from __future__ import annotations

import argparse


def cmd_index_build(args: argparse.Namespace) -> int:
    from synthq_hf.search.bm25 import build_index

    meta = build_index(
        args.dataset if len(args.dataset) > 1 else args.dataset[0],
        text_column=args.text_column,
        out=args.out,
        id_column=args.id_column,
        url_column=args.url_column,
        split=args.split,
        config=args.config,
        limit=args.limit,
        streaming=not args.no_streaming,
        overwrite=args.overwrite,
    )
    print(
        f"indexed {meta['documents']:,} documents ({meta['skipped_empty']:,} with empty text skipped) "
        f"from {meta['source']} into {args.out} in {meta['build_seconds']} s"
    )
    print(f'use it: ds.map(stages.search_documents, fn_kwargs={{"index": "{args.out}"}})')
    return 0


def add_index_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``index build`` on the main parser's subparsers; each leaf sets ``func`` like the other commands."""
    index = subparsers.add_parser("index", help="build a local BM25 search index for search_documents")
    commands = index.add_subparsers(dest="index_command", required=True)
    build = commands.add_parser(
        "build",
        help="index a dataset's text column into a folder",
        description="Index the text column of a Hub dataset or local json/jsonl/parquet/csv files (streamed) into "
        "a tantivy BM25 index folder that stores each document's text, id and url.",
    )
    build.add_argument("--dataset", required=True, nargs="+", help="Hub dataset name, or local file(s)/glob(s)")
    build.add_argument("--text-column", default="text", help="column holding the document text (default: text)")
    build.add_argument("--id-column", help="column holding a document id (default: the row number)")
    build.add_argument("--url-column", help="column holding the document's URL, if any")
    build.add_argument("--split", default="train", help="split to index (default: train)")
    build.add_argument("--config", help="the Hub dataset's config/subset name (e.g. sample-10BT)")
    build.add_argument("--limit", type=int, help="index only the first N rows")
    build.add_argument("--out", required=True, help="index folder to create")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    build.add_argument("--no-streaming", action="store_true", help="download/prepare the dataset before indexing")
    build.set_defaults(func=cmd_index_build)
    return index
