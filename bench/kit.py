"""Helpers of bench/gpu_kit.sh (stdlib only where they run on the GPU machine: `install`, `table`).

`python -m bench.kit wheels`            the exact name==version list the GPU machine needs beyond its own torch
`python -m bench.kit check DIR`         DIR's wheels are exactly that list (exit 1 naming what differs)
`python -m bench.kit baseline DIR`      DIR gets links to this environment's torch and its own dependencies
                                        only (what the GPU machine brings): a stand-in for it on the CPU
`python -m bench.kit install WHEELDIR TARGET`   pip install --no-index --no-deps --target, or, without pip,
                                        the wheels unpacked by hand (a wheel is a zip of its files)
`python -m bench.kit table KITDIR`      one table (kit.txt) and JSON (kit.json) from the runs' records

What travels: the job's pinned dependencies and everything they need at run time, resolved from the installed
metadata of the development venv (built from pyproject.toml, so the versions are the pins), except:
- torch and what only torch needs (sympy, networkx, triton, nvidia-*): the GPU machine's own CUDA build;
- numpy: there already (accelerate and transformers need it; the job accepts any numpy>=1.26,<3);
- bitsandbytes (43 MB: over the 64 MiB a command may carry with the rest): only the nf4-bnb base and the bnb-*
  optimizers import it, and the kit runs neither;
- wandb and tensorboard with what only they need: imported only when REPORT_TO asks for them;
- pyarrow (55 MB): only a parquet dataset imports it, and the kit trains on the demo's image files.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = {"torch": "the GPU machine's own CUDA build", "numpy": "on the GPU machine (accelerate needs it)",
            "bitsandbytes": "43 MB; only nf4-bnb and the bnb-* optimizers use it",
            "wandb": "only with REPORT_TO=wandb", "tensorboard": "only with REPORT_TO=tensorboard",
            "pyarrow": "55 MB; only parquet datasets use it (imported for them alone)"}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: list[str], stop: set[str]) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and what they require at run time (markers evaluated for
    the GPU machine: Linux, CPython 3.12), not descending into `stop`."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req = Requirement(todo.pop())
        name = canon(req.name)
        if name in found or name in stop or (req.marker and not req.marker.evaluate(TARGET)):
            continue
        dist = md.distribution(req.name)
        found[name] = dist.version
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return found


def pinned() -> dict[str, str]:
    """pyproject.toml's dependencies: {canonical name: the pinned version, or '' for a range}."""
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        r = Requirement(d)
        pins = [s.version for s in r.specifier if s.operator == "=="]
        out[canon(r.name)] = pins[0] if pins else ""
    return out


def wheels() -> dict[str, str]:
    import importlib.metadata as md

    pins = pinned()
    stale = [f"{n} {md.version(n)} installed, {v} pinned" for n, v in pins.items() if v and md.version(n) != v]
    if stale:  # the closure comes from the installed metadata: it must be the pinned set
        raise SystemExit(f"the venv is not pyproject.toml's (make venv): {'; '.join(stale)}")
    roots = [n for n in pins if n not in LEFT_OUT]
    # what only the left-out packages need stays out; what a shipped package also needs travels
    return _closure(roots, stop=set(LEFT_OUT))


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canon(name), version


def check(folder: Path) -> list[str]:
    want = wheels()
    have: dict[str, list[str]] = {}
    for w in sorted(folder.glob("*.whl")):
        name, version = wheel_name_version(w)
        have.setdefault(name, []).append(version)
    problems = [f"{n}: {v} wanted, {', '.join(have.get(n, [])) or 'no wheel'}"
                for n, v in want.items() if have.get(n) != [v]]
    problems += [f"{n}: not wanted ({', '.join(v)})" for n, v in have.items() if n not in want]
    return problems


