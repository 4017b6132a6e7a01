"""A metered workload, as an injected pod runs it: it reads OPENMETER_URL (which the injector sets to the
tally-sidecar in the same pod) and reports usage with the OpenMeter Python SDK.

Driven by operator/tests/data_path.rs. Sends ``--count`` events: the first alone
(``client.events.ingest_event``), the rest in batches of 10 (``client.events.ingest_events``). Ids are
``<prefix>-<n>``. The SDK raises on any answer but 204, which makes the script exit non-zero. Prints the ids sent,
one JSON array on stdout.
"""

import argparse
import datetime
import json
import os
import sys

from openmeter import Client
from openmeter.models import Event


def usage(prefix, n):
    return Event(
        id=f"{prefix}-{n}",
        source="checkout",
        specversion="1.0",
        type="api-calls",
        subject=f"customer-{n % 7}",
        time=datetime.datetime(2026, 11, 21, 12, 0, n % 60, tzinfo=datetime.timezone.utc),
        data={"calls": 1, "route": "/api/checkout", "durationMs": 10 + n % 50},
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()

    url = os.environ.get("OPENMETER_URL")
    if not url:
        sys.exit("OPENMETER_URL is not set; the injector sets it in every app container")
    client = Client(endpoint=url, retry_total=0)
    events = [usage(args.prefix, n) for n in range(args.count)]
    client.events.ingest_event(events[0])
    for start in range(1, len(events), 10):
        client.events.ingest_events(events[start : start + 10])
    client.close()
    json.dump([f"{args.prefix}-{n}" for n in range(args.count)], sys.stdout)
    print()


if __name__ == "__main__":
    main()
