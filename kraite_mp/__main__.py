import sys

from kraite_mp.ops.cli import main

sys.exit(main())
