import sys

from imapveil.cli import main

sys.exit(main())
