#!/usr/bin/env python3
"""Deletes superseded executables from the release build's deps/ directory.

Every change to a test's inputs links a new test executable (about 450 MB with line tables) beside the old one, and
cargo never deletes the old one, so a warm cache grows by gigabytes a day. An executable is deleted when all of
these hold:
- an executable of the same target, with a different hash, is newer;
- it is older than MAX_AGE_DAYS;
- no other link to it exists (a binary in release/ is a hard link to its file in deps/).
If a deleted one was still current after all, cargo links it again the next time it is needed.

Usage: prune_deps.py <target dir>
"""

import os
import re
import sys
import time
from collections import defaultdict

MAX_AGE_DAYS = 2
HASHED = re.compile(r"^(?P<target>.+)-[0-9a-f]{16}$")


def main():
    deps = os.path.join(sys.argv[1], "release", "deps")
    if not os.path.isdir(deps):
        return
    by_target = defaultdict(list)
    for name in os.listdir(deps):
        path = os.path.join(deps, name)
        match = HASHED.match(name)
        if not match or not os.path.isfile(path) or not os.access(path, os.X_OK):
            continue
        info = os.stat(path)
        by_target[match["target"]].append((info.st_mtime, path, info))
    cutoff = time.time() - MAX_AGE_DAYS * 86400
    freed = 0
    for versions in by_target.values():
        versions.sort()
        for mtime, path, info in versions[:-1]:
            if mtime < cutoff and info.st_nlink == 1:
                os.remove(path)
                freed += info.st_size
    if freed:
        print(f"prune_deps: deleted {freed / 2**30:.1f} GiB of superseded executables from {deps}")


if __name__ == "__main__":
    main()
