"""A real Debian nginx with ngx_xprec_module on loopback, for the gateway's tests and benches:
writes nginx.conf, starts and stops the server, and talks HTTP (plain sockets and http.client, so
every byte on the wire is what the test says)."""
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = os.environ.get("XPREC_MODULE", os.path.join(ROOT, "build", "nginx", "ngx_xprec_module.so"))
NGINX = os.environ.get("XPREC_NGINX", "/usr/sbin/nginx")

BAD_LOG = re.compile(r"\[(alert|crit|emerg)\]")


def keyhash(key):
    return hashlib.sha256(key.encode()).hexdigest()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def self_signed(prefix):
    """A throwaway certificate for 127.0.0.1."""
    crt, key = os.path.join(prefix, "cert.pem"), os.path.join(prefix, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", crt],
                   check=True, capture_output=True)
    return crt, key


class Gateway:
    def __init__(self, prefix, http_block, server_extra="", main_extra="", tls=False,
                 workers=1):
        self.prefix = str(prefix)
        os.makedirs(os.path.join(self.prefix, "logs"), exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.conf = os.path.join(self.prefix, "nginx.conf")
        self.error_log = os.path.join(self.prefix, "logs", "error.log")
        tls_server = ""
        if tls:
            crt, key = self_signed(self.prefix)
            tls_server = f"""
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        location /v1/ {{ xprec_openai; }}
        location @xprec_error {{ xprec_error; }}
        error_page 400 404 405 408 411 413 414 494 500 502 503 504 @xprec_error;
    }}"""
        user = "user root;" if os.geteuid() == 0 else ""
        self.text = f"""load_module {MODULE};
{user}
worker_processes {workers};
error_log {self.error_log} info;
pid {self.prefix}/logs/nginx.pid;
{main_extra}
events {{ worker_connections 8192; }}
http {{
    access_log {self.prefix}/logs/access.log;
    client_body_temp_path {self.prefix}/body;
{http_block}
    server {{
        listen 127.0.0.1:{self.port};
        location /v1/ {{ xprec_openai; }}
        location /admin/ {{ xprec_admin; }}
        location @xprec_error {{ xprec_error; }}
        error_page 400 404 405 408 411 413 414 494 500 502 503 504 @xprec_error;
{server_extra}
    }}{tls_server}
}}
"""
        with open(self.conf, "w") as f:
            f.write(self.text)

    def nginx(self, *args, check=True):
        return subprocess.run([NGINX, "-p", self.prefix, "-c", self.conf, *args],
                              capture_output=True, text=True, check=check)

    def test_config(self):
        return self.nginx("-t", check=False)

    def pid(self):
        try:
            return int(open(os.path.join(self.prefix, "logs", "nginx.pid")).read())
        except (OSError, ValueError):
            return None

    def start(self, admin_key=None, wait=True):
        p = self.nginx(check=False)
        if p.returncode != 0:
            raise AssertionError(f"nginx did not start:\n{p.stderr}\n{self.log()[-3000:]}")
        if wait:
            self.wait_ready(admin_key)
        return self

    def wait_ready(self, admin_key, timeout=60):
        """Until the worker's engine is up (admin status), or at least the port answers."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if admin_key:
                    st, _, body = self.request("GET", "/admin/status", key=admin_key)
                    if st == 200 and json.loads(body)["engine"]["state"] == "ready":
                        return
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise AssertionError("the gateway did not become ready:\n" + self.log()[-3000:])

    def workers(self):
        """Worker pids of this master."""
        master = self.pid()
        out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-e"], capture_output=True,
                             text=True).stdout
        return [int(l.split()[0]) for l in out.splitlines()
                if len(l.split()) > 2 and int(l.split()[1]) == master and "worker" in l]

    def stop(self, timeout=60):
        pid = self.pid()
        if pid is None:
            return
        self.nginx("-s", "quit", check=False)
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)
        self.nginx("-s", "stop", check=False)

    def log(self):
        try:
            return open(self.error_log, errors="replace").read()
        except OSError:
            return ""

    def bad_log_lines(self):
        return [l for l in self.log().splitlines() if BAD_LOG.search(l)]

    # ------------------------------------------------------------ HTTP

    def conn(self, timeout=60, tls=False):
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection("127.0.0.1", self.tls_port, timeout=timeout,
                                               context=ctx)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, key=None, headers=None, timeout=120, tls=False):
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        c = self.conn(timeout, tls)
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        c.close()
        return r.status, hdrs, data

    def json(self, method, path, body=None, key=None, **kw):
        st, h, data = self.request(method, path, body, key, **kw)
        return st, json.loads(data) if data else None

    def reload(self, old_pid, timeout=30):
        """nginx -s reload, then waits until the worker old_pid has stopped accepting: until it
        hears of the reload it accepts beside the new one, so a request could still reach it."""
        self.nginx("-s", "reload")
        t0 = time.time()
        while (f"{old_pid}#{old_pid}: gracefully shutting down" not in self.log()
               and time.time() - t0 < timeout):
            time.sleep(0.05)

    def start_stream(self, path, body, key, timeout=300):
        """POSTs a streaming request; returns (connection, response) with the body unread."""
        c = self.conn(timeout)
        c.request("POST", path, body=json.dumps(body),
                  headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        return c, c.getresponse()

    def stream(self, path, body, key, timeout=300):
        """POSTs a streaming request; returns (status, [parsed data payloads], raw text)."""
        c, r = self.start_stream(path, body, key, timeout)
        raw = r.read().decode()
        c.close()
        events = []
        for block in raw.split("\n\n"):
            if block.startswith("data: "):
                payload = block[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        return r.status, events, raw

    def raw(self, data, timeout=30, read_until_close=True):
        """Sends bytes on a fresh connection and returns what comes back."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if not read_until_close and b"\r\n\r\n" in out:
                    break
        except socket.timeout:
            pass
        s.close()
        return out


def stream_text(events):
    """The text a chat or completions stream carried, chunk by chunk joined."""
    out = []
    for e in events:
        if e == "[DONE]" or not e.get("choices"):
            continue
        ch = e["choices"][0]
        out.append(ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content") or "")
    return "".join(x or "" for x in out)
