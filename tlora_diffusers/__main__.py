"""``python -m tlora_diffusers``: the same as the ``tlora-diffusers`` command."""

from .cli.main import main

raise SystemExit(main())
