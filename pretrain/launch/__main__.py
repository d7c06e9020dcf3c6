"""`python -m pretrain.launch ...`: what start_training.sh runs (see pretrain/launch/command.py)."""

import sys

from pretrain.launch.command import main

sys.exit(main())
