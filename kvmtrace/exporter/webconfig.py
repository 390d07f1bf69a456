"""The exporter's web configuration file (``--web.config.file``): TLS and basic authentication in
the format of the Prometheus exporter-toolkit (node_exporter, ebpf_exporter ...), so one file
serves every exporter of a host:

    tls_server_config:
      cert_file: exporter.crt            # relative paths: from the file's own directory
      key_file: exporter.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: clients-ca.crt                 # with a verifying client_auth_type
      min_version: TLS12                             # optional, TLS10..TLS13
      max_version: TLS13                             # optional
    basic_auth_users:
      prometheus: $2y$10$...             # bcrypt hash: htpasswd -nBC 10 "" | tr -d ':\\n'

Every mistake is one UsageError naming the key and the fix. Keys of the toolkit's format that
kvmtrace does not implement (inline certificates, cipher suites, rate limits, headers ...) are
refused rather than ignored: a security setting that silently does nothing is worse than none.
Passwords are checked with bcrypt; a successful check is cached (keyed by a SHA-256 of the
credentials), as the toolkit does, so a scrape every few seconds costs one hash, not one bcrypt."""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..errors import KvmtraceError, UsageError

FIX = "see deploy/web-config.yml and docs/exporter.md, \"Security\""
TOP_KEYS = ("tls_server_config", "basic_auth_users")
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
# keys of the exporter-toolkit format that kvmtrace refuses (the fix: remove them)
UNSUPPORTED = {"http_server_config", "rate_limit", "cert", "key", "client_ca", "client_allowed_sans",
               "cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
AUTH_CACHE_MAX = 1024  # successful credentials remembered (a hash each)


@dataclass
class WebConfig:
    """A checked web configuration: an SSL context (None: plain HTTP) and bcrypt hashes."""

    path: str = ""
    ssl_context: Optional[ssl.SSLContext] = None
    client_cert_required: bool = False
    users: Dict[str, bytes] = field(default_factory=dict)
    files: Tuple[str, ...] = ()  # every file it was made of, to notice changes
    _dummy: bytes = b""
    _ok: Dict[bytes, bool] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def authenticates(self) -> bool:
        """Does every request need credentials (a password or a verified client certificate)?"""
        return bool(self.users) or self.client_cert_required

    def cached(self, user: bytes, password: bytes) -> Optional[bool]:
        """True when these credentials were accepted before, None when bcrypt must decide."""
        if not self.users:
            return True
        with self._lock:
            return self._ok.get(_key(user, password))

    def check(self, user: bytes, password: bytes) -> bool:
        """bcrypt check of one user's password (slow on purpose: run it off the event loop).
        An unknown user costs the same bcrypt as a known one, so timing does not tell names."""
        import bcrypt

        if not self.users:
            return True
        want = self.users.get(user.decode("utf-8", "surrogateescape"))
        try:
            ok = bcrypt.checkpw(password, want or self._dummy) and want is not None
        except ValueError:  # bcrypt refuses passwords over 72 bytes: not one of ours
            ok = False
        if ok:
            with self._lock:
                if len(self._ok) >= AUTH_CACHE_MAX:
                    self._ok.clear()
                self._ok[_key(user, password)] = True
        return ok


def _key(user: bytes, password: bytes) -> bytes:
    return hmac.new(b"kvmtrace-basic-auth", user + b"\0" + password, hashlib.sha256).digest()


def _bad(path: str, what: str, fix: str = FIX) -> UsageError:
    return UsageError(f"--web.config.file {path}: {what}", fix)


def load(path: str) -> WebConfig:
    """Read and check a web configuration file; a UsageError with the fix for any mistake."""
    try:
        import bcrypt  # noqa: F401
        import yaml
    except ImportError as e:
        raise KvmtraceError(f"--web.config.file needs PyYAML and bcrypt ({e})",
                            "reinstall kvmtrace with its dependencies: make setup (or pip install PyYAML bcrypt)") from None

    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise _bad(path, f"cannot read it ({e.strerror})",
                   "give the path of a YAML web configuration (example: deploy/web-config.yml)") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise _bad(path, f"not valid YAML{where} ({problem})", "fix the YAML syntax; " + FIX) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise _bad(path, "must be a YAML mapping with tls_server_config and/or basic_auth_users")
    _check_keys(path, "", doc, TOP_KEYS)
    base = os.path.dirname(os.path.abspath(path))
    cfg = WebConfig(path=path)
    files = [path]
    tls = doc.get("tls_server_config")
    if tls is not None:
        if not isinstance(tls, dict):
            raise _bad(path, "tls_server_config must be a mapping with cert_file and key_file")
        _check_keys(path, "tls_server_config.", tls, TLS_KEYS)
        cfg.ssl_context, cfg.client_cert_required, used = _ssl_context(path, base, tls)
        files += used
    users = doc.get("basic_auth_users")
    if users is not None:
        cfg.users = _users(path, users)
        import bcrypt

        cfg._dummy = bcrypt.hashpw(b"kvmtrace", bcrypt.gensalt(10))
    cfg.files = tuple(files)
    return cfg


def _check_keys(path: str, prefix: str, doc: dict, known) -> None:
    for k in doc:
        if k in UNSUPPORTED:
            raise _bad(path, f"{prefix}{k} is not supported by kvmtrace",
                       f"remove it (kvmtrace reads {', '.join(prefix + x for x in known)})")
        if k not in known:
            raise _bad(path, f"unknown key {prefix}{k!s}", f"use only {', '.join(prefix + x for x in known)}")


def _path(path: str, base: str, tls: dict, key: str) -> str:
    v = tls.get(key)
    if not isinstance(v, str) or not v.strip():
        raise _bad(path, f"tls_server_config.{key} must be a file name", f"set {key}: /path/to/file (PEM)")
    return os.path.join(base, v)


def _ssl_context(path: str, base: str, tls: dict):
    cert, key = _path(path, base, tls, "cert_file"), _path(path, base, tls, "key_file")
    mode_name = tls.get("client_auth_type", "NoClientCert")
    if mode_name in ("RequestClientCert", "RequireAnyClientCert"):
        raise _bad(path, f"client_auth_type {mode_name} accepts unverified client certificates",
                   "use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file")
    if mode_name not in CLIENT_AUTH:
        raise _bad(path, f"client_auth_type {mode_name!r} is not one of {', '.join(CLIENT_AUTH)}",
                   "use RequireAndVerifyClientCert with client_ca_file, or leave it out")
    mode = CLIENT_AUTH[mode_name]
    ca = _path(path, base, tls, "client_ca_file") if "client_ca_file" in tls else None
    if mode != ssl.CERT_NONE and ca is None:
        raise _bad(path, f"client_auth_type {mode_name} needs client_ca_file",
                   "set client_ca_file: the CA that signs your clients' certificates")
    if mode == ssl.CERT_NONE and ca is not None:
        raise _bad(path, "client_ca_file is set but client_auth_type is NoClientCert",
                   "set client_auth_type: RequireAndVerifyClientCert, or remove client_ca_file")
    versions = []
    for k, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        v = tls.get(k, default)
        if v not in TLS_VERSIONS:
            raise _bad(path, f"tls_server_config.{k} {v!r} is not one of {', '.join(TLS_VERSIONS)}",
                       f"e.g. {k}: {default}")
        versions.append(TLS_VERSIONS[v])
    if versions[0] > versions[1]:
        raise _bad(path, "tls_server_config.min_version is above max_version", "e.g. min_version: TLS12")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version, ctx.maximum_version = versions
    except (ValueError, ssl.SSLError) as e:
        raise _bad(path, f"this OpenSSL refuses the TLS versions asked for ({e})", "e.g. min_version: TLS12") from None
    for name, f in (("cert_file", cert), ("key_file", key)) + ((("client_ca_file", ca),) if ca else ()):
        if not os.path.isfile(f):
            raise _bad(path, f"tls_server_config.{name} {f}: no such file", f"set {name} to an existing PEM file")
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as e:
        raise _bad(path, f"cannot use cert_file {cert} with key_file {key} ({_ssl_reason(e)})",
                   "give a PEM certificate and the PEM private key that matches it") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise _bad(path, f"cannot use client_ca_file {ca} ({_ssl_reason(e)})", "give a PEM CA certificate") from None
    ctx.verify_mode = mode
    return ctx, mode == ssl.CERT_REQUIRED, [cert, key] + ([ca] if ca else [])


def _ssl_reason(e: Exception) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__


def _users(path: str, users) -> Dict[str, bytes]:
    import bcrypt

    if not isinstance(users, dict):
        raise _bad(path, "basic_auth_users must map user names to bcrypt hashes", "e.g. prometheus: $2y$10$...")
    out = {}
    for user, h in users.items():
        if not isinstance(user, str) or ":" in user or not user:
            raise _bad(path, f"basic_auth_users: {user!r} is not a user name (a non-empty string without ':')",
                       "rename the user")
        if not isinstance(h, str):
            raise _bad(path, f"basic_auth_users.{user} must be a bcrypt hash string",
                       "hash a password with: htpasswd -nBC 10 \"\" | tr -d ':\\n'")
        hb = h.strip().encode()
        try:
            if not hb.startswith((b"$2a$", b"$2b$", b"$2y$")):
                raise ValueError
            bcrypt.checkpw(b"", hb)  # rejects a malformed hash
        except ValueError:
            raise _bad(path, f"basic_auth_users.{user} is not a bcrypt hash (a password in clear?)",
                       "hash the password with: htpasswd -nBC 10 \"\" | tr -d ':\\n'") from None
        out[user] = hb
    return out


class Watched:
    """The current web configuration of a file, reloaded when the file (or a certificate it
    names) changes, as the toolkit rereads it on each request: certificates can be renewed
    without a restart. A change that does not load keeps the previous configuration and says so
    once on stderr."""

    def __init__(self, path: str, cfg: Optional[WebConfig] = None, log=None):
        self.path = path
        self.cfg = cfg if cfg is not None else load(path)
        self._sig = self._signature(self.cfg.files)
        self._bad_sig = None
        self._log = log
        self._lock = threading.Lock()

    @staticmethod
    def _signature(files) -> tuple:
        out = []
        for f in files:
            try:
                st = os.stat(f)
                out.append((f, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((f, None))
        return tuple(out)

    def changed(self) -> bool:
        """Has a file changed since it was last loaded (or last failed to load)? A few stat()s."""
        sig = self._signature(self.cfg.files)
        return sig != self._sig and sig != self._bad_sig

    def current(self) -> WebConfig:
        """The configuration, reloaded first if a file changed (bcrypt: slow, keep it off the
        event loop)."""
        with self._lock:
            sig = self._signature(self.cfg.files)
            if sig == self._sig or sig == self._bad_sig:
                return self.cfg
            try:
                cfg = load(self.path)
            except UsageError as e:
                self._bad_sig = sig
                if self._log is not None:
                    self._log(f"kvmtrace exporter: web config change not applied, still serving the previous one: "
                              f"{e.message} (fix: {e.remedy})")
                return self.cfg
            self.cfg, self._sig, self._bad_sig = cfg, self._signature(cfg.files), None
            return cfg
