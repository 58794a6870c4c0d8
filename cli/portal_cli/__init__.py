"""``portal``: the image classification portal from a terminal (login, predict, batches)."""

__version__ = "1.0.0"
