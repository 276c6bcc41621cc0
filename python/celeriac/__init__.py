"""celeriac: a prefork worker runtime for Celery's task queues, written in Rust.

Installed with pip, it provides the ``celeriac`` command (``celeriac worker``),
and the ``worker-readiness`` and ``worker-liveness`` probe binaries.
"""

from celeriac._native import __version__

__all__ = ["__version__"]
