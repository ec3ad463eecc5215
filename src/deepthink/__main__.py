"""`python -m deepthink ...` (also what `accelerate launch -m deepthink` runs)."""
import sys

from .cli import main

sys.exit(main())
