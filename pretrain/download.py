"""`python -m pretrain.download`: fetch data shards from a bucket, skipping those already here intact (the command lives in pretrain.data.download)."""

import sys

from pretrain.data.download import main

if __name__ == "__main__":
    sys.exit(main())
