"""`python -m pretrain.sample_text`: write the small real-text corpus built from the Python standard library's documentation (the command lives in pretrain.prepare.sample_text)."""

import sys

from pretrain.prepare.sample_text import main

if __name__ == "__main__":
    sys.exit(main())
