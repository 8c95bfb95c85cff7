"""``python -m diffalign ...`` and ``accelerate launch -m diffalign ...``."""

import sys

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
