import sys

from lightning_tricks.cli import main

sys.exit(main())
