"""``python -m training.evaluate``: the command line of ``training.evaluate.run.main``."""

from training.evaluate.run import main

main()
