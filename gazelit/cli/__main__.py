import sys

from gazelit.cli import main

sys.exit(main())
