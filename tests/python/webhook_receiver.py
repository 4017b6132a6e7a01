"""A webhook receiver that checks tally-sidecar's HMAC signatures, written independently of it.

Driven by tests/tests/webhook_output.rs; only the standard library (http.server, hmac, hashlib).

    webhook_receiver.py --port 0 --secret S --log requests.jsonl [--signature-header NAME]

Listens on 127.0.0.1:PORT (0: any free port) and prints ``listening on 127.0.0.1:PORT`` on stdout
once it accepts connections. Every ``POST`` (any path but ``/_control/...``) is verified: the
signature header must be ``sha256=<hex HMAC-SHA256 of the exact body bytes with the secret>``,
compared with ``hmac.compare_digest``. The answer is

- 401 when the header is missing or the signature is wrong,
- 503 while failures are injected (see below), for a request with a good signature,
- 204 with an empty body otherwise.

Each request is appended to the log file as one JSON line before it is answered:
``{"seq", "method", "path", "headers": {lower-case name: value}, "body": text,
"signatureValid": bool, "status": int, "verdict": "accepted"|"bad-signature"|"injected-failure"}``.

Control: ``POST /_control/fail?count=N&status=503`` makes the next N well-signed requests fail with
that status; ``GET /_control/health`` answers 200.
"""

import argparse
import hashlib
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Receiver:
    """State shared by the request handlers."""

    def __init__(self, secret, signature_header, log_path):
        self.secret = secret.encode("utf-8")
        self.signature_header = signature_header
        self.log = open(log_path, "a", encoding="utf-8")
        self.lock = threading.Lock()
        self.seq = 0
        self.fail_remaining = 0
        self.fail_status = 503

    def signature_valid(self, header_value, body):
        if header_value is None or not header_value.startswith("sha256="):
            return False
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(header_value[len("sha256="):], expected)

    def judge(self, headers, body):
        """Returns (signature valid, status, verdict), consuming one injected failure if due."""
        valid = self.signature_valid(headers.get(self.signature_header), body)
        if not valid:
            return valid, 401, "bad-signature"
        with self.lock:
            if self.fail_remaining > 0:
                self.fail_remaining -= 1
                return valid, self.fail_status, "injected-failure"
        return valid, 204, "accepted"

    def record(self, entry):
        with self.lock:
            self.seq += 1
            entry = {"seq": self.seq, **entry}
            # One write of a whole line, flushed before the answer is sent: a reader sees
            # complete lines, and every answered request is already in the file.
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar's HTTP client expects

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        sys.stderr.write("webhook_receiver: " + (format % args) + "\n")

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status, text=""):
        payload = text.encode("utf-8")
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        if status != 204:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if urlsplit(self.path).path == "/_control/health":
            self.answer(200, "ok")
        else:
            self.answer(404, "not found")

    def do_POST(self):  # noqa: N802
        receiver = self.server.receiver
        url = urlsplit(self.path)
        body = self.read_body()
        if url.path == "/_control/fail":
            query = parse_qs(url.query)
            with receiver.lock:
                receiver.fail_remaining = int(query.get("count", ["1"])[0])
                receiver.fail_status = int(query.get("status", ["503"])[0])
            self.answer(200, "ok")
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        valid, status, verdict = receiver.judge(self.headers, body)
        receiver.record(
            {
                "method": "POST",
                "path": self.path,
                "headers": headers,
                "body": body.decode("utf-8", errors="replace"),
                "signatureValid": valid,
                "status": status,
                "verdict": verdict,
            }
        )
        self.answer(status, "" if status == 204 else verdict)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--signature-header", default="X-Tally-Signature-256")
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.receiver = Receiver(args.secret, args.signature_header, args.log)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
