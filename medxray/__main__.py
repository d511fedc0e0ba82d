"""`python -m medxray`: the `medxray` command (the console entry point ``medxray.cli:main``)."""

import sys

from medxray.cli import main

sys.exit(main())
