"""``python -m model``: run one model worker."""

from model.worker import main

main()
