"""``python -m mailhost`` runs the CLI."""
from .cli import main

main()
