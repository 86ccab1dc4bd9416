"""``python -m training.pretrain``: the command line of ``training.pretrain.train.main``."""

import sys

from datencoder_core.errors import DATEncoderError
from training.pretrain.train import main

try:
    main()
except DATEncoderError as error:
    sys.exit(f"error: {error}")
