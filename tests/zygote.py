"""A process that imports torch once and forks a fresh `python entrypoint.py ARGS` for each CLI run of a test.

About 4 of the 6-7 seconds a CLI run takes before its first step here go to importing torch, torch._dynamo (which
diffusers imports) and bitsandbytes (which diffusers' quantizers import), and a test session makes over a hundred
runs. None of these reads a job setting or a Hub variable at import, so a child forked after them is the process
`python entrypoint.py` would be once it got that far: the child takes the run's environment, working folder,
argv and output files, then runs entrypoint.py as `__main__`. Nothing that reads the environment at import
(huggingface_hub, transformers, diffusers, the job itself) is imported before the fork.

Protocol, one JSON object per line: the client sends {"argv", "env", "cwd", "stdout", "stderr"} (the last two:
file paths); the zygote answers {"pid": ...} once the child exists and {"returncode": ...} when it has exited
(negative: killed by that signal, as subprocess reports it). One run at a time.
"""
from __future__ import annotations

import json
import logging
import os
import runpy
import sys

PRELOAD = ("torch", "torch._dynamo", "bitsandbytes")


def serve() -> dict:
    """Answer requests until stdin closes (exit); in a forked child, return that child's request."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as job.log does: its CPU notice at import
    for name in PRELOAD:
        __import__(name)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    sys.exit(0)


def become(request: dict) -> None:
    """Turn this forked child into `python entrypoint.py ARGS` started with the request's environment."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, mode, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    # new text streams on the new descriptors, buffered as a new interpreter's would be with this environment
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False, buffering=1 if unbuffered else -1)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                                       buffering=1)
    if os.environ.get("OMP_NUM_THREADS"):  # torch read it when it was imported, in the zygote
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # a script's folder, as `python script.py` puts it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    become(serve())
