"""``python -m campaigns.cli``."""

from campaigns.cli import main

main()
