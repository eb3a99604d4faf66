import sys

from emloc.cli import main

sys.exit(main())
