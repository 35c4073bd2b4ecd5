"""``python -m service``: run the HTTP service (same flags as ``uqserve serve``)."""

from service.cli import main

raise SystemExit(main())
