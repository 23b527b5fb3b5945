"""The one base class of errors a user can act on (a bad file, field, row, path, cluster...).

The CLI turns any of them into one line and a non-zero exit, never a traceback. It lives at the
bottom of the package graph so that trainers, evaluation and orchestrator can all raise them.
"""


class UserFacingError(Exception):
    """Its message names what is wrong (file, field, row, address) and how to go on."""
