"""`python -m medxray.cli`: the `medxray` command (as the console entry point ``medxray.cli:main``)."""

import sys

from medxray.cli import main

sys.exit(main())
