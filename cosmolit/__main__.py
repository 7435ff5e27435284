"""`python -m cosmolit ...` is the same as the `cosmolit` command."""

from cosmolit.cli import main

main()
