"""Exit 3 after ``after`` seconds (default 0.2): a crash for the restart policy to catch."""

import json
import os
import time


def main() -> int:
    args = json.loads(os.environ.get("DM_ARGS") or "{}")
    after = float(args.get("after", 0.2))
    print(f"crash: generation {os.environ.get('DM_GENERATION')}, exiting 3 in {after}s", flush=True)
    time.sleep(after)
    print("crash: exiting 3", flush=True)
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
