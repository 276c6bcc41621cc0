"""``python -m celeriac worker …`` is the same as ``celeriac worker …``."""

from celeriac._cli import main

main()
