"""`python -m pretrain.prepare_data`: raw text to shuffled, packed token shards with a dataset.json (the command lives in pretrain.prepare.command)."""

import sys

from pretrain.prepare.command import main

if __name__ == "__main__":
    sys.exit(main())
