"""Named verification steps and the error raised when one fails."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one named verification step."""

    name: str
    ok: bool
    detail: str


class VerificationError(Exception):
    """A quote failed verification; `check` names the failing step.

    `checks` lists every step run so far, the failing one last.
    """

    def __init__(self, check: str, detail: str, checks: tuple[CheckResult, ...] = ()) -> None:
        super().__init__(f"attestation check '{check}' failed: {detail}")
        self.check = check
        self.detail = detail
        self.checks = checks


class CheckFailed(Exception):
    """Internal: raised inside a step with the reason it failed."""


class Checklist:
    """Records the outcome of each step; the first failure raises `VerificationError`."""

    def __init__(self) -> None:
        self._results: list[CheckResult] = []

    @property
    def results(self) -> tuple[CheckResult, ...]:
        return tuple(self._results)

    def passed(self, name: str, detail: str) -> None:
        self._results.append(CheckResult(name, True, detail))

    def failed(self, name: str, detail: str) -> VerificationError:
        """Record a failure and return the error to raise."""
        self._results.append(CheckResult(name, False, detail))
        return VerificationError(name, detail, self.results)
