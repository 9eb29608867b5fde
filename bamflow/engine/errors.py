"""The exception a workflow raises, carrying what its failed job reported."""

from __future__ import annotations


class WorkflowError(Exception):
    """A workflow could not start, or one of its jobs failed.

    ``job`` names the job that failed first (``None`` if the workflow never
    started), ``child_traceback`` is that job's formatted traceback (empty for
    a job killed by a signal), ``exitcode`` its exit status (negative: killed
    by that signal). ``str()`` of the error is one line; the traceback follows
    on the next lines when there is one.
    """

    def __init__(
        self,
        summary: str,
        *,
        job: str | None = None,
        child_traceback: str = "",
        exitcode: int | None = None,
        exc_dict: dict[str, str] | None = None,
        result_dict: dict[str, object] | None = None,
    ) -> None:
        super().__init__(summary)
        self.summary = summary
        self.job = job
        self.child_traceback = child_traceback
        self.exitcode = exitcode
        self.exc_dict = dict(exc_dict or {})
        self.result_dict = dict(result_dict or {})

    def __str__(self) -> str:
        if self.child_traceback:
            return f"{self.summary}\n--- traceback of {self.job} ---\n{self.child_traceback.rstrip()}"
        return self.summary
