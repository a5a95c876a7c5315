"""`python -m alignprop --config config/align_prop.py:PRESET ...`: the same command line as main.py."""

from alignprop.cli import main

main()
