class DMFExportError(Exception):
    """A problem the user can fix (bad file, bad shapes, missing tool).

    The command line prints its message as one line and exits non-zero, without a
    traceback unless ``--debug`` is given.
    """
