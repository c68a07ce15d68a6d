"""Build-time helpers for the Dockerfile (run by the image build, never by the job).

    python image_build.py requirements PYPROJECT OUTDIR    torch.txt and deps.txt from pyproject's pins
    python image_build.py torch-index CUDA_VERSION         the PyTorch wheel index for that CUDA version
    python image_build.py pin-quanto-arch                  let QUANTO_CUDA_ARCH fix quanto's kernel-selection flag
    python image_build.py prebuild-extensions              compile optimum-quanto's extensions into its package
    python image_build.py check-extensions                 load them again, failing if anything would compile

optimum-quanto compiles its C++/CUDA kernels with torch.utils.cpp_extension.load() the first time
they are needed, into a `build` folder inside its package. Every later load runs ninja again over a
freshly written build.ninja, so a build made in the image is reused only if the runtime writes the
very same build.ninja: same TORCH_CUDA_ARCH_LIST, CUDA_HOME, venv path and QUANTO_CUDA_ARCH (the
Dockerfile fixes them with ENV), and nvcc header dependencies off (TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES,
since the runtime image has no CUDA headers). `check-extensions` runs in the compiler-free runtime
stage: if ninja found anything to rebuild there, it would fail for want of nvcc/c++, and so the build.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

TORCH_REQ = re.compile(r"torch\s*(?:[<>=!~;\[]|$)")  # torch itself, not torch-optimi


def requirements(pyproject: str, outdir: str) -> None:
    deps = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]["dependencies"]
    torch = [d for d in deps if TORCH_REQ.match(d)]
    if len(torch) != 1:
        sys.exit(f"expected exactly one torch requirement in {pyproject}, found {torch}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "torch.txt").write_text(torch[0] + "\n", encoding="utf-8")
    (out / "deps.txt").write_text("\n".join(d for d in deps if d not in torch) + "\n", encoding="utf-8")
    print(f"torch: {torch[0]}; {len(deps) - 1} other pinned dependencies")


def torch_index(cuda_version: str) -> None:
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", cuda_version.strip())
    if not m:
        sys.exit(f"CUDA_VERSION={cuda_version!r}: expected MAJOR.MINOR[.PATCH], e.g. 12.8.1")
    print(f"https://download.pytorch.org/whl/cu{m.group(1)}{m.group(2)}")


QUANTO_ARCH_LINE = "quanto_cuda_arch = get_max_cuda_arch()"


def pin_quanto_arch() -> None:
    """quanto passes -DQUANTO_CUDA_ARCH=<the largest visible GPU's sm> to nvcc. An image build sees no GPU
    ("000") and every GPU model gives another value, so the flag would never match the prebuilt build and
    each pod would recompile. The sources only test QUANTO_CUDA_ARCH >= 800, which every GPU in
    TORCH_CUDA_ARCH_LIST (8.0 and up) passes: the image sets QUANTO_CUDA_ARCH=800 and this patch reads it."""
    spec = importlib.util.find_spec("optimum.quanto.library.extensions")
    path = Path(spec.origin).parent / "cuda" / "__init__.py"
    text = path.read_text(encoding="utf-8")
    if text.count(QUANTO_ARCH_LINE) != 1:
        sys.exit(f"{path}: expected one line {QUANTO_ARCH_LINE!r}; optimum-quanto changed, revisit this patch")
    path.write_text(text.replace(QUANTO_ARCH_LINE, 'quanto_cuda_arch = os.environ.get("QUANTO_CUDA_ARCH") '
                                 "or get_max_cuda_arch()"), encoding="utf-8")
    print(f"{path}: QUANTO_CUDA_ARCH is read from the environment")


def _extensions() -> list:
    """quanto's extensions that this torch can build: always the C++ one, the CUDA one on a CUDA torch.

    quanto registers its CUDA extension only when a GPU is visible, which an image build never has,
    so its module is imported directly."""
    import torch
    from optimum.quanto.library.extensions import get_extension

    exts = [get_extension("quanto_cpp")]
    if torch.version.cuda:
        cuda = importlib.import_module("optimum.quanto.library.extensions.cuda")
        exts.append(cuda.ext)
    else:
        print("CPU torch: the quanto_cuda extension is skipped")
    return exts


def prebuild() -> None:
    import torch

    if torch.version.cuda:
        _check_arch_list()
    for ext in _extensions():
        print(f"building {ext.name} in {ext.build_directory} (torch {torch.__version__})", flush=True)
        ext.lib  # noqa: B018 - the property compiles and loads
        print(f"built {ext.name}", flush=True)


def check() -> None:
    for ext in _extensions():
        ext.lib  # noqa: B018
        print(f"{ext.name}: prebuilt, loads without compiling", flush=True)


def _check_arch_list() -> None:
    """Every TORCH_CUDA_ARCH_LIST entry must be one this nvcc compiles (CUDA 13 dropped some old ones)."""
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not wanted:
        sys.exit("TORCH_CUDA_ARCH_LIST is not set: the extension would be built for no GPU at all")
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc"
    listed = subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    have = set(re.findall(r"sm_(\d+)", listed))
    missing = [a for a in re.split(r"[;\s]+", wanted) if a and a.split("+")[0].replace(".", "") not in have]
    if missing:
        sys.exit(f"TORCH_CUDA_ARCH_LIST={wanted!r}: this nvcc cannot compile {missing}; "
                 "drop them with --build-arg TORCH_CUDA_ARCH_LIST=...")
    print(f"TORCH_CUDA_ARCH_LIST={wanted} (nvcc supports all of them)")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or ["help"]
    actions = {"requirements": requirements, "torch-index": torch_index,
               "pin-quanto-arch": pin_quanto_arch, "prebuild-extensions": prebuild, "check-extensions": check}
    if cmd not in actions:
        sys.exit(__doc__)
    actions[cmd](*args)
