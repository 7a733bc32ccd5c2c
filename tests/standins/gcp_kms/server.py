#!/usr/bin/env python3
"""A stand-in for Google Cloud KMS (REST v1) and Google's OAuth 2.0 token
endpoint, for tests.

drongo speaks the REST shapes but does no real encryption and has no versions
or auth, so this stand-in does, written from Google's REST reference
(cloudkms.googleapis.com v1: keyRings, cryptoKeys, cryptoKeyVersions, encrypt,
decrypt, updatePrimaryVersion, patch, destroy; the service-account JWT bearer
grant):

- ``POST /token``: ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
  with an RS256 assertion signed by a registered service-account key (checked:
  signature, ``kid``, ``iss``, ``aud`` = this endpoint, a lifetime of at most one
  hour). Errors are Google's (``invalid_grant`` with a description).
- Every ``/v1`` call needs ``Authorization: Bearer`` with an issued token
  (401 UNAUTHENTICATED otherwise), and the account's IAM permissions
  (403 PERMISSION_DENIED "... (or it may not exist)").
- Keys have versions; encrypt uses the primary, the ciphertext names its version,
  decrypt uses that version. A version not ENABLED gives 400 FAILED_PRECONDITION
  "... is not enabled, current state is: DISABLED."; a wrong key or AAD gives 400
  INVALID_ARGUMENT "Decryption failed: the ciphertext is invalid.". Encryption is
  real AES-256-GCM with the caller's AAD.
- CRC32C: ``plaintextCrc32c``, ``additionalAuthenticatedDataCrc32c`` and
  ``ciphertextCrc32c`` are checked when sent (400 INVALID_ARGUMENT on a
  mismatch) and answered with ``verified...`` flags and the output's checksum.
- The Compute Engine metadata server's token endpoint (reached through
  ``GCE_METADATA_HOST``): ``GET /computeMetadata/v1/instance/service-accounts/
  default/token`` with ``Metadata-Flavor: Google`` returns ``{"access_token",
  "expires_in", "token_type"}`` for the instance's account (``--mds-account``);
  without the header, 403. ``/computeMetadata/v1/universe/universe-domain``
  answers ``googleapis.com``. ``POST /_standin/mds {"lifetime": S, "down":
  bool}`` sets the tokens' lifetime, or makes the endpoint answer 503.
- Test hooks outside the real API: ``POST /_standin/exhaust {"count": N}``
  (the next N KMS calls get 429 RESOURCE_EXHAUSTED), ``POST /_standin/corrupt
  {"count": N}`` (the next N encrypt/decrypt answers carry a damaged output, so
  its checksum no longer matches), ``GET /_standin/stats``.

Errors are ``{"error": {"code": N, "message": "...", "status": "..."}}``.

Usage: server.py --port PORT --accounts FILE [--mds-account EMAIL]
The accounts file: {"EMAIL": {"key_id": "...", "public_key_pem": "...",
"permissions": ["cloudkms.cryptoKeyVersions.useToEncrypt", ...]}}
"""

import argparse
import base64
import datetime
import json
import os
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = {"https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/cloudkms"}
ENCRYPT = "cloudkms.cryptoKeyVersions.useToEncrypt"
DECRYPT = "cloudkms.cryptoKeyVersions.useToDecrypt"
GET = "cloudkms.cryptoKeys.get"
ADMIN = "cloudkms.admin"  # stands for roles/cloudkms.admin: every management permission


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli), the checksum Cloud KMS uses."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    CRC_TABLE.append(_c)
assert crc32c(b"123456789") == 0xE3069283


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ApiError(Exception):
    def __init__(self, code, status, message):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message

    def body(self):
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class OAuthError(Exception):
    def __init__(self, error, description):
        super().__init__(description)
        self.error, self.description = error, description


class Version:
    def __init__(self, key, number, protection):
        self.key, self.number = key, number
        self.secret = AESGCM.generate_key(bit_length=256)
        self.state = "ENABLED"
        self.protection = protection
        self.create_time = now_rfc3339()
        self.destroy_time = None

    @property
    def name(self):
        return f"{self.key.name}/cryptoKeyVersions/{self.number}"

    def resource(self):
        out = {
            "name": self.name,
            "state": self.state,
            "protectionLevel": self.protection,
            "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION",
            "createTime": self.create_time,
            "generateTime": self.create_time,
        }
        if self.destroy_time:
            out["destroyTime"] = self.destroy_time
        return out


