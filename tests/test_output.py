"""What drip prints through rich is shown as it is: a relay's reply is text, never markup,
emoji codes or terminal escapes (issue 9)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from click.testing import Result
from sqlalchemy import Engine, update

from drip.models import Delivery

Drip = Callable[..., Result]
REPLIES = {
    1: "554 5.7.1 [/spam] rejected [link=http://evil.example]help[/link]",
    2: "550 5.1.1 <address> user unknown",
    3: "421 [bold red]busy[/] :warning: try later",
    4: "451 \x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\ here\u202e",
}
SHOWN = {4: r"451 \x1b]8;;http://evil.example\x1b\click\x1b]8;;\x1b\ here\u202e"}


def with_replies(drip: Drip, engine: Engine) -> None:
    result = drip(
        "enroll", "ana@example.com", "--campaign", "ketamine-onboarding", "--first-name", "A"
    )
    assert result.exit_code == 0, result.output
    with engine.begin() as c:
        for delivery_id, reply in REPLIES.items():
            c.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(state="failed", last_error=reply, attempts=1)
            )


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
@pytest.mark.parametrize("command", [["deliveries"], ["timeline", "ana@example.com"]])
def test_a_relay_s_reply_is_shown_as_text(
    drip: Drip,
    engine: Engine,
    command: list[str],
    terminal: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_replies(drip, engine)
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a reply
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")
    else:
        monkeypatch.delenv("FORCE_COLOR", raising=False)
    result = drip(*command)
    assert result.exit_code == 0, result.output
    for delivery_id, reply in REPLIES.items():
        assert SHOWN.get(delivery_id, reply) in result.stdout
    assert "\x1b]8" not in result.stdout  # no hyperlink, from rich or from the reply
    assert "⚠" not in result.stdout
    assert ("\x1b[1m" in result.stdout) is terminal  # the header is bold on a terminal only
