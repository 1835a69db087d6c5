import sys

from loaq.cli import main

sys.exit(main())