class CryptoKey:
    def __init__(self, name, purpose, protection):
        self.name, self.purpose, self.protection = name, purpose, protection
        self.versions = {}
        self.primary = None
        self.create_time = now_rfc3339()

    def new_version(self):
        v = Version(self, len(self.versions) + 1, self.protection)
        self.versions[v.number] = v
        return v

    def resource(self):
        out = {
            "name": self.name,
            "purpose": self.purpose,
            "createTime": self.create_time,
            "versionTemplate": {"protectionLevel": self.protection, "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"},
            "destroyScheduledDuration": "86400s",
        }
        if self.primary is not None:
            out["primary"] = self.versions[self.primary].resource()
        return out


class State:
    def __init__(self, accounts):
        self.lock = threading.Lock()
        self.accounts = accounts
        self.tokens = {}
        self.key_rings = {}
        self.keys = {}
        self.exhaust = 0
        self.corrupt = 0
        self.stats = {}
        self.mds_account = None
        self.mds_lifetime = 3599
        self.mds_down = False

    def count(self, op, code):
        with self.lock:
            self.stats[f"{op} {code}"] = self.stats.get(f"{op} {code}", 0) + 1


KEY_RING_RE = r"projects/[^/]+/locations/[^/]+/keyRings/[a-zA-Z0-9_-]{1,63}"
KEY_RE = KEY_RING_RE + r"/cryptoKeys/[a-zA-Z0-9_-]{1,63}"
VERSION_RE = KEY_RE + r"/cryptoKeyVersions/[0-9]+"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State = None

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.command, urlsplit(self.path).path))

    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def dispatch(self, method):
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path.startswith("/_standin/"):
            return self.hook(method, url.path, body)
        if url.path == "/token":
            return self.token(body)
        if url.path.startswith("/computeMetadata/v1/"):
            return self.metadata(method, url.path[len("/computeMetadata/v1/"):])
        if url.path.startswith("/v1/"):
            return self.kms(method, url.path[len("/v1/"):], parse_qs(url.query), body)
        self.send_json(404, ApiError(404, "NOT_FOUND", "Not Found").body())

    # --- test hooks --------------------------------------------------------------
    def hook(self, method, path, body):
        st = self.state
        req = json.loads(body or b"{}")
        with st.lock:
            if path == "/_standin/exhaust" and method == "POST":
                st.exhaust = int(req.get("count", 0))
            elif path == "/_standin/corrupt" and method == "POST":
                st.corrupt = int(req.get("count", 0))
            elif path == "/_standin/mds" and method == "POST":
                st.mds_lifetime = int(req.get("lifetime", st.mds_lifetime))
                st.mds_down = bool(req.get("down", st.mds_down))
            elif path == "/_standin/stats":
                return self.send_json(200, dict(st.stats))
            else:
                return self.send_json(404, {})
        self.send_json(200, {})

    # --- the metadata server -------------------------------------------------------
    def metadata(self, method, path):
        st = self.state
        def text(code, body):
            data = body.encode()
            self.send_response(code)
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Type", "application/text")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        if self.headers.get("Metadata-Flavor") != "Google":
            st.count("mds", 403)
            return text(403, "Missing required header: Metadata-Flavor")
        if st.mds_down:
            st.count("mds", 503)
            return text(503, "The metadata server is unavailable.")
        if method == "GET" and path == "universe/universe-domain":
            return text(200, "googleapis.com")
        if method == "GET" and path == "instance/service-accounts/default/token" and st.mds_account:
            token = "ya29.mds-" + secrets.token_urlsafe(40)
            with st.lock:
                st.tokens[token] = (st.mds_account, "https://www.googleapis.com/auth/cloud-platform",
                                    time.time() + st.mds_lifetime)
            st.count("mds", 200)
            body = json.dumps({"access_token": token, "expires_in": st.mds_lifetime, "token_type": "Bearer"})
            self.send_response(200)
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body.encode())
        st.count("mds", 404)
        return text(404, "Not found")

    # --- OAuth 2.0 JWT bearer grant -------------------------------------------------
    def token(self, body):
        try:
            form = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
            if form.get("grant_type") != JWT_BEARER:
                raise OAuthError("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
            email, scope = self.verify_assertion(form.get("assertion", ""))
        except OAuthError as e:
            self.state.count("token", 400)
            return self.send_json(400, {"error": e.error, "error_description": e.description})
        token = "ya29.standin-" + secrets.token_urlsafe(40)
        with self.state.lock:
            self.state.tokens[token] = (email, scope, time.time() + 3599)
        self.state.count("token", 200)
        self.send_json(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def verify_assertion(self, assertion):
        parts = assertion.split(".")
        if len(parts) != 3:
            raise OAuthError("invalid_grant", "Invalid JWT: the assertion is not a JWT.")
        try:
            header = json.loads(unb64url(parts[0]))
            claims = json.loads(unb64url(parts[1]))
            signature = unb64url(parts[2])
        except (ValueError, json.JSONDecodeError):
            raise OAuthError("invalid_grant", "Invalid JWT: the assertion is not a JWT.")
        account = self.state.accounts.get(claims.get("iss", ""))
        if account is None:
            raise OAuthError("invalid_grant", "Invalid grant: account not found")
        if header.get("alg") != "RS256" or header.get("kid") not in (None, account["key_id"]):
            raise OAuthError("invalid_grant", "Invalid JWT Signature.")
        public = serialization.load_pem_public_key(account["public_key_pem"].encode())
        try:
            public.verify(signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise OAuthError("invalid_grant", "Invalid JWT Signature.")
        expected_aud = f"http://{self.headers.get('Host')}/token"
        if claims.get("aud") != expected_aud:
            raise OAuthError("invalid_grant", f"Invalid JWT: Failed audience check. The right audience is {expected_aud}")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or exp - iat > 3600 or exp < time.time() or iat > time.time() + 300:
            raise OAuthError("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.")
        scope = claims.get("scope", "")
        if not set(scope.split()) & SCOPES:
            raise OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        return claims["iss"], scope

    # --- Cloud KMS -----------------------------------------------------------------
    def kms(self, method, path, query, body):
        st = self.state
        op = "unknown"
        try:
            op, name = self.route(method, path)
            email = self.authenticate()
            with st.lock:
                if st.exhaust > 0:
                    st.exhaust -= 1
                    raise ApiError(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Cryptographic requests' and limit 'Cryptographic requests per minute' of service 'cloudkms.googleapis.com'.")
            request = json.loads(body) if body else {}
            code, result = getattr(self, "op_" + op)(email, name, query, request)
        except ApiError as e:
            st.count(op, e.code)
            return self.send_json(e.code, e.body())
        except (ValueError, TypeError, KeyError) as e:
            st.count(op, 400)
            return self.send_json(400, ApiError(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {e}").body())
        st.count(op, code)
        self.send_json(code, result)

    def route(self, method, path):
        routes = [
            ("POST", rf"(projects/[^/]+/locations/[^/]+)/keyRings", "create_key_ring"),
            ("POST", rf"({KEY_RING_RE})/cryptoKeys", "create_crypto_key"),
            ("POST", rf"({KEY_RE})/cryptoKeyVersions", "create_version"),
            ("POST", rf"({KEY_RE}):encrypt", "encrypt"),
            ("POST", rf"({KEY_RE}):decrypt", "decrypt"),
            ("POST", rf"({KEY_RE}):updatePrimaryVersion", "update_primary"),
            ("POST", rf"({VERSION_RE}):destroy", "destroy"),
            ("PATCH", rf"({VERSION_RE})", "patch_version"),
            ("GET", rf"({VERSION_RE})", "get_version"),
            ("GET", rf"({KEY_RE})", "get_crypto_key"),
        ]
        for m, pattern, op in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return op, match.group(1)
        raise ApiError(404, "NOT_FOUND", f"Requested entity was not found: {method} /v1/{path}")

    def authenticate(self):
        auth = self.headers.get("Authorization", "")
        with self.state.lock:
            record = self.state.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None
        if record is None or record[2] < time.time():
            raise ApiError(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.")
        return record[0]

    def require(self, email, permission, resource):
        permissions = self.state.accounts[email].get("permissions", [])
        if permission not in permissions and ADMIN not in permissions:
            raise ApiError(403, "PERMISSION_DENIED", f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).")

    def key(self, name):
        key = self.state.keys.get(name)
        if key is None:
            raise ApiError(404, "NOT_FOUND", f"CryptoKey {name} not found.")
        return key

    def version(self, name):
        key_name, number = name.rsplit("/cryptoKeyVersions/", 1)
        version = self.key(key_name).versions.get(int(number))
        if version is None:
            raise ApiError(404, "NOT_FOUND", f"CryptoKeyVersion {name} not found.")
        return version

    def op_create_key_ring(self, email, parent, query, req):
        ring_id = (query.get("keyRingId") or [""])[0]
        self.require(email, "cloudkms.keyRings.create", parent)
        name = f"{parent}/keyRings/{ring_id}"
        if not re.fullmatch(KEY_RING_RE, name):
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid keyRingId.")
        with self.state.lock:
            if name in self.state.key_rings:
                raise ApiError(409, "ALREADY_EXISTS", f"KeyRing {name} already exists.")
            self.state.key_rings[name] = now_rfc3339()
        return 200, {"name": name, "createTime": self.state.key_rings[name]}

    def op_create_crypto_key(self, email, ring, query, req):
        key_id = (query.get("cryptoKeyId") or [""])[0]
        self.require(email, "cloudkms.cryptoKeys.create", ring)
        if ring not in self.state.key_rings:
            raise ApiError(404, "NOT_FOUND", f"KeyRing {ring} not found.")
        name = f"{ring}/cryptoKeys/{key_id}"
        if not re.fullmatch(KEY_RE, name):
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid cryptoKeyId.")
        purpose = req.get("purpose", "")
        if purpose not in ("ENCRYPT_DECRYPT", "ASYMMETRIC_SIGN", "ASYMMETRIC_DECRYPT", "MAC", "RAW_ENCRYPT_DECRYPT"):
            raise ApiError(400, "INVALID_ARGUMENT", "The request must specify a valid purpose.")
        protection = req.get("versionTemplate", {}).get("protectionLevel", "SOFTWARE")
        with self.state.lock:
            if name in self.state.keys:
                raise ApiError(409, "ALREADY_EXISTS", f"CryptoKey {name} already exists.")
            key = CryptoKey(name, purpose, protection)
            first = key.new_version()
            if purpose == "ENCRYPT_DECRYPT":
                key.primary = first.number
            self.state.keys[name] = key
        return 200, key.resource()

    def op_create_version(self, email, key_name, query, req):
        self.require(email, "cloudkms.cryptoKeyVersions.create", key_name)
        with self.state.lock:
            v = self.key(key_name).new_version()
        return 200, v.resource()

    def op_update_primary(self, email, key_name, query, req):
        self.require(email, "cloudkms.cryptoKeys.update", key_name)
        key = self.key(key_name)
        number = int(req.get("cryptoKeyVersionId", "0"))
        version = key.versions.get(number)
        if version is None:
            raise ApiError(404, "NOT_FOUND", f"CryptoKeyVersion {key_name}/cryptoKeyVersions/{number} not found.")
        if version.state != "ENABLED":
            raise ApiError(400, "FAILED_PRECONDITION", f"{version.name} is not enabled, current state is: {version.state}.")
        key.primary = number
        return 200, key.resource()

    def op_patch_version(self, email, name, query, req):
        self.require(email, "cloudkms.cryptoKeyVersions.update", name)
        version = self.version(name)
        if (query.get("updateMask") or [""])[0] != "state":
            raise ApiError(400, "INVALID_ARGUMENT", "The update_mask must be 'state'.")
        new_state = req.get("state")
        if new_state not in ("ENABLED", "DISABLED") or version.state not in ("ENABLED", "DISABLED"):
            raise ApiError(400, "FAILED_PRECONDITION", f"{version.name} is not in a state that can be changed to {new_state}, current state is: {version.state}.")
        version.state = new_state
        return 200, version.resource()

    def op_destroy(self, email, name, query, req):
        self.require(email, "cloudkms.cryptoKeyVersions.destroy", name)
        version = self.version(name)
        version.state = "DESTROY_SCHEDULED"
        version.destroy_time = now_rfc3339()
        return 200, version.resource()

    def op_get_crypto_key(self, email, name, query, req):
        self.require(email, GET, name)
        return 200, self.key(name).resource()

    def op_get_version(self, email, name, query, req):
        self.require(email, "cloudkms.cryptoKeyVersions.get", name)
        return 200, self.version(name).resource()

    @staticmethod
    def field(req, name):
        value = req.get(name)
        return base64.b64decode(value, validate=True) if value else b""

    @staticmethod
    def check_crc(req, field_name, data, wire_name):
        sent = req.get(field_name)
        if sent is None:
            return False
        if int(sent) != crc32c(data):
            raise ApiError(400, "INVALID_ARGUMENT", f"The checksum in field {wire_name} did not match the data in field {wire_name.replace('_crc32c', '')}.")
        return True

    def damaged(self, data):
        with self.state.lock:
            if self.state.corrupt > 0:
                self.state.corrupt -= 1
                return data[:-1] + bytes([data[-1] ^ 1])
        return data

    def op_encrypt(self, email, key_name, query, req):
        self.require(email, ENCRYPT, key_name)
        key = self.key(key_name)
        if key.purpose != "ENCRYPT_DECRYPT":
            raise ApiError(400, "FAILED_PRECONDITION", f"{key_name} has purpose {key.purpose}; encrypt needs ENCRYPT_DECRYPT.")
        plaintext, aad = self.field(req, "plaintext"), self.field(req, "additionalAuthenticatedData")
        if len(plaintext) > 65536:
            raise ApiError(400, "INVALID_ARGUMENT", "The plaintext is larger than 64 KiB.")
        verified_plaintext = self.check_crc(req, "plaintextCrc32c", plaintext, "plaintext_crc32c")
        verified_aad = self.check_crc(req, "additionalAuthenticatedDataCrc32c", aad, "additional_authenticated_data_crc32c")
        version = key.versions[key.primary]
        if version.state != "ENABLED":
            raise ApiError(400, "FAILED_PRECONDITION", f"{version.name} is not enabled, current state is: {version.state}.")
        nonce = os.urandom(12)
        header = b"\x01" + version.number.to_bytes(4, "big")
        sealed = AESGCM(version.secret).encrypt(nonce, plaintext, header + key_name.encode() + b"\0" + aad)
        ciphertext = self.damaged(header + nonce + sealed)
        return 200, {
            "name": version.name,
            "ciphertext": base64.b64encode(ciphertext).decode(),
            "ciphertextCrc32c": str(crc32c(header + nonce + sealed)),
            "verifiedPlaintextCrc32c": verified_plaintext,
            "verifiedAdditionalAuthenticatedDataCrc32c": verified_aad,
            "protectionLevel": version.protection,
        }

    def op_decrypt(self, email, key_name, query, req):
        self.require(email, DECRYPT, key_name)
        key = self.key(key_name)
        ciphertext, aad = self.field(req, "ciphertext"), self.field(req, "additionalAuthenticatedData")
        self.check_crc(req, "ciphertextCrc32c", ciphertext, "ciphertext_crc32c")
        self.check_crc(req, "additionalAuthenticatedDataCrc32c", aad, "additional_authenticated_data_crc32c")
        invalid = ApiError(400, "INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
        if len(ciphertext) < 5 + 12 + 16 or ciphertext[0] != 1:
            raise invalid
        version = key.versions.get(int.from_bytes(ciphertext[1:5], "big"))
        if version is None:
            raise invalid
        if version.state != "ENABLED":
            raise ApiError(400, "FAILED_PRECONDITION", f"{version.name} is not enabled, current state is: {version.state}.")
        try:
            plaintext = AESGCM(version.secret).decrypt(ciphertext[5:17], ciphertext[17:], ciphertext[:5] + key_name.encode() + b"\0" + aad)
        except InvalidTag:
            raise invalid
        return 200, {
            "plaintext": base64.b64encode(self.damaged(plaintext) if plaintext else plaintext).decode(),
            "plaintextCrc32c": str(crc32c(plaintext)),
            "usedPrimary": version.number == key.primary,
            "protectionLevel": version.protection,
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--accounts", required=True)
    parser.add_argument("--ready-file", help="written once the server listens")
    parser.add_argument("--mds-account", help="the instance's service account, for the metadata server")
    args = parser.parse_args()
    with open(args.accounts) as f:
        Handler.state = State(json.load(f))
    Handler.state.mds_account = args.mds_account
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(args.port))
    server.serve_forever()


if __name__ == "__main__":
    main()
