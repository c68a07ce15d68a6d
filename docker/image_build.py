"""Build-time helpers for the Dockerfile (run by the image build, never by the job).

    python image_build.py requirements PYPROJECT OUTDIR [TORCH_VERSION]   torch.txt (pinned) and deps.txt
    python image_build.py torch-index CUDA_VERSION         the wheel index with torch for that CUDA version ("cpu" too)
    python image_build.py check-torch CUDA_VERSION         the installed torch is built for that CUDA version
    python image_build.py cuda-toolkit-req [TORCH_WHEEL]   nvcc + headers for torch's CUDA: `wheels REQ` or `apt PKG...`
    python image_build.py cuda-home CUDA_HOME TREE...      a CUDA_HOME of links over toolkit folders / NVIDIA wheels
    python image_build.py pin-quanto-arch                  let QUANTO_CUDA_ARCH fix quanto's kernel-selection flag
    python image_build.py prebuild-extensions              compile optimum-quanto's extensions into its package
    python image_build.py check-extensions                 load them again, failing if anything was compiled again
    python image_build.py check-triton                     Triton builds and loads its C launcher (stub libcuda)
    python image_build.py check-cuda CUDA ARCHS            the CUDA image's stack: torch, bitsandbytes, kernels, no nvcc

optimum-quanto compiles its C++/CUDA kernels with torch.utils.cpp_extension.load() the first time
they are needed, into a `build` folder inside its package. Every later load runs ninja again over a
freshly written build.ninja, so a build made in the image is reused only if the runtime writes the
very same build.ninja: same TORCH_CUDA_ARCH_LIST, CUDA_HOME, venv path and QUANTO_CUDA_ARCH (the
Dockerfile fixes them with ENV), and nvcc header dependencies off (TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES,
since the runtime image has no CUDA headers). `check-extensions` runs in the runtime stage, which has
gcc (for Triton) but neither nvcc nor the CUDA headers: it loads the kernels and fails if any object
or library in their build folders changed, i.e. if ninja found anything to rebuild.

Triton (which torch's CUDA wheels bring) compiles a small C launcher with gcc and Python.h the first
time it launches a kernel: optimi's optimizers and LyCORIS's LoKr kernels use it on CUDA. The final
stage therefore carries gcc and the Python headers; `check-triton` proves that launcher build works.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tomllib

TORCH_REQ = re.compile(r"torch\s*(?:[<>=!~;\[]|$)")  # torch itself, not torch-optimi


def requirements(pyproject: str, outdir: str, torch_version: str = "") -> None:
    """pyproject allows a torch range (dev machines and GPU boxes bring their own); the image pins the tested
    version within it: `torch==VERSION,<range>` fails the install if the pin leaves the range."""
    deps = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]["dependencies"]
    torch = [d for d in deps if TORCH_REQ.match(d)]
    if len(torch) != 1:
        sys.exit(f"expected exactly one torch requirement in {pyproject}, found {torch}")
    torch_req = torch[0]
    if torch_version:
        if not re.fullmatch(r"\d+\.\d+\.\d+", torch_version):
            sys.exit(f"TORCH_VERSION={torch_version!r}: expected X.Y.Z")
        spec = torch_req[len("torch"):].strip()
        torch_req = f"torch=={torch_version}" + (f",{spec}" if spec else "")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "torch.txt").write_text(torch_req + "\n", encoding="utf-8")
    (out / "deps.txt").write_text("\n".join(d for d in deps if d not in torch) + "\n", encoding="utf-8")
    print(f"torch: {torch_req}; {len(deps) - 1} other pinned dependencies")


# PyPI's default Linux wheel of the pinned torch (2.13.0) is the CUDA 13.0 build; the others come from
# PyTorch's own index.
PYPI_CUDA = "13.0"


def _cuda_major_minor(cuda_version: str) -> str | None:
    """"12.8.1" -> "12.8"; "cpu" -> None."""
    if cuda_version.strip().lower() == "cpu":
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", cuda_version.strip())
    if not m:
        sys.exit(f"CUDA_VERSION={cuda_version!r}: expected MAJOR.MINOR[.PATCH] (e.g. 12.8.1) or cpu")
    return f"{m.group(1)}.{m.group(2)}"


def torch_index(cuda_version: str) -> None:
    mm = _cuda_major_minor(cuda_version)
    if mm is None:
        print("https://download.pytorch.org/whl/cpu")
    elif mm == PYPI_CUDA:
        print("https://pypi.org/simple")
    else:
        print(f"https://download.pytorch.org/whl/cu{mm.replace('.', '')}")


def check_torch(cuda_version: str) -> None:
    """The torch that was installed is the one for CUDA_VERSION (an index or a wheelhouse can hand over another)."""
    import torch

    want = _cuda_major_minor(cuda_version)
    if torch.version.cuda != want:
        sys.exit(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, CUDA_VERSION={cuda_version} "
                 f"wants {want or 'a CPU build'}: check TORCH_INDEX_URL / the wheel index")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def _torch_requires(wheel: str = "") -> list[str]:
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if re.fullmatch(r"torch-[^/]+\.dist-info/METADATA", n))
            text = z.read(meta).decode("utf-8")
        return [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
    return importlib.metadata.requires("torch") or []


def cuda_toolkit_req(wheel: str = "") -> None:
    """Where the build stage gets nvcc, its device compiler and the CUDA headers, at torch's CUDA release.
    torch for CUDA 13 pins `cuda-toolkit[...]==13.0.x`: NVIDIA's wheels of that release carry nvcc, printed
    as `wheels REQUIREMENT`. torch for CUDA 12 pins `nvidia-cuda-runtime-cu12==12.8.x`, and CUDA 12's
    nvcc wheel holds ptxas alone: printed as `apt PACKAGE...`, NVIDIA's Debian packages of that release."""
    reqs = [r.split(";")[0].strip() for r in _torch_requires(wheel)]
    version = None
    for r in reqs:
        m = re.fullmatch(r"(cuda-toolkit(?:\[[^\]]*\])?|nvidia-cuda-runtime-cu\d+)\s*==\s*(\d+)\.(\d+)[\d.*]*", r)
        if m:
            version = (int(m.group(2)), int(m.group(3)), r.split("==")[1].strip(), m.group(1).startswith("cuda-toolkit"))
            break
    if version is None:
        sys.exit(f"torch requires no CUDA runtime wheel I know ({reqs}): is it a CUDA build from a wheel index?")
    major, minor, pin, metapackage = version
    if major >= 13 and metapackage:
        print(f"wheels cuda-toolkit[nvcc,cccl,crt,nvvm,cudart]=={pin}")
    else:
        print(f"apt cuda-nvcc-{major}-{minor} cuda-cudart-dev-{major}-{minor} cuda-cccl-{major}-{minor}")


