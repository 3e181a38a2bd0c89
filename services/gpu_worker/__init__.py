"""The universal GPU worker: one process per device that holds several models prewarmed and
serves whichever is activated."""
