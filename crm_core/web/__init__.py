"""The web app (Flask): the guide's screens on the core's services; see :mod:`.app`."""

from crm_core.web.app import create_app

__all__ = ["create_app"]
