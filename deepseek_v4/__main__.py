"""`python -m deepseek_v4 ...`: see deepseek_v4/cli.py."""

import sys

from deepseek_v4 import hugepages
from deepseek_v4.cli import main

# Subcommands that run many compiled steps restart once with huge pages (deepseek_v4/hugepages.py).
HUGEPAGE_COMMANDS = ("train", "generate", "ablate")

if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] in HUGEPAGE_COMMANDS:
    hugepages.reexec()
  sys.exit(main())
