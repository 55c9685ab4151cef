"""Exceptions the command line turns into a message and an exit code."""


class A2QError(Exception):
    """A problem with the user's input; the message names the file, node or layer and what to do."""

    exit_code = 1


class AnalysisProblem(A2QError):
    """The work finished, but some layer could not be handled (report still printed)."""

    exit_code = 3


class PreconditionError(A2QError):
    """A pass was given a model it cannot work on (its ``requires`` check failed)."""


class PostconditionError(A2QError):
    """A pass's output broke its own promise (its ``ensures`` check failed): a bug, never written out."""

    exit_code = 4


class LoweringError(A2QError):
    """FINN could not lower (part of) the model; the message names the node or the stage."""
