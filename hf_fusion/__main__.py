"""``python -m hf_fusion`` runs the command line."""

import sys

from hf_fusion.cli import main

sys.exit(main())
