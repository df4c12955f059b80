import sys

from harmodt_fast.cli import main

sys.exit(main())
