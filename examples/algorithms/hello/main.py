"""Print "hello " and the args (DM_ARGS) as JSON, then exit 0."""

import json
import os


def main() -> int:
    args = json.loads(os.environ.get("DM_ARGS") or "{}")
    print("hello " + json.dumps(args, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
