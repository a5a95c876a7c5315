"""`python -m alignprop --config PRESET ...` (or FILE:PRESET): the same command line as main.py."""

from alignprop.cli import main

main()
