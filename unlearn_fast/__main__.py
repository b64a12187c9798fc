"""``python -m unlearn_fast`` = the ``unlearn-fast`` command."""
import sys

from .cli import main

sys.exit(main())
