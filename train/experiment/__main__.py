"""`python -m train.experiment`: onn-experiment, as the --parallel cell processes start it."""
import sys

from train.experiment.cli import main

sys.exit(main())
