"""``python -m elsa_codec.cli ...`` is the ``elsa`` command."""
import sys

from .main import main

sys.exit(main())
