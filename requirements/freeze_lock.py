"""Write the running environment's distributions as an exact lock (``make lock``).

torch is written without its local version label (``2.13.0``, not ``2.13.0+cpu``): the CPU build and a CUDA build
of the same release both satisfy it, so ``TORCH_SPEC`` can choose the build. The project itself is left out.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

SELF = "conan-hf"


def main(path: str) -> None:
    pins = {}
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in (SELF, "pip"):
            continue
        pins[name] = dist.version.split("+", 1)[0] if name == "torch" else dist.version
    header = (f"# Exact set `make test` and CI install (`make lock` regenerates it; Python "
              f"{sys.version_info.major}.{sys.version_info.minor}).\n")
    Path(path).write_text(header + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())), encoding="utf-8")
    print(f"wrote {len(pins)} pins to {path}")


if __name__ == "__main__":
    main(sys.argv[1])
