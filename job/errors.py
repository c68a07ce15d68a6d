"""The job's failure kinds, each carrying the exit code that CONTRACT.md promises for it.

Lowest floor: every module may raise these; only `cli` turns them into exit codes.
"""
from __future__ import annotations


class JobError(Exception):
    exit_code = 1


class ConfigError(JobError):
    """One or more invalid settings; the message lists every problem at once."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} invalid setting(s):\n{lines}")


class HubAccessError(JobError):
    exit_code = 3


class DataError(JobError):
    exit_code = 4


class DivergedError(JobError):
    exit_code = 5


class PushError(JobError):
    exit_code = 6


class RankZeroFailed(JobError):
    """On the other ranks, when work only rank 0 does failed: they leave with its exit code (rank 0 reports it)."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(f"rank 0 failed: {message}")
        self.exit_code = exit_code


class PeerFailed(JobError):
    """On every other machine, when one machine's own work (its downloads) failed: they leave with its exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(JobError):
    """Stopped by a signal after a resumable checkpoint was written."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
