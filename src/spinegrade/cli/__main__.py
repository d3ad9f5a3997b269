import sys

from spinegrade.cli import main

sys.exit(main())
