"""Benchmark: rendering and building one email, the two steps of the per-email CPU cost.

    .venv/bin/python bench/render.py [--emails 1000]

- render: Renderer.render (the fast path: templates compiled and inlined once, patient values
  filled in) against Renderer.render_reference (Jinja2 with the real values, then premailer, for
  every email), best of several runs each. Goal: the fast path at least 20 times faster.
- build: drip.messages.build_message of one rendered email, per message. Goal: under 0.5 ms.

These figures were assertions in tests/test_rendering.py and tests/test_messages.py; a test must
not depend on the speed of the machine it runs on, so they are measured here. It reports figures;
it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime

from drip.campaigns import load_campaign
from drip.messages import build_message, make_message_id
from drip.rendering import Renderer
from drip.settings import PROJECT_ROOT, Settings

FROM = '"Lakeside Clinic (demo)" <care@clinic.example>'
URL = "https://drip.clinic.example/u/3.AbC_-9xYz"
PATIENT = {"first_name": "José-María", "last_name": "Núñez Peña", "unsubscribe_url": URL}
RENDER_GOAL = 20.0  # times faster than the reference
BUILD_GOAL_MS = 0.5


def best_of(repeats: int, function: Callable[[], object]) -> float:
    """The fastest of `repeats` runs, in seconds: the least disturbed by other work."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=1000)
    n = parser.parse_args().emails
    renderer = Renderer(Settings())
    campaign = load_campaign(PROJECT_ROOT / "templates" / "emails", "ketamine-onboarding")
    rendered = renderer.render(campaign, "welcome", PATIENT)  # compiles once
    slow_n = max(n // 200, 5)
    fast = best_of(5, lambda: [renderer.render(campaign, "welcome", PATIENT) for _ in range(n)])
    slow = best_of(
        3,
        lambda: [renderer.render_reference(campaign, "welcome", PATIENT) for _ in range(slow_n)],
    )
    now = datetime.now(UTC)

    def build_all() -> None:
        for i in range(n):
            build_message(
                rendered,
                to="zoe@example.com",
                from_address=FROM,
                message_id=make_message_id(FROM),
                date=now,
                unsubscribe_url=URL,
                delivery_id=i,
            )

    build = best_of(5, build_all)
    ratio = (slow / slow_n) / (fast / n)
    build_ms = build / n * 1000
    print(f"render, fast path   {fast / n * 1e6:9.1f} µs/email")
    print(f"render, reference   {slow / slow_n * 1e6:9.1f} µs/email")
    print(f"  ratio             {ratio:9.1f}×   goal ≥ {RENDER_GOAL:.0f}×: {ratio >= RENDER_GOAL}")
    print(f"build_message       {build_ms * 1000:9.1f} µs/email")
    print(f"  goal < {BUILD_GOAL_MS} ms: {build_ms < BUILD_GOAL_MS}")


if __name__ == "__main__":
    main()
