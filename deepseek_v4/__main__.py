"""`python -m deepseek_v4 ...`: see deepseek_v4/cli.py."""

import sys

from deepseek_v4.cli import main

if __name__ == "__main__":
  sys.exit(main())
