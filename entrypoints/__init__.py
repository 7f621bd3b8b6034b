"""The `attamba` command line (cli.py) and its commands that only drive other packages (generate.py)."""
