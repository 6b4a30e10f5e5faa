"""``python -m spectral_cli`` runs the ``spectral`` command line."""

from .cli import main

main()
