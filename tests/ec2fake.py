"""A local EC2 endpoint for tests: moto's server in a child process, and a fault proxy in front.

``MotoServer`` runs ``moto.server.ThreadedMotoServer`` in its own Python process (so this test
process never imports moto, whose import registers hooks in botocore), on 127.0.0.1, port chosen by
the kernel; the child exits when its stdin closes.

``Ec2Proxy`` is a loopback HTTP server the driver's boto3 client talks to. It forwards every EC2
Query API request to moto, recording it, and can instead answer a chosen action with a real EC2 error
document (``fail``). It also fills three gaps in moto:

* DescribeSpotPriceHistory: moto has no price data, so the proxy serves the pages it is given;
* ed25519 key fingerprints: moto reports a hex SHA-256 of the DER key where EC2 reports
  ``SHA256:<base64>=`` of the SSH key blob, so the proxy translates both ways;
* paging: with ``page_size`` set, DescribeInstances requests without MaxResults get one, so a
  listing of a few instances spans several pages.

And it keeps the dispatcher's traffic on this host: instances' private addresses (moto hands out
172.31.x.y) are reported as 127.31.x.y, so an SSH attempt meets a closed loopback port instead of
leaving the machine.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit
from xml.sax.saxutils import escape

import requests

_LAUNCH = r"""
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
host, port = s.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()
s.stop()
"""

REGION = "us-east-1"
ACCESS_KEY = "AKIAEXAMPLEDISPATCH0"
SECRET_KEY = "dispatch-cloud-test-secret-key-do-not-log"


class MotoServer:
    """moto's EC2 (and IAM) endpoint in a child process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"moto server did not start (said {line!r})")
        self.url = line

    def reset(self) -> None:
        requests.post(self.url + "/moto-api/reset", timeout=10).raise_for_status()

    def client(self, service: str = "ec2"):
        import boto3
        return boto3.client(service, endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def stop(self) -> None:
        """Stop the child we started (by its pid; its state is throwaway)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


def error_document(code: str, message: str) -> bytes:
    """An EC2 Query API error body, as EC2 itself sends it."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
            f'<Message>{escape(message)}</Message></Error></Errors>'
            f'<RequestID>{uuid.uuid4()}</RequestID></Response>').encode()


@dataclass
class Rule:
    action: str
    code: str
    message: str
    status: int = 400
    times: int | None = 1  # None: every matching call
    match: Callable[[dict], bool] | None = None
    hits: int = 0


@dataclass
class Call:
    action: str
    params: dict
    failed: str = ""  # the injected error code, if the proxy answered with one
    headers: dict = field(default_factory=dict)


@dataclass
class SpotPrice:
    instance_type: str
    az: str
    price: str
    when: float  # unix seconds


@dataclass
class _State:
    rules: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    spot_pages: list = field(default_factory=list)
    fingerprints: dict = field(default_factory=dict)  # moto's -> EC2's


def aws_ed25519_fingerprint(public_key_line: str) -> str:
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode()


def moto_ed25519_fingerprint(public_key_line: str) -> str:
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_ssh_public_key(" ".join(public_key_line.split()[:2]).encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    h = hashlib.sha256(der).hexdigest()
    return ":".join(h[i:i + 2] for i in range(0, len(h), 2))


class Ec2Proxy:
    """A recording, fault-injecting loopback proxy in front of moto's EC2 endpoint."""

    def __init__(self, upstream: str, *, page_size: int | None = None):
        self.upstream = urlsplit(upstream)
        self.page_size = page_size
        self._lock = threading.Lock()
        self._s = _State()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                proxy._handle(self)

            do_GET = do_POST

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name="ec2-proxy")
        self._thread.start()

    # -- test API -----------------------------------------------------------------------------

    def fail(self, action: str, code: str, message: str = "injected", *, status: int = 400,
             times: int | None = 1, match: Callable[[dict], bool] | None = None) -> Rule:
        rule = Rule(action, code, message or code, status, times, match)
        with self._lock:
            self._s.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._s.rules.clear()

    def serve_spot_prices(self, *pages: list[SpotPrice]) -> None:
        with self._lock:
            self._s.spot_pages = [list(p) for p in pages]

    def calls(self, action: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self._s.calls if action is None or c.action == action]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- serving ------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
        params = dict(pairs)
        action = params.get("Action", "")
        with self._lock:
            rule = next((r for r in self._s.rules if r.action == action and (r.match is None or r.match(params))
                         and (r.times is None or r.hits < r.times)), None)
            if rule is not None:
                rule.hits += 1
        pairs = self._rewrite_request(action, pairs)
        with self._lock:  # recorded as moto would receive it
            self._s.calls.append(Call(action, dict(pairs), rule.code if rule else "", dict(h.headers.items())))
        if rule is not None:
            return self._reply(h, rule.status, error_document(rule.code, rule.message))
        if action == "DescribeSpotPriceHistory":
            return self._reply(h, 200, self._spot_page(params))
        status, headers, out = self._forward(h, urlencode(pairs).encode() if pairs else body)
        if action == "ImportKeyPair":
            self._learn_fingerprint(params)
        if action in ("ImportKeyPair", "DescribeKeyPairs"):
            out = self._translate(out)
        if action in ("RunInstances", "DescribeInstances"):
            out = re.sub(rb"<privateIpAddress>\d+\.", b"<privateIpAddress>127.", out)
        self._reply(h, status, out, headers.get("Content-Type", "text/xml"))

    def _rewrite_request(self, action: str, pairs: list) -> list:
        if action == "DescribeInstances" and self.page_size and not any(k == "MaxResults" for k, _ in pairs):
            pairs = pairs + [("MaxResults", str(self.page_size))]
        if action == "DescribeKeyPairs":
            with self._lock:
                back = {v: k for k, v in self._s.fingerprints.items()}
            pairs = [(k, back.get(v, back.get(v + "=", v)) if k.startswith("Filter.") and ".Value." in k else v)
                     for k, v in pairs]
        return pairs

    def _learn_fingerprint(self, params: dict) -> None:
        line = base64.b64decode(params.get("PublicKeyMaterial", "")).decode(errors="replace")
        if line.startswith("ssh-ed25519 "):
            with self._lock:
                self._s.fingerprints[moto_ed25519_fingerprint(line)] = aws_ed25519_fingerprint(line)

    def _translate(self, out: bytes) -> bytes:
        text = out.decode()
        with self._lock:
            for moto_fp, aws_fp in self._s.fingerprints.items():
                text = text.replace(moto_fp, aws_fp)
        return text.encode()

    def _spot_page(self, params: dict) -> bytes:
        token = params.get("NextToken", "")
        with self._lock:
            pages = self._s.spot_pages or [[]]
        i = int(token[1:]) if token.startswith("p") else 0
        items = "".join(
            f"<item><instanceType>{p.instance_type}</instanceType><productDescription>Linux/UNIX</productDescription>"
            f"<spotPrice>{p.price}</spotPrice><timestamp>"
            f"{datetime.fromtimestamp(p.when, timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.000Z')}</timestamp>"
            f"<availabilityZone>{p.az}</availabilityZone></item>" for p in pages[i])
        nxt = f"p{i + 1}" if i + 1 < len(pages) else ""  # the last page says "" (Arvados bug #22400)
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeSpotPriceHistoryResponse '
                f'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>{uuid.uuid4()}</requestId>'
                f'<spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken>{nxt}</nextToken>'
                f'</DescribeSpotPriceHistoryResponse>').encode()

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("content-length", "connection")}
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "text/xml") -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