def baseline(dest: Path) -> None:
    """Links to torch and its own requirements (and numpy), as the GPU machine has them, and nothing else."""
    import importlib.metadata as md

    dest.mkdir(parents=True, exist_ok=True)
    keep = _closure(["torch"], stop=set()) | {"numpy": md.version("numpy")}
    for name in keep:
        dist = md.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            if (site / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(site / top)


def install(wheel_dir: Path, target: Path) -> str:
    """Returns how: pip, or unpacked (a machine without pip)."""
    files = sorted(str(w) for w in wheel_dir.glob("*.whl"))
    if not files:
        raise SystemExit(f"no wheels in {wheel_dir}: run `bash bench/gpu_kit.sh prepare` first")
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                        "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target), *files], check=True)
        return "pip"
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        with zipfile.ZipFile(f) as z:
            for member in z.namelist():
                parts = member.split("/")
                if parts[0].endswith(".data"):  # purelib/platlib go to the target; scripts, headers are not needed
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    out = target.joinpath(*parts[2:])
                else:
                    out = target / member
                if member.endswith("/"):
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(member))
    return "unpacked"


# -------------------------------------------------------------------------------------------------- the table

def adapter_summary(path: Path) -> str:
    """'N tensors, finite, max |x| V' for the written adapter, read with safetensors (in the kit's site)."""
    if not path.is_file():
        return "missing"
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        finite = all(bool(t.float().isfinite().all()) for t in tensors.values())
        # the largest factor entry (lycoris also stores each module's alpha, a constant, left out here)
        top = max((float(t.float().abs().max()) for k, t in tensors.items() if not k.endswith("alpha")), default=0.0)
        return f"{len(tensors)} tensors, {'finite' if finite else 'NOT FINITE'}, max|x| {top:.3g}"
    except Exception as e:  # the table must still come out
        return f"unreadable: {type(e).__name__}: {e}"[:120]


def run_rows(kit: Path) -> list[dict]:
    rows = []
    for r in sorted((json.loads(p.read_text()) for p in kit.glob("runs/*/record.json")), key=lambda r: r["order"]):
        out = Path(r["output_dir"])
        status = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else {}
        rows.append({"run": r["name"], "rc": r["rc"], "wall_s": r["wall_s"], "phase": status.get("phase", "-"),
                     "steps": status.get("step", "-"),
                     "it_per_s": status.get("it_per_s", "-"),
                     "loss": round(status["loss"], 4) if isinstance(status.get("loss"), float) else "-",
                     "adapter": adapter_summary(out / "pytorch_lora_weights.safetensors"),
                     "settings": r["settings"]})
    return rows


def fmt(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(f"{k:<{width[k]}}" for k in keys)]
    lines += ["  ".join(f"{str(r.get(k, '')):<{width[k]}}" for k in keys) for r in rows]
    return "\n".join(lines)


def table(kit: Path, dest: Path) -> None:
    env = (kit / "env.txt").read_text() if (kit / "env.txt").is_file() else ""
    runs = run_rows(kit)
    bench_file = dest / "gpu_results.json"
    bench = json.loads(bench_file.read_text()) if bench_file.is_file() else None
    text = ["# GPU kit (bench/gpu_kit.sh)", env.strip(), "", "## The job on the built-in tiny model (entrypoint.py demo)",
            fmt(runs), "", "## bench/gpu.py: real-size AuraFlow transformer, random weights"]
    text += [bench["header"], fmt(bench["rows"])] if bench else ["(no results: see the log)"]
    (dest / "kit.txt").write_text("\n".join(text) + "\n")
    (dest / "kit.json").write_text(json.dumps({"env": env, "runs": runs, "bench": bench}, indent=2) + "\n")
    print("\n".join(text))


def main(argv: list[str]) -> int:
    cmd, *args = argv or ["wheels"]
    if cmd == "wheels":
        print("\n".join(f"{n}=={v}" for n, v in sorted(wheels().items())))
    elif cmd == "check":
        problems = check(Path(args[0]))
        for p in problems:
            print(f"{args[0]}: {p}", file=sys.stderr)
        return 1 if problems else 0
    elif cmd == "baseline":
        baseline(Path(args[0]))
    elif cmd == "install":
        print(install(Path(args[0]), Path(args[1])))
    elif cmd == "table":
        table(Path(args[0]), Path(args[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
