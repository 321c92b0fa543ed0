"""The one exception type for user mistakes, and the wrapper every script's main uses.

A user mistake (a missing file, a bad specs key, a wrong flag value) raises
``MeshSDFError`` with a one-line message that names the file or key and says how to fix
it.  ``cli_main`` turns it into that line on stderr and exit status 2, never a traceback.
Programming errors are not caught: they keep their traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class MeshSDFError(Exception):
    """A mistake the user can fix; the message is shown as one line, without a traceback."""


EXIT_USER_ERROR = 2


def cli_main(main: Callable[[], object], prog: str | None = None) -> None:
    """Run a script's ``main()`` and exit: 0 on success, 2 on ``MeshSDFError``, 130 on Ctrl-C."""
    name = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv else "meshsdf")
    try:
        rc = main()
    except MeshSDFError as err:
        msg = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{name}: error: {msg}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(rc) if isinstance(rc, int) else 0)
