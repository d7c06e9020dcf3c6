"""`python -m pretrain.sample_data`: write the synthetic Markov-chain corpus the tests train on (the command lives in pretrain.data.synthetic)."""

import sys

from pretrain.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
