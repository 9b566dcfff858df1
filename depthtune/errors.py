"""One exception type for every user-facing problem.

Stages catch `DepthtuneError` at the edge (`depthtune.cli.run_stage`), print its
one-line message and exit non-zero: no traceback spam for bad input.
"""


class DepthtuneError(Exception):
    """A problem the user can fix; the message names the key, file or row."""


class ConfigError(DepthtuneError):
    """params.yaml (or a CLI spec) is invalid."""


class DataError(DepthtuneError):
    """Input data is missing, unreadable or unusable."""


class ModelError(DepthtuneError):
    """A model, checkpoint or variant cannot be loaded or built."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, or its type name when the message is empty.

    `str(exc).splitlines()[0]` raises IndexError on an empty message and hides the real error.
    """
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
