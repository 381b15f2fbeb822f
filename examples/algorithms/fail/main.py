"""Print a line to stderr and exit with the ``code`` arg (default 1)."""

import json
import os
import sys


def main() -> int:
    args = json.loads(os.environ.get("DM_ARGS") or "{}")
    code = args.get("code", 1)
    if isinstance(code, bool) or not isinstance(code, int):
        print(f"fail: 'code' must be an integer, got {code!r}", file=sys.stderr, flush=True)
        return 2
    print(f"fail: exiting with code {code}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
