import sys

from kraite_mp.cli import main

sys.exit(main())
