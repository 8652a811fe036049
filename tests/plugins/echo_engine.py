"""A throwaway serving engine, registered only by tests (FORGE_PLUGINS=engine:echo=echo_engine:ENGINE).

Its image serves with a few lines of Python's http.server: GET /ready (its health route), GET /v1/models and
POST /v1/chat/completions, which answers by echoing the question. It loads plain BF16 checkpoints and runs on
a CPU (no GPU contract). Its test base has no Python, so forge does not smoke-test the image; the test runs
the image's ENTRYPOINT on the host instead.
"""
from __future__ import annotations

from forge.engines import GpuEngine, ServeAt

SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
model, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        if self.path == "/ready": return self.reply(200, {"ready": True})
        if self.path == "/v1/models": return self.reply(200, {"object": "list", "data": [{"id": name, "root": model}]})
        self.reply(404, {"error": self.path})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = "echo: " + req["messages"][-1]["content"]
        self.reply(200, {"model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
    def log_message(self, *a): pass
HTTPServer(("0.0.0.0", port), H).serve_forever()
"""


class EchoEngine(GpuEngine):   # the defaults: no ROCm, no extra env or files, the recipe name as model id
    name = "echo"
    formats = ("bf16",)
    kernels: dict = {}
    cpu = True
    health_route = "/ready"
    smoke_test = False

    def image_env(self) -> tuple[tuple[str, str], ...]:
        return (("ECHO_PREFIX", "echo: "),)

    def context_dirs(self, context, served: str) -> tuple[tuple[str, str], ...]:
        (context / "echo").mkdir()
        (context / "echo" / "served-name").write_text(served)
        return (("echo", "/opt/echo"),)

    def serve_command(self, loaded, fmt: str, at: ServeAt) -> tuple[str, ...]:
        return ("python3", "-c", SERVER, at.model_dir, str(at.port), at.served_name)


ENGINE = EchoEngine()
