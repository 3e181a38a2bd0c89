"""The ``warmserve`` command line."""
