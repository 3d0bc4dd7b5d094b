"""The one error of the history operations (fork, export, import), shared by their modules."""


class HistoryError(ValueError):
    """A fork, export or import that cannot be done as asked; the message says why and how."""
