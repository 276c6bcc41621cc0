"""Which of the app's settings celeriac's worker honours, and which it
refuses at startup (see docs/python-apps.md, "Configuration from the app")."""


def refusal(conf):
    """One line saying why the app's configuration cannot be served, or None."""
    return None
