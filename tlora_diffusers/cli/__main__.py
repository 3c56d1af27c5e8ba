"""``python -m tlora_diffusers.cli``: the same as the ``tlora-diffusers`` script."""

from .main import main

raise SystemExit(main())
