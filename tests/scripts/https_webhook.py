"""A webhook receiver over HTTPS for the tests: prints one JSON line per
POST with the event and whether its X-Tcpka-Signature is valid.

usage: https_webhook.py CERT KEY SECRET_FILE  (prints the port first)
"""
import hashlib
import hmac
import http.server
import json
import ssl
import sys

cert, key, secret_file = sys.argv[1:4]
with open(secret_file, "rb") as f:
    secret = f.read().strip()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ts = self.headers.get("X-Tcpka-Timestamp", "")
        sig = self.headers.get("X-Tcpka-Signature", "")
        want = "sha256=" + hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        print(json.dumps({"valid": hmac.compare_digest(want, sig), "event": json.loads(body)}), flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
