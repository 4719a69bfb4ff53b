"""Every error drip raises on purpose.

    DripError
    ├── ConfigError           a DRIP_* setting is missing or malformed
    ├── InputError            a value a user typed or uploaded is not acceptable
    │   └── CsvError          one or more rows of an enrolment CSV are not acceptable
    ├── Suppressed            an address on the suppression list is to be enrolled
    ├── NotFound              a patient, enrolment, campaign or delivery does not exist
    ├── CampaignError         a campaign folder or its campaign.toml is broken
    ├── TemplateError         a template failed to render
    ├── BrokerError           the embedded Redis could not be started
    └── DeliveryError         sending one message failed
        ├── TransientDeliveryError   try again later (4xx, connection refused or dropped)
        ├── PermanentDeliveryError   never retry (5xx)
        └── UnknownOutcomeError      the connection dropped after DATA: it may have been delivered

The command line turns any DripError into its message on stderr and exit code 1, in one place
(`drip.cli`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class DripError(Exception):
    """Base of every error drip raises on purpose; its message is meant for a person."""


class ConfigError(DripError):
    """Raised when a DRIP_* environment variable is malformed."""


class InputError(DripError):
    """Raised when a value given on the command line or in a file is not acceptable."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class RowProblem:
    """One bad field of one CSV row."""

    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.reason}"


class CsvError(InputError):
    """Raised when rows of an enrolment CSV are not acceptable; lists every bad row. With
    `whole_file`, a problem (an unclosed quote) makes every row after it unknowable."""

    def __init__(
        self, problems: list[RowProblem], rows_with_problems: int, *, whole_file: bool = False
    ) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        if whole_file:
            self.headline = "the whole file was refused, nothing was written"
            advice = "Fix the file and run the command again (--skip-invalid cannot help here)."
        else:
            self.headline = f"{rows_with_problems} row(s) refused, nothing was written"
            advice = (
                "Fix these rows and run the command again, "
                "or add --skip-invalid to enrol the valid rows only."
            )
        super().__init__("csv", f"{self.headline}:\n{lines}\n{advice}")


class Suppressed(DripError):
    """Raised when an address on the suppression list (or of a patient who unsubscribed) is to
    be enrolled without --resubscribe."""

    def __init__(self, description: str) -> None:
        super().__init__(
            f"cannot enrol: {description}; to enrol again, get the patient's consent and pass "
            '--resubscribe --reason "…"'
        )


class NotFound(DripError):
    """Raised when a patient, enrolment, campaign or delivery named by a user does not exist."""


class CampaignError(DripError):
    """Raised when a campaign folder or its campaign.toml is missing or malformed."""


class TemplateError(DripError):
    """Raised when a template fails to load or render; the email is never sent."""


class BrokerError(DripError):
    """Raised when the embedded Redis cannot be started or reached."""


class DeliveryError(DripError):
    """Raised when sending one message fails."""


class TransientDeliveryError(DeliveryError):
    """Raised for failures worth retrying: SMTP 4xx replies, refused or dropped connections."""


class PermanentDeliveryError(DeliveryError):
    """Raised for failures never worth retrying: SMTP 5xx replies."""

    def __init__(self, message: str, *, code: int = 0, enhanced: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced

    @property
    def bad_mailbox(self) -> bool:
        """True for 5.1.x: the address itself is bad, so it should be suppressed."""
        return self.enhanced.startswith("5.1.")


class UnknownOutcomeError(DeliveryError):
    """Raised when the connection is lost after DATA was sent: the message may have arrived."""
