"""Send usage events to a tally-sidecar with the real client libraries.

Driven by tests/tests/python_sdk.rs. Sends, in this order:

1. one event with the OpenMeter Python SDK (``client.events.ingest_event``),
2. a batch of events with the OpenMeter SDK (``client.events.ingest_events``),
3. one event in CloudEvents structured mode (``cloudevents.conversion.to_structured``),
4. one event in CloudEvents binary mode (``cloudevents.conversion.to_binary``).

Every event carries CloudEvents extension attributes. Any non-2xx answer makes the script fail
(the SDK raises on anything but 204). On success it prints one JSON document on stdout describing
exactly what went over the wire, so the test can compare it with what the upstream received:

    {"requests": [{"mode": "...", "contentType": "...", "headers": {...}, "body": <JSON>}, ...]}
"""

import argparse
import datetime
import json
import sys

import requests
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from corehttp.runtime.policies import SansIOHTTPPolicy
from openmeter import Client
from openmeter.models import Event


class RecordRequests(SansIOHTTPPolicy):
    """Records the final bytes and headers of every request the SDK sends."""

    def __init__(self):
        self.sent = []

    def on_request(self, request):
        http_request = request.http_request
        self.sent.append(
            {
                "contentType": http_request.headers.get("Content-Type"),
                "authorization": http_request.headers.get("Authorization"),
                "body": json.loads(http_request.content),
            }
        )


def sdk_event(prefix, n, **extensions):
    event = Event(
        id=f"{prefix}-sdk-{n}",
        source="tally-tests/python-sdk",
        specversion="1.0",
        type="api-calls",
        subject=f"customer-{n}",
        time=datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=datetime.timezone.utc),
        data={"tokens": 100 + n, "model": "gpt-4o", "path": "/v1/chat"},
    )
    # Extension attributes are plain top-level keys of the CloudEvent.
    for key, value in extensions.items():
        event[key] = value
    return event


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="the sidecar, e.g. http://127.0.0.1:4196")
    parser.add_argument("--token", required=True, help="the sidecar's ingest bearer token")
    parser.add_argument("--prefix", required=True, help="prefix of every event id")
    args = parser.parse_args()

    recorder = RecordRequests()
    # The SDK's own retry policy would hide a first failed answer; the test wants to see it.
    client = Client(endpoint=args.url, token=args.token, logging_policy=recorder, retry_total=0)
    report = []

    client.events.ingest_event(sdk_event(args.prefix, 0, k8snamespace="shop", k8spod="cart-0"))
    report.append(dict(mode="sdk-single", **recorder.sent[-1]))

    batch = [sdk_event(args.prefix, n, region="eu-west-1", tier=n % 2) for n in range(1, 6)]
    client.events.ingest_events(batch)
    report.append(dict(mode="sdk-batch", **recorder.sent[-1]))
    client.close()

    auth = {"Authorization": f"Bearer {args.token}"}
    structured = CloudEvent(
        {
            "id": f"{args.prefix}-ce-structured",
            "source": "tally-tests/cloudevents-sdk",
            "type": "storage-bytes",
            "subject": "customer-structured",
            "time": "2024-05-06T07:08:09Z",
            "k8snamespace": "shop",
        },
        {"bytes": 4096},
    )
    headers, body = to_structured(structured)
    response = requests.post(f"{args.url}/api/v1/events", headers={**headers, **auth}, data=body, timeout=10)
    check(response, "structured mode")
    report.append({"mode": "ce-structured", "headers": dict(headers), "body": json.loads(body)})

    binary = CloudEvent(
        {
            "id": f"{args.prefix}-ce-binary",
            "source": "tally-tests/cloudevents-sdk",
            "type": "storage-bytes",
            "subject": "customer-binary",
            "time": "2024-05-06T07:08:10Z",
            "datacontenttype": "application/json",
            "k8spod": "cart-1",
        },
        {"bytes": 8192},
    )
    headers, body = to_binary(binary)
    response = requests.post(f"{args.url}/api/v1/events", headers={**headers, **auth}, data=body, timeout=10)
    check(response, "binary mode")
    report.append({"mode": "ce-binary", "headers": dict(headers), "body": json.loads(body)})

    json.dump({"requests": report}, sys.stdout)
    print()


def check(response, what):
    if response.status_code != 204:
        sys.exit(f"{what}: the sidecar answered {response.status_code}: {response.text}")
    if response.content:
        sys.exit(f"{what}: a 204 with a body: {response.content!r}")


if __name__ == "__main__":
    main()