def cuda_home(home: str, *trees: str) -> None:
    """nvcc, its device compiler, headers and libcudart linked into the layout torch's extension builder
    expects of CUDA_HOME (bin/nvcc, include/, lib64/libcudart.so, nvvm/). Each TREE is a toolkit folder
    (bin/, include/, lib64/) or a site-packages folder whose nvidia/ holds NVIDIA's wheels (one folder per
    component for CUDA 12, one `cu13` for CUDA 13): the toolchain's, then the venv's, whose cuBLAS, cuSPARSE
    and cuSOLVER headers torch's ATen/cuda/CUDAContext.h includes. The first tree to have a file wins."""
    dst = Path(home)
    if dst.is_symlink():
        dst.unlink()
    components = []
    for tree in map(Path, trees):
        components += sorted(p for p in (tree / "nvidia").iterdir() if p.is_dir()) if (tree / "nvidia").is_dir() \
            else [tree]
    linked = 0
    for comp in components:
        for sub, target in (("bin", "bin"), ("include", "include"), ("lib", "lib64"), ("lib64", "lib64"),
                            ("nvvm", "nvvm")):
            top = comp / sub
            for root, _, files in os.walk(top, followlinks=True):  # apt's include/ and lib64/ are links
                rel = Path(root).relative_to(top)
                (dst / target / rel).mkdir(parents=True, exist_ok=True)
                for f in files:
                    link = dst / target / rel / f
                    if not os.path.lexists(link):
                        link.symlink_to(Path(root, f).resolve())
                        linked += 1
    if not (dst / "bin" / "nvcc").exists():
        sys.exit(f"no bin/nvcc in {trees}")
    lib = dst / "lib64"
    if not (lib / "libcudart.so").exists():  # the wheels ship only the versioned name; the linker wants this one
        versioned = sorted(lib.glob("libcudart.so.*"))
        if not versioned:
            sys.exit(f"no libcudart.so.* in {lib}")
        (lib / "libcudart.so").symlink_to(versioned[0].name)
    for header in ("cuda_runtime.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h", "cub/cub.cuh"):
        if not any((dst / "include" / sub / header).exists() for sub in ("", "cccl")):
            sys.exit(f"{dst}/include has no {header} (torch's CUDA headers include it)")
    out = subprocess.run([str(dst / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True).stdout
    print(f"{dst}: {linked} links; {out.strip().splitlines()[-1]}")


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


def _build_outputs(build_dir: str) -> dict[str, tuple[int, int]]:
    """What a rebuild would rewrite: the objects and libraries in an extension's build folder."""
    out = {}
    for p in Path(build_dir).rglob("*"):
        if p.is_file() and p.suffix in (".o", ".so"):
            st = p.stat()
            out[str(p)] = (st.st_mtime_ns, st.st_size)
    return out


def check() -> None:
    """Load the prebuilt kernels and fail if anything was compiled again. The final image has gcc (for Triton),
    so a rebuild of the C++ kernels could succeed there, silently, on every pod: compare the build folder."""
    for ext in _extensions():
        before = _build_outputs(ext.build_directory)
        if not any(k.endswith(".so") for k in before):
            sys.exit(f"{ext.name}: no prebuilt library in {ext.build_directory}")
        ext.lib  # noqa: B018 - loads; ninja rebuilds whatever it finds out of date
        after = _build_outputs(ext.build_directory)
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            sys.exit(f"{ext.name}: loading it compiled again ({changed}): the runtime's build settings differ "
                     "from the build stage's (see this file's docstring)")
        libs = [Path(k).name for k in before if k.endswith(".so")]
        print(f"{ext.name}: prebuilt {libs}, loads without compiling", flush=True)


STUB_LIBCUDA = "libcuda.so.1"


def check_triton() -> None:
    """Triton's C launcher, built the way Triton builds it on a GPU: its own compile_module_from_src over its
    driver.c (gcc, Python.h, its bundled cuda.h, -l:libcuda.so.1), then loaded. Without a GPU driver a stub
    libcuda.so.1 stands in: one that defines every cu* symbol the launcher uses (found by building the
    launcher once against an empty stub, with Triton's own compiler call)."""
    if importlib.util.find_spec("triton") is None:
        import torch

        if torch.version.cuda:
            sys.exit("torch is a CUDA build but triton is not installed")
        print("CPU torch, no triton: nothing to check")
        return
    import sysconfig

    import triton
    from triton.backends.nvidia import driver
    from triton.runtime.build import _build

    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "stub"
        stub.mkdir()
        cc = ["gcc", "-shared", "-fPIC", f"-Wl,-soname,{STUB_LIBCUDA}", "-o", str(stub / STUB_LIBCUDA)]
        empty = stub / "empty.c"
        empty.write_text("void triton_check_stub(void) {}\n", encoding="utf-8")
        subprocess.run([*cc, str(empty)], check=True)
        src = Path(tmp) / "cuda_utils.c"
        src.write_text(Path(driver.dirname, "driver.c").read_text(encoding="utf-8"), encoding="utf-8")
        so = _build("cuda_utils", str(src), tmp, [driver.libdevice_dir, str(stub)], driver.include_dirs,
                    driver.libraries, [])
        nm = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True, check=True).stdout
        symbols = sorted({w for w in nm.split() if re.fullmatch(r"cu[A-Z]\w*", w)})
        if not symbols:
            sys.exit(f"the launcher {so} uses no cu* symbol: Triton's driver.c changed, revisit this check")
        full = stub / "stub.c"
        full.write_text("".join(f"int {s}(void) {{ return 999; }}\n" for s in symbols), encoding="utf-8")
        subprocess.run([*cc, str(full)], check=True)
        # The real path, in a fresh process: driver.CudaUtils() compiles (Triton's cache in a temporary
        # folder) and imports the launcher; TRITON_LIBCUDA_PATH points it at the stub instead of ldconfig.
        env = dict(os.environ, TRITON_LIBCUDA_PATH=str(stub), TRITON_CACHE_DIR=str(Path(tmp) / "cache"),
                   LD_LIBRARY_PATH=str(stub))
        code = ("from triton.backends.nvidia.driver import CudaUtils; u = CudaUtils(); "
                "assert callable(u.launch)")
        subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
        built = list((Path(tmp) / "cache").rglob("cuda_utils*.so"))
        if not built:
            sys.exit("CudaUtils() loaded no freshly built cuda_utils: the check did not exercise the compiler")
    print(f"triton {triton.__version__}: C launcher compiled with gcc against "
          f"{sysconfig.get_paths()['include']}/Python.h and loaded ({len(symbols)} driver symbols stubbed)")


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


def check_cuda(cuda: str, archs: str) -> None:
    """What a CUDA image must hold, checkable without a GPU (scripts/image_smoke.sh cuda runs it in the image):
    torch for that CUDA, bitsandbytes' library for it, quanto's CUDA kernels compiled for every arch (sm_XX
    code in the library, read with the cuobjdump Triton ships), and no nvcc: that stays in the build stage."""
    import shutil

    import torch

    problems = []
    if torch.version.cuda != cuda:
        problems.append(f"torch {torch.__version__} is for CUDA {torch.version.cuda}, not {cuda}")
    bnb = Path(importlib.util.find_spec("bitsandbytes").origin).parent
    bnb_lib = bnb / f"libbitsandbytes_cuda{cuda.replace('.', '')}.so"
    if not bnb_lib.is_file():
        problems.append(f"no {bnb_lib.name} in {bnb}")
    cuda_ext = importlib.import_module("optimum.quanto.library.extensions.cuda").ext
    libs = sorted(Path(cuda_ext.build_directory).glob("*.so"))
    cuobjdump = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not libs:
        problems.append(f"no prebuilt quanto_cuda library in {cuda_ext.build_directory}")
    else:
        listed = subprocess.run([str(cuobjdump), "--list-elf", str(libs[0])], capture_output=True, text=True,
                                check=True).stdout
        have = set(re.findall(r"\.sm_(\d+)a?\.cubin", listed))
        want = {a.split("+")[0].replace(".", "") for a in re.split(r"[;\s]+", archs) if a}
        if not want <= have:
            problems.append(f"{libs[0].name} has code for sm_{sorted(have)}, not for every one of sm_{sorted(want)}")
        print(f"{libs[0].name}: {len(listed.splitlines())} device code objects, for sm_{','.join(sorted(have))}")
    for name in ("nvcc", "cicc", "ptxas"):
        if shutil.which(name):
            problems.append(f"{name} is on PATH ({shutil.which(name)}): the CUDA toolkit belongs to the build stage")
    if Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists():
        problems.append("CUDA_HOME has an nvcc: the CUDA toolkit belongs to the build stage")
    if problems:
        sys.exit("CUDA image check failed:\n  " + "\n  ".join(problems))
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {bnb_lib.name}, quanto_cuda for {archs}, no nvcc")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or ["help"]
    actions = {"requirements": requirements, "torch-index": torch_index, "check-torch": check_torch,
               "cuda-toolkit-req": cuda_toolkit_req, "cuda-home": cuda_home, "pin-quanto-arch": pin_quanto_arch,
               "prebuild-extensions": prebuild, "check-extensions": check, "check-triton": check_triton,
               "check-cuda": check_cuda}
    if cmd not in actions:
        sys.exit(__doc__)
    actions[cmd](*args)
