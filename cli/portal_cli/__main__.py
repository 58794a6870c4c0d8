"""``python -m portal_cli``: the same as the ``portal`` console script."""

from portal_cli.main import main

main()
