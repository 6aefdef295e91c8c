#!/usr/bin/env python3
"""Docker HEALTHCHECK of the API container: GET /healthz on the container's API port.

Exit 0 when the API answers 200, 1 otherwise (Docker's contract). Standard library only, so it
works on every base image (no curl in python:3.11-slim). The URL can be changed with
HEALTHCHECK_URL for an API started on another port.
"""

from __future__ import annotations

import os
import sys
import urllib.request

URL = os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:8000/healthz")


def main() -> int:
    try:
        with urllib.request.urlopen(URL, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:
        print(f"healthcheck {URL}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
