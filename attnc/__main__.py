import sys

from attnc.frontends.cli import main

sys.exit(main())
