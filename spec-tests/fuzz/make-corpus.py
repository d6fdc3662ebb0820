#!/usr/bin/env python3
"""Writes the seed corpora under corpus/<target>/ from the project's own
fixtures: the client side of every spec-tests/fixtures/**/*.smtp dialogue
(smtp_session), DATA content shapes from the smuggling and dot-stuffing
fixtures (data_reader), and docs/mta.example.toml plus the shapes of the
config tests (config). Run it again after adding fixtures; the files are
small and committed, so a fuzz run needs no generation step."""
import hashlib
import pathlib
import re

here = pathlib.Path(__file__).resolve().parent
root = here.parent.parent


def unescape(s):
    out = bytearray()
    i = 0
    while i < len(s):
        if s[i] != "\\":
            out += s[i].encode()
            i += 1
            continue
        c = s[i + 1]
        i += 2
        if c == "x":
            out.append(int(s[i:i + 2], 16))
            i += 2
        else:
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}[c]
    return bytes(out)


def write(target, name, data):
    d = here / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


for d in ("smtp_session", "data_reader", "config"):
    for f in (here / "corpus" / d).glob("*"):
        f.unlink()

# smtp_session: settings byte, cut byte, driver script byte, then the client's bytes.
fixtures = sorted((root / "spec-tests" / "fixtures").glob("*/*.smtp"))
for i, path in enumerate(fixtures):
    sent = bytearray()
    for line in path.read_text().splitlines():
        if line.startswith(">> "):
            sent += unescape(line[3:])
        elif line.startswith("> "):
            sent += line[2:].encode() + b"\r\n"
    # Relay client with STARTTLS and AUTH on offer; dialogues that log in get
    # implicit TLS instead, since STARTTLS drops what was pipelined after it.
    flags = 0x0D
    if b"AUTH" in sent:
        flags = 0x0B
    cut = (i % 4) | (i << 2) & 0xFC
    write("smtp_session", f"{path.parent.name}-{path.stem}", bytes([flags, cut & 0xFF, 0]) + bytes(sent))

# data_reader: a cut byte, then what follows DATA's 354.
shapes = {
    "plain": b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    "empty": b".\r\n",
    "dot-stuffed": b"Subject: x\r\n\r\n..leading dot\r\n.\r\n",
    "smuggling-lf-dot-lf": b"a\r\n\n.\nMAIL FROM:<e@x.example>\r\n.\r\n",
    "smuggling-cr-dot-cr": b"a\r\n\r.\rMAIL FROM:<e@x.example>\r\n.\r\n",
    "smuggling-crlf-dot-lf": b"a\r\n.\nRCPT TO:<v@y.example>\r\n.\r\n",
    "smuggling-lf-dot-crlf": b"a\n.\r\nDATA\r\n.\r\n",
    "smuggling-crlf-dot-cr": b"a\r\n.\rDATA\r\n.\r\n",
    "nul-dot": b"a\r\n\x00.\r\n.\r\n",
    "long-line": b"x" * 1200 + b"\r\n.\r\n",
    "line-998": b"y" * 998 + b"\r\n.\r\n",
    "line-999": b"y" * 999 + b"\r\n.\r\n",
    "cr-at-end": b"header: v\r\nbody\r",
    "no-end": b"Subject: unfinished\r\n\r\nstill going\r\n",
    "dot-lines": b".\r\n..\r\n...\r\n.\r\n",
}
for i, (name, data) in enumerate(shapes.items()):
    write("data_reader", name, bytes([(i * 37) & 0xFF]) + data)

# config: the example, and one file per shape the config tests cover.
write("config", "mta.example.toml", (root / "docs" / "mta.example.toml").read_bytes())
snippets = [
    "",
    "[queue]\nencrypt = false\nencryption_key_file = \"/k\"\n",
    "[metrics.destination_groups]\nbig = [\"a.example\", \"*.b.example\"]\n",
    "[metrics]\ntop_destinations = 1001\n",
    "hostname = \"a\"\n\n[smtp]\nlisten = []\nmax_mesage_size = 5\n",
    "[smtp]\nallowed_networks = [\"10.0.0.0/33\"]\ncommand_timeout = \"soon\"\n",
    "[[tenants]]\nname = \"a\"\nsender_domains = [\"ok.example\", \"*.sub.example\"]\n"
    "[[tenants.users]]\nname = \"u\"\npassword_hash = \"hunter2\"\n",
    "[spf]\npolicy = \"enforce\"\ncheck_interval = \"10m\"\n",
    "[smtp]\ntls_certificate = \"/x.pem\"\ntls_private_key = \"/x.key\"\n",
    "[[tenants]]\nname = \"a\"\nsigning_domain = \"esp.example\"\n"
    "[[dkim.keys]]\ndomain = \"esp.example\"\nselector = \"s\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"/k\"\n",
    "[delivery]\nrelay_host = \"smarthost.example:587\"\nretry_initial = \"1m\"\nretry_max = \"1h\"\n"
    "[delivery.domains.\"gmail.com\"]\ntls = \"require\"\n",
    "[dns]\nnameservers = [\"127.0.0.1:53\"]\ntimeout = \"5s\"\n[log]\nretention_days = 30\n",
]
for s in snippets:
    write("config", hashlib.sha1(s.encode()).hexdigest()[:12] + ".toml", s.encode())
