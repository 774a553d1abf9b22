"""calibrun: an experiment runner for confidence calibration of image classifiers."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unreadable file).

    The command line prints its message without a traceback and exits with status 1.
    """
