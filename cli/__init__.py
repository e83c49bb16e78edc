"""The ``crosstalk`` command: start a batch, follow it live, show its results, list scenarios.

    crosstalk batch start -n 200 -c 50 --scenario hi-account-help --follow
    crosstalk batch watch <batch_id>
    crosstalk batch show <batch_id>
    crosstalk scenarios

Where a change goes: ``progress`` is the pure tally of a batch's events and the text made
from it (no NATS, no terminal); ``views`` draws it with rich; ``remote`` is the NATS side
(``batch.start`` request, replay-then-follow of the batch's events); ``app`` holds the
typer commands that wire them together.

Exit codes: 0 done, 1 the batch failed, 2 bad input (invalid id or option, rejected
command, bad configuration), 3 unavailable (NATS unreachable, no verdict, no such batch,
timed out), 130 interrupted.
"""

EXIT_OK = 0
EXIT_BATCH_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class CliExit(Exception):
    """Stop with ``code`` after printing ``message`` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
