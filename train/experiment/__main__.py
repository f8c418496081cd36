"""`python -m train.experiment`: onn-experiment, as the --parallel cell processes start it."""
import sys

from train.experiment.grid import main

sys.exit(main())
