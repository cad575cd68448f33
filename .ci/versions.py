"""Print the Python, the CPU's vector extensions and the resolved versions of the packages the
suite depends on, so that a failing CI run names what it ran against."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ["torch", "torchvision", "timm", "numpy", "pillow", "attrs", "cattrs", "pluggy", "tomli",
            "safetensors", "matplotlib", "tqdm", "pytest", "hypothesis", "pytest-timeout",
            "tensorboard", "ruff", "mypy"]


def cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({vector})"


def main() -> None:
    print(f"python {platform.python_version()} on {cpu()}")
    for name in PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {name} {version}")


if __name__ == "__main__":
    main()
