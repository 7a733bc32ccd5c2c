#!/usr/bin/env python3
"""A stand-in for Azure Key Vault and its Entra ID token endpoint, for tests.

No Azure Key Vault emulator exists, so this speaks the real service's wire
protocol, written from Microsoft's REST reference (Key Vault keys API
2025-07-01, Microsoft identity platform v2.0 token endpoint):

- HTTPS only, with a test CA it creates (``STATE/ca.pem``) and a server
  certificate for 127.0.0.1.
- Entra ID: ``POST /{tenant}/oauth2/v2.0/token`` with the client-credentials
  grant, by client secret or by a client assertion (an RS256 JWT signed with the
  service principal's certificate, checked against that certificate). Errors are
  Entra's JSON (``error``, ``error_description`` with an AADSTS code,
  ``error_codes``, ``trace_id``...). Tokens are opaque bearer tokens.
- Key Vault: a request without a bearer token gets 401 and the challenge
  ``Bearer authorization="https://login.microsoftonline.com/{tenant}",
  resource="https://vault.azure.net"``; a token with another audience or issuer
  gets 401 too. Every request needs a known ``api-version``.
- Keys: create, get, rotate, update (enable/disable, key_ops), wrapkey and
  unwrapkey with real cryptography: RSA-OAEP-256 (and RSA-OAEP) for RSA and
  RSA-HSM keys, A256KW for oct-HSM keys (Managed HSM). Every key has versions;
  a call without a version uses the newest.
- Access policies: each service principal has a set of key permissions; a
  missing one gets 403 Forbidden, innererror AccessDenied. A disabled key
  version gets 403 Forbidden, innererror KeyDisabled; an unknown key or
  version 404 KeyNotFound; a malformed request 400 BadParameter.
- Managed identity, as App Service serves it (REST endpoint reference,
  api-version 2019-08-01): ``GET /msi/token?api-version=2019-08-01&resource=R``
  [``&client_id=C``] with the ``X-IDENTITY-HEADER`` secret and ``metadata:
  true`` returns ``{"access_token", "expires_on" (epoch seconds, a string),
  "resource", "token_type", "client_id"}`` for the system-assigned identity
  (``--msi-principal``) or a user-assigned one (a principal with
  ``"managed_identity": true``). A wrong or missing secret gets 401, an
  identity not assigned 400. ``POST /_standin/msi {"lifetime": S, "down":
  bool}`` sets the tokens' lifetime, or makes the endpoint drop connections.
- Throttling: ``POST /_standin/throttle {"count": N, "retry_after": S}`` makes
  the next N Key Vault requests answer 429 with ``Retry-After: S`` (a test
  hook, outside the real API). ``GET /_standin/stats`` counts requests by
  operation and status.

Usage: server.py --port PORT --state DIR --principals FILE [--msi-principal ID --msi-header SECRET]
The principals file: {"tenant_id": "...", "principals": {"CLIENT_ID":
{"secret": "...", "certificate_pem_file": "...", "permissions": ["get", ...]}}}
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import secrets
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.x509.oid import NameOID

API_VERSIONS = {"7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"}
KEY_VAULT_RESOURCE = "https://vault.azure.net"
KEY_VAULT_SCOPE = KEY_VAULT_RESOURCE + "/.default"
PUBLIC_AUTHORITY = "https://login.microsoftonline.com"
ALL_KEY_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
TOKEN_LIFETIME = 3599


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_\-]*=*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def int_b64url(number):
    return b64url(number.to_bytes((number.bit_length() + 7) // 8, "big"))


class ApiError(Exception):
    """A Key Vault error: status, code, message, optional inner code."""

    def __init__(self, status, code, message, inner=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner
        self.headers = headers or {}

    def body(self):
        error = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


class EntraError(Exception):
    """An Entra ID token error, shaped like the real endpoint's."""

    def __init__(self, status, error, aadsts, description):
        super().__init__(description)
        self.status, self.error, self.aadsts, self.description = status, error, aadsts, description

    def body(self):
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": self.error,
            "error_description": f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace} "
            f"Correlation ID: {correlation} Timestamp: {stamp}",
            "error_codes": [self.aadsts],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"{PUBLIC_AUTHORITY}/error?code={self.aadsts}",
        }


