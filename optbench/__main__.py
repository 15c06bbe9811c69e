"""`python -m optbench`: the same command line as the `optbench` script."""

from optbench.cli import main

main()
