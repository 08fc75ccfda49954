"""``python -m postlane`` runs the command line."""

from postlane.cli import main

main()