class KeyVersion:
    def __init__(self, kty, key_size, key_ops):
        self.version = uuid.uuid4().hex
        self.kty = kty
        self.key_ops = list(key_ops)
        self.enabled = True
        self.created = self.updated = int(time.time())
        if kty in ("RSA", "RSA-HSM"):
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
            self.secret = None
        else:  # oct-HSM
            self.private = None
            self.secret = secrets.token_bytes(key_size // 8)
        self.key_size = key_size


class State:
    def __init__(self, tenant_id, principals):
        self.lock = threading.Lock()
        self.tenant_id = tenant_id
        self.principals = principals
        self.tokens = {}  # token -> (client_id, tenant, scope, expires)
        self.keys = {}  # name -> [KeyVersion], oldest first
        self.throttle_count = 0
        self.throttle_retry_after = 1
        self.stats = {}
        self.msi_principal = None
        self.msi_header = None
        self.msi_lifetime = TOKEN_LIFETIME
        self.msi_down = False

    def count(self, op, status):
        with self.lock:
            key = f"{op} {status}"
            self.stats[key] = self.stats.get(key, 0) + 1


def make_tls(state_dir):
    """A CA and a server certificate for 127.0.0.1; the CA is written to ca.pem."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "byok_pg test CA (Azure stand-in)")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    with open(os.path.join(state_dir, "ca.pem.tmp"), "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(os.path.join(state_dir, "server.pem"), "wb") as f:
        f.write(cert.public_bytes(pem))
        f.write(ca_cert.public_bytes(pem))
    with open(os.path.join(state_dir, "server.key"), "wb") as f:
        f.write(
            key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(state_dir, "server.pem"), os.path.join(state_dir, "server.key"))
    return context


def verify_client_assertion(assertion, certificate_pem, client_id, audience):
    """Checks an RS256 client assertion as Entra does; returns an error text or None."""
    parts = assertion.split(".")
    if len(parts) != 3:
        return "The client assertion is not a JWT."
    try:
        header = json.loads(unb64url(parts[0]))
        claims = json.loads(unb64url(parts[1]))
        signature = unb64url(parts[2])
    except (ValueError, json.JSONDecodeError):
        return "The client assertion is not a JWT."
    cert = x509.load_pem_x509_certificate(certificate_pem)
    if header.get("alg") != "RS256":
        return "The client assertion must be signed with RS256."
    thumbprint = cert.fingerprint(hashes.SHA1())
    if header.get("x5t") != b64url(thumbprint) and header.get("x5t") != base64.b64encode(thumbprint).decode():
        return f"Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: '{header.get('x5t')}']"
    try:
        cert.public_key().verify(
            signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return "Client assertion failed signature validation."
    if claims.get("aud") != audience:
        return f"The audience claim value is invalid '{claims.get('aud')}'."
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return "The client assertion's issuer and subject must be the client id."
    if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
        return "The provided client assertion is expired."
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "AzureStandIn/1.0"
    state: State = None

    def log_message(self, fmt, *args):  # requests go to stderr without query strings
        sys.stderr.write("%s %s\n" % (self.command, urlsplit(self.path).path))

    # --- plumbing -----------------------------------------------------------
    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def base_url(self):
        return f"https://{self.headers.get('Host', '127.0.0.1')}"

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_PUT(self):
        self.dispatch("PUT")

    def dispatch(self, method):
        url = urlsplit(self.path)
        body = self.read_body()
        path = url.path
        if path.startswith("/_standin/"):
            return self.standin(method, path, body)
        m = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", path)
        if m:
            return self.token(m.group(1), method, body)
        if path == "/msi/token":
            return self.managed_identity_token(method, parse_qs(url.query))
        if path.startswith("/keys/") or path == "/keys":
            return self.key_vault(method, path, parse_qs(url.query), body)
        self.send_json(404, {"error": {"code": "NotFound", "message": "No such resource."}})

    # --- test hooks ---------------------------------------------------------
    def standin(self, method, path, body):
        st = self.state
        if path == "/_standin/throttle" and method == "POST":
            req = json.loads(body or b"{}")
            with st.lock:
                st.throttle_count = int(req.get("count", 0))
                st.throttle_retry_after = int(req.get("retry_after", 1))
            return self.send_json(200, {"count": st.throttle_count})
        if path == "/_standin/msi" and method == "POST":
            req = json.loads(body or b"{}")
            with st.lock:
                st.msi_lifetime = int(req.get("lifetime", st.msi_lifetime))
                st.msi_down = bool(req.get("down", st.msi_down))
            return self.send_json(200, {"lifetime": st.msi_lifetime, "down": st.msi_down})
        if path == "/_standin/stats" and method == "GET":
            with st.lock:
                return self.send_json(200, dict(st.stats))
        self.send_json(404, {"error": {"code": "NotFound", "message": "unknown hook"}})

    # --- Entra ID -----------------------------------------------------------
    def token(self, tenant, method, body):
        st = self.state
        try:
            if method != "POST":
                raise EntraError(405, "invalid_request", 900561, "The endpoint only accepts POST requests.")
            if tenant != st.tenant_id:
                raise EntraError(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.")
            form = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
            if form.get("grant_type") != "client_credentials":
                raise EntraError(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
            client_id = form.get("client_id", "")
            principal = st.principals.get(client_id)
            if principal is None:
                raise EntraError(400, "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.")
            scope = form.get("scope", "")
            if not scope.endswith("/.default"):
                raise EntraError(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).")
            if "client_secret" in form:
                expected = principal.get("secret")
                if expected is None or not secrets.compare_digest(form["client_secret"], expected):
                    raise EntraError(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '%s'." % client_id)
            elif form.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                pem_file = principal.get("certificate_pem_file")
                if not pem_file:
                    raise EntraError(401, "invalid_client", 700027, "Client assertion contains an invalid signature. [Reason - The key was not found.]")
                with open(pem_file, "rb") as f:
                    pem = f.read()
                audience = f"{self.base_url()}/{tenant}/oauth2/v2.0/token"
                problem = verify_client_assertion(form.get("client_assertion", ""), pem, client_id, audience)
                if problem:
                    raise EntraError(401, "invalid_client", 700027, problem)
            else:
                raise EntraError(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
        except EntraError as e:
            self.state.count("token", e.status)
            return self.send_json(e.status, e.body())
        token = secrets.token_urlsafe(48)
        with st.lock:
            st.tokens[token] = (client_id, tenant, scope, time.time() + TOKEN_LIFETIME)
        st.count("token", 200)
        self.send_json(200, {"token_type": "Bearer", "expires_in": TOKEN_LIFETIME, "ext_expires_in": TOKEN_LIFETIME, "access_token": token})

    # --- Managed identity (App Service's local token endpoint) --------------
    def managed_identity_token(self, method, query):
        st = self.state
        if st.msi_down:
            # Down: the connection is dropped without an answer.
            st.count("msi", 0)
            self.close_connection = True
            self.connection.close()
            return
        arg = lambda name: (query.get(name) or [""])[0]
        secret = self.headers.get("X-IDENTITY-HEADER", "")
        if method != "GET":
            status, body = 405, {"error": "invalid_request", "error_description": "The endpoint only accepts GET requests."}
        elif st.msi_header is None or not secrets.compare_digest(secret, st.msi_header):
            status, body = 401, {"error": "unauthorized", "error_description": "The X-IDENTITY-HEADER header is missing or wrong."}
        elif arg("api-version") != "2019-08-01":
            status, body = 400, {"error": "invalid_request", "error_description": "api-version must be 2019-08-01."}
        elif arg("resource") != KEY_VAULT_RESOURCE:
            status, body = 400, {"error": "invalid_resource", "error_description": f"The resource '{arg('resource')}' is not known to this stand-in."}
        else:
            client_id = arg("client_id") or st.msi_principal
            principal = st.principals.get(client_id or "")
            if client_id is None or principal is None or not (client_id == st.msi_principal or principal.get("managed_identity")):
                status, body = 400, {"error": "invalid_request", "error_description": "Identity not found"}
            else:
                token = secrets.token_urlsafe(48)
                expires = int(time.time()) + st.msi_lifetime
                with st.lock:
                    st.tokens[token] = (client_id, st.tenant_id, KEY_VAULT_SCOPE, expires)
                status, body = 200, {"access_token": token, "expires_on": str(expires), "resource": KEY_VAULT_RESOURCE,
                                     "token_type": "Bearer", "client_id": client_id}
        st.count("msi", status)
        self.send_json(status, body)

    # --- Key Vault ----------------------------------------------------------
    def challenge(self):
        return {
            "WWW-Authenticate": f'Bearer authorization="{PUBLIC_AUTHORITY}/{self.state.tenant_id}", resource="{KEY_VAULT_RESOURCE}"'
        }

    def key_vault(self, method, path, query, body):
        st = self.state
        op = "unknown"
        try:
            op, name, version = self.route(method, path)
            versions = query.get("api-version")
            if not versions:
                raise ApiError(400, "BadParameter", "The request URI must contain the api-version query parameter.")
            if versions[0] not in API_VERSIONS:
                raise ApiError(400, "BadParameter", f"The specified version ({versions[0]}) is not recognized. Consider using the latest supported version (2025-07-01).")
            client_id = self.authenticate()
            with st.lock:
                if st.throttle_count > 0:
                    st.throttle_count -= 1
                    raise ApiError(429, "Throttled", "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached", headers={"Retry-After": str(st.throttle_retry_after)})
            request = json.loads(body) if body else {}
            if not isinstance(request, dict):
                raise ApiError(400, "BadParameter", "The request body is not a JSON object.")
            handler = getattr(self, "op_" + op)
            self.authorize(client_id, op)
            status, result = handler(name, version, request)
        except ApiError as e:
            st.count(op, e.status)
            headers = dict(e.headers)
            if e.status == 401:
                headers.update(self.challenge())
            return self.send_json(e.status, e.body(), headers)
        st.count(op, status)
        self.send_json(status, result)

    def route(self, method, path):
        parts = path.split("/")[2:]  # after "/keys/"
        name = parts[0] if parts else ""
        if not re.fullmatch(r"[0-9a-zA-Z-]{1,127}", name or "-"):
            raise ApiError(400, "BadParameter", "The key name is invalid: it must contain only 0-9, a-z, A-Z and -.")
        rest = parts[1:]
        if method == "POST" and rest == ["create"]:
            return "create", name, None
        if method == "POST" and rest == ["rotate"]:
            return "rotate", name, None
        if method == "GET" and len(rest) <= 1:
            return "get", name, (rest[0] if rest else "") or None
        if method == "PATCH" and len(rest) <= 1:
            return "update", name, (rest[0] if rest else "") or None
        if method == "POST" and len(rest) == 2 and rest[1] in ("wrapkey", "unwrapkey"):
            return rest[1].replace("key", "Key"), name, rest[0] or None
        raise ApiError(405, "MethodNotAllowed", f"The requested operation {method} {path} is not supported.")

    def authenticate(self):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise ApiError(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
        with self.state.lock:
            record = self.state.tokens.get(auth[len("Bearer "):])
        if record is None:
            raise ApiError(401, "Unauthorized", "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/%s/." % self.state.tenant_id)
        client_id, tenant, scope, expires = record
        if expires < time.time():
            raise ApiError(401, "Unauthorized", "AKV10022: Invalid audience / token expired.")
        if scope != KEY_VAULT_SCOPE:
            raise ApiError(401, "Unauthorized", f"AKV10022: Invalid audience. Expected {KEY_VAULT_RESOURCE}, found: {scope[:-len('/.default')]}.")
        return client_id

    def authorize(self, client_id, op):
        permissions = self.state.principals[client_id].get("permissions", [])
        if op not in permissions:
            raise ApiError(403, "Forbidden", f"The user, group or application 'appid={client_id};iss=https://sts.windows.net/{self.state.tenant_id}/' does not have keys {op} permission on key vault 'byok-standin;location=local'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287", inner="AccessDenied")

    def key_version(self, name, version):
        versions = self.state.keys.get(name)
        if not versions:
            raise ApiError(404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")
        if version is None:
            return versions[-1]
        for v in versions:
            if v.version == version:
                return v
        raise ApiError(404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")

    def bundle(self, name, v):
        jwk = {"kid": f"{self.base_url()}/keys/{name}/{v.version}", "kty": v.kty, "key_ops": v.key_ops}
        if v.private is not None:
            numbers = v.private.public_key().public_numbers()
            jwk["n"], jwk["e"] = int_b64url(numbers.n), int_b64url(numbers.e)
        return {
            "key": jwk,
            "attributes": {
                "enabled": v.enabled,
                "created": v.created,
                "updated": v.updated,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
                "exportable": False,
            },
        }

    def op_create(self, name, _version, req):
        kty = req.get("kty")
        if kty not in ("RSA", "RSA-HSM", "oct-HSM"):
            raise ApiError(400, "BadParameter", f"Property 'kty' has invalid value '{kty}'; this stand-in knows RSA, RSA-HSM and oct-HSM.")
        size = req.get("key_size") or (2048 if kty != "oct-HSM" else 256)
        if (kty == "oct-HSM" and size not in (128, 192, 256)) or (kty != "oct-HSM" and size not in (2048, 3072, 4096)):
            raise ApiError(400, "BadParameter", f"Invalid key size {size} for key type {kty}.")
        ops = req.get("key_ops") or ALL_KEY_OPS
        if not all(op in ALL_KEY_OPS for op in ops):
            raise ApiError(400, "BadParameter", "Property 'key_ops' has an invalid value.")
        v = KeyVersion(kty, size, ops)
        v.enabled = req.get("attributes", {}).get("enabled", True)
        with self.state.lock:
            self.state.keys.setdefault(name, []).append(v)
        return 200, self.bundle(name, v)

    def op_get(self, name, version, _req):
        return 200, self.bundle(name, self.key_version(name, version))

    def op_rotate(self, name, _version, _req):
        latest = self.key_version(name, None)
        v = KeyVersion(latest.kty, latest.key_size, latest.key_ops)
        with self.state.lock:
            self.state.keys[name].append(v)
        return 200, self.bundle(name, v)

    def op_update(self, name, version, req):
        v = self.key_version(name, version)
        attributes = req.get("attributes", {})
        if "enabled" in attributes:
            v.enabled = bool(attributes["enabled"])
        if "key_ops" in req:
            v.key_ops = list(req["key_ops"])
        v.updated = int(time.time())
        return 200, self.bundle(name, v)

    def usable(self, name, version, op):
        v = self.key_version(name, version)
        if not v.enabled:
            raise ApiError(403, "Forbidden", f"Operation {op} is not allowed on a disabled key.", inner="KeyDisabled")
        if op not in v.key_ops:
            raise ApiError(403, "Forbidden", f"Operation {op} is not permitted on this key.", inner="KeyOperationForbidden")
        return v

    @staticmethod
    def parameters(v, req):
        alg = req.get("alg")
        try:
            value = unb64url(req.get("value"))
        except (ValueError, TypeError):
            raise ApiError(400, "BadParameter", "Property 'value' must be base64url encoded.")
        rsa_algs = {"RSA-OAEP-256": hashes.SHA256, "RSA-OAEP": hashes.SHA1}
        if v.private is not None and alg in rsa_algs:
            hash_cls = rsa_algs[alg]
            return alg, value, padding.OAEP(mgf=padding.MGF1(algorithm=hash_cls()), algorithm=hash_cls(), label=None)
        if v.private is None and alg == f"A{v.key_size}KW":
            return alg, value, None
        raise ApiError(400, "BadParameter", f"Algorithm '{alg}' is not supported for key type '{v.kty}'.")

    def op_wrapKey(self, name, version, req):
        v = self.usable(name, version, "wrapKey")
        _alg, value, pad = self.parameters(v, req)
        if pad is not None:
            try:
                out = v.private.public_key().encrypt(value, pad)
            except ValueError:
                raise ApiError(400, "BadParameter", "The value is too long for this key.")
        else:
            if len(value) < 16 or len(value) % 8:
                raise ApiError(400, "BadParameter", "A256KW needs a value of a multiple of 8 bytes, at least 16.")
            out = aes_key_wrap(v.secret, value)
        return 200, {"kid": f"{self.base_url()}/keys/{name}/{v.version}", "value": b64url(out)}

    def op_unwrapKey(self, name, version, req):
        v = self.usable(name, version, "unwrapKey")
        _alg, value, pad = self.parameters(v, req)
        try:
            out = v.private.decrypt(value, pad) if pad is not None else aes_key_unwrap(v.secret, value)
        except (ValueError, InvalidUnwrap):
            raise ApiError(400, "BadParameter", "Decryption failed: the value was not wrapped by this key version.")
        return 200, {"kid": f"{self.base_url()}/keys/{name}/{v.version}", "value": b64url(out)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", required=True, help="directory for ca.pem and the server certificate")
    parser.add_argument("--principals", required=True)
    parser.add_argument("--msi-principal", help="the client id the system-assigned managed identity is")
    parser.add_argument("--msi-header", help="the X-IDENTITY-HEADER secret of the managed-identity endpoint")
    args = parser.parse_args()
    with open(args.principals) as f:
        config = json.load(f)
    Handler.state = State(config["tenant_id"], config["principals"])
    Handler.state.msi_principal = args.msi_principal
    Handler.state.msi_header = args.msi_header
    context = make_tls(args.state)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    # ca.pem appears only once the server listens: its presence means "ready".
    os.replace(os.path.join(args.state, "ca.pem.tmp"), os.path.join(args.state, "ca.pem"))
    server.serve_forever()


if __name__ == "__main__":
    main()
