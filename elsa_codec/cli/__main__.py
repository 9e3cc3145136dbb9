"""``python -m elsa_codec.cli ...`` is the ``elsa`` command."""
import sys

from .commands import main

sys.exit(main())
