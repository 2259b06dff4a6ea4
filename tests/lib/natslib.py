"""natslib — a real nats-server for the tests, and NATS user nkeys made without NATS tools.

Standard library only, on top of batonlib:
  * NatsServer: nats-server on 127.0.0.1 with a free client port and a free monitoring port,
    from a configuration file the test may extend (e.g. an `authorization` block); connz() reads
    the server's own list of connected clients (name, authorized user);
  * user_nkey(): a fresh ed25519 key pair from the `openssl` CLI, written in the nkey text form
    (seed "SU…" for NATS_AUTH_NKEY, public key "U…" for the server), and decode() to check one;
  * raw_connect(): one CONNECT without credentials, to prove that the server demands them.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.request

import batonlib as bl

# nkey prefixes (the first 5 bits of the first byte name the kind of key)
PREFIX_SEED = 18 << 3
PREFIX_USER = 20 << 3
# DER framing of a raw ed25519 key as `openssl genpkey` / `openssl pkey -pubout` write it
DER_PRIVATE = bytes.fromhex("302e020100300506032b657004220420")
DER_PUBLIC = bytes.fromhex("302a300506032b6570032100")


def nats_server_bin():
    path = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK)
                                           else None)
    if not path:
        raise AssertionError("nats-server not found (Debian package nats-server); this test needs a real server")
    return path


class NatsServer:
    """nats-server on 127.0.0.1:port with its monitoring endpoint on 127.0.0.1:http_port.
    `config` is added to the configuration file (e.g. an authorization block)."""

    def __init__(self, dir, config="", name="nats-server"):
        self.dir, self.config, self.name = dir, config, name
        self.port, self.http_port = bl.free_port(), bl.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc, self.n = None, 0
        self.conf_path = os.path.join(dir, f"{name}.conf")
        with open(self.conf_path, "w") as f:
            f.write(f"listen: 127.0.0.1:{self.port}\nhttp: 127.0.0.1:{self.http_port}\n{config}\n")

    def start(self):
        self.n += 1
        self.log = os.path.join(self.dir, f"{self.name}-{self.n}.log")
        self.proc = bl.Proc([nats_server_bin(), "-c", self.conf_path], log=self.log, name=f"{self.name}:{self.port}")

        def up():
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(5) == b"INFO "
        bl.wait_for(up, 15, what=f"nats-server on port {self.port}")
        bl.wait_for(lambda: self.connz() is not None, 15, what=f"nats-server monitoring on port {self.http_port}")
        return self

    def kill(self):
        self.proc.kill(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL, f"nats-server did not die of SIGKILL: {self.proc.returncode}"

    def connz(self):
        """The server's connected clients (its /connz with auth details), or None if it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/connz?auth=true", timeout=5) as r:
                return json.loads(r.read()).get("connections") or []
        except OSError:
            return None

    def clients(self):
        """{client name: authorized user ('' when none)} of the connected clients."""
        return {c.get("name", ""): c.get("authorized_user", "") for c in (self.connz() or [])}


def raw_connect(port, connect=None):
    """Sends one CONNECT (default: no credentials) and a PING; returns the first reply line after
    INFO: b'PONG' when accepted, the -ERR line when refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"INFO "), "no INFO from nats-server"
        body = json.dumps(connect or {"verbose": False, "pedantic": False, "name": "natslib"}).encode()
        s.sendall(b"CONNECT " + body + b"\r\nPING\r\n")
        return f.readline().strip()


# ---- nkeys ----

def crc16_xmodem(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def encode(prefix, raw):
    """The nkey text form: base32 (no padding) of prefix + raw + CRC-16/XMODEM little-endian."""
    data = bytes(prefix) + raw
    crc = crc16_xmodem(data)
    return base64.b32encode(data + bytes([crc & 0xFF, crc >> 8])).decode().rstrip("=")


def decode(text):
    """(prefix bytes, raw key) of an nkey text; raises ValueError when it is not one (alphabet,
    length, checksum, kind)."""
    data = base64.b32decode(text + "=" * (-len(text) % 8))
    body, crc = data[:-2], data[-2] | data[-1] << 8
    if crc16_xmodem(body) != crc:
        raise ValueError(f"nkey checksum mismatch in {text!r}")
    if len(body) == 34 and body[0] & 0xF8 == PREFIX_SEED:
        kind = ((body[0] & 7) << 5) | (body[1] >> 3)
        if kind != PREFIX_USER or body[1] & 7:
            raise ValueError(f"not a user seed: {text!r}")
        return body[:2], body[2:]
    if len(body) == 33 and body[0] == PREFIX_USER:
        return body[:1], body[1:]
    raise ValueError(f"not a user nkey: {text!r}")


def user_nkey(dir, name):
    """A new user key pair: (seed "SU…", public key "U…"). The private key is written to
    <dir>/<name>.der (the test's own directory) for the openssl call that derives the public key."""
    der = subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-outform", "DER"], capture_output=True,
                         check=True, timeout=30).stdout
    path = os.path.join(dir, f"{name}.der")
    with open(path, "wb") as f:
        f.write(der)
    pub_der = subprocess.run(["openssl", "pkey", "-inform", "DER", "-in", path, "-pubout", "-outform", "DER"],
                             capture_output=True, check=True, timeout=30).stdout
    assert len(der) == 48 and der.startswith(DER_PRIVATE), f"unexpected ed25519 private key DER: {der.hex()}"
    assert len(pub_der) == 44 and pub_der.startswith(DER_PUBLIC), f"unexpected ed25519 public key DER: {pub_der.hex()}"
    seed = encode([PREFIX_SEED | PREFIX_USER >> 5, (PREFIX_USER & 31) << 3], der[16:])
    pub = encode([PREFIX_USER], pub_der[12:])
    assert decode(seed) == (bytes([PREFIX_SEED | PREFIX_USER >> 5, 0]), der[16:]), seed
    assert decode(pub) == (bytes([PREFIX_USER]), pub_der[12:]), pub
    return seed, pub
