"""``python -m rpicluster.cli``: the ``rpicluster`` command."""

from rpicluster.cli import main

main()
