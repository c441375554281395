"""`python -m speakerflow.streams.cli` runs the command line (worker processes are started this way)."""

import sys

from speakerflow.streams.cli.main import main

sys.exit(main())
