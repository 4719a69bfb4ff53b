"""The drip Celery app, for `celery -A worker worker`, `celery -A worker beat` and
`celery -A worker flower`. Settings come from the environment (DRIP_*); with no DRIP_BROKER_URL a
private Redis under var/ is used, started if none is running."""

from drip.tasks import app, configure_from_env

configure_from_env()

__all__ = ["app"]
