"""What every part of the command line shares: the error a user can fix, and the config classes ``clsvc config``
documents. It stands below :mod:`cl_service.cli` and the modules holding the commands' bodies, which all import
it (so none of them imports ``cli``)."""

from __future__ import annotations


class CLIError(Exception):
    """An error the user can fix; printed without a trace."""


def config_classes() -> dict[str, type]:
    """The top-level config classes by the name ``clsvc config`` knows them."""
    from cl_service.config import RunCfg
    from cl_service.serve.config import ServeCfg

    return {"run": RunCfg, "serve": ServeCfg}
