"""The one exception type for user mistakes.

A user mistake (a missing file, a bad specs key, a wrong flag value) raises
``MeshSDFError`` with a one-line message that names the file or key and says how to fix
it.  ``lib.cli.cli_main`` turns it into that line on stderr and exit status 2, never a
traceback.  Programming errors are not caught: they keep their traceback.
"""
from __future__ import annotations


class MeshSDFError(Exception):
    """A mistake the user can fix; the message is shown as one line, without a traceback."""


EXIT_USER_ERROR = 2
