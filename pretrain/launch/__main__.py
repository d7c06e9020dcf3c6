"""`python -m pretrain.launch ...`: what start_training.sh execs (see pretrain/launch/supervisor.py)."""

import sys

from pretrain.launch.supervisor import main

sys.exit(main())
