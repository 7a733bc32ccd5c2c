#!/usr/bin/env python3
"""Tests of the Azure Key Vault stand-in itself, against the shapes of the
examples in Microsoft's REST reference (Key Vault keys 2025-07-01: Create Key,
Get Key, Rotate Key, Update Key, Wrap Key, Unwrap Key; the identity platform's
client-credentials token request and error response; the 401 challenge).
Where an example uses an algorithm the stand-in does not offer (RSA1_5), the
test uses RSA-OAEP-256, the one byok_pg uses.

Run: python3 test_server.py   (starts its own server on a free port)
"""

import base64
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import akv  # noqa: E402

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
APP = "b5b6c9a5-0000-4d4e-9c1d-1a2b3c4d5e6f"
READER = "c0ffee00-0000-4000-8000-000000000001"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def self_signed(key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "byok test principal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )


def jwt(key, cert, client_id, audience, exp_offset=600):
    header = {"alg": "RS256", "typ": "JWT", "x5t": b64url(cert.fingerprint(hashes.SHA1()))}
    now = int(time.time())
    claims = {"aud": audience, "iss": client_id, "sub": client_id, "jti": "x", "nbf": now, "exp": now + exp_offset}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


class StandInTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="akv-standin-")
        cls.cert_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cls.cert = self_signed(cls.cert_key)
        cert_file = os.path.join(cls.dir, "principal.pem")
        with open(cert_file, "wb") as f:
            f.write(cls.cert.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(cls.dir, "principals.json"), "w") as f:
            json.dump({"tenant_id": TENANT, "principals": {
                APP: {"secret": "app-secret", "certificate_pem_file": cert_file,
                      "permissions": ["get", "create", "update", "rotate", "wrapKey", "unwrapKey"]},
                READER: {"secret": "reader-secret", "permissions": ["get"]},
            }}, f)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cls.port = s.getsockname()[1]
        cls.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "server.py"), "--port", str(cls.port), "--state", cls.dir,
             "--principals", os.path.join(cls.dir, "principals.json")],
            stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(os.path.join(cls.dir, "ca.pem")):
                break
            time.sleep(0.05)
        cls.url = f"https://127.0.0.1:{cls.port}"
        cls.ca = os.path.join(cls.dir, "ca.pem")

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait()

    def client(self, who=APP, secret="app-secret"):
        c = akv.Client(self.url, self.ca)
        c.login(TENANT, who, secret)
        return c

    def token_request(self, form):
        return akv.Client(self.url, self.ca).call("POST", f"/{TENANT}/oauth2/v2.0/token", query=False, form=form)

    def create(self, c, name, kty="RSA-HSM", size=2048, ops=("wrapKey", "unwrapKey")):
        status, _, body = c.call("POST", f"/keys/{name}/create", {"kty": kty, "key_size": size, "key_ops": list(ops)})
        self.assertEqual(status, 200, body)
        return body

    # --- identity platform ------------------------------------------------------------
    def test_token_success_shape(self):
        status, _, body = self.token_request({"grant_type": "client_credentials", "client_id": APP,
                                              "client_secret": "app-secret", "scope": "https://vault.azure.net/.default"})
        self.assertEqual(status, 200)
        self.assertEqual(body["token_type"], "Bearer")
        self.assertIsInstance(body["expires_in"], int)
        self.assertTrue(body["access_token"])

    def test_token_errors_shape(self):
        cases = [({"client_secret": "wrong"}, 401, "invalid_client", 7000215),
                 ({"client_id": "00000000-0000-0000-0000-000000000000"}, 400, "unauthorized_client", 700016),
                 ({"scope": "https://vault.azure.net"}, 400, "invalid_scope", 1002012)]
        for change, status, error, code in cases:
            form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": "app-secret",
                    "scope": "https://vault.azure.net/.default", **change}
            got, _, body = self.token_request(form)
            self.assertEqual((got, body["error"], body["error_codes"]), (status, error, [code]))
            self.assertTrue(body["error_description"].startswith(f"AADSTS{code}: "))
            for field in ("timestamp", "trace_id", "correlation_id", "error_uri"):
                self.assertIn(field, body)
        got, _, body = akv.Client(self.url, self.ca).call("POST", "/not-a-tenant/oauth2/v2.0/token", query=False,
                                                          form={"grant_type": "client_credentials"})
        self.assertEqual((got, body["error_codes"]), (400, [90002]))

    def test_client_assertion(self):
        audience = f"{self.url}/{TENANT}/oauth2/v2.0/token"
        base = {"grant_type": "client_credentials", "client_id": APP, "scope": "https://vault.azure.net/.default",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
        status, _, body = self.token_request({**base, "client_assertion": jwt(self.cert_key, self.cert, APP, audience)})
        self.assertEqual(status, 200, body)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        status, _, body = self.token_request({**base, "client_assertion": jwt(other, self.cert, APP, audience)})
        self.assertEqual((status, body["error_codes"]), (401, [700027]))
        status, _, body = self.token_request({**base, "client_assertion": jwt(self.cert_key, self.cert, APP, audience, -10)})
        self.assertEqual((status, body["error_codes"]), (401, [700027]))

    # --- Key Vault authentication -----------------------------------------------------
    def test_challenge(self):
        status, headers, body = akv.Client(self.url, self.ca).call("GET", "/keys/any/")
        self.assertEqual(status, 401)
        self.assertEqual(headers["WWW-Authenticate"],
                         f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://vault.azure.net"')
        self.assertEqual(body["error"]["code"], "Unauthorized")
        c = akv.Client(self.url, self.ca)
        c.token = "forged"
        self.assertEqual(c.call("GET", "/keys/any/")[0], 401)

    def test_api_version_checked(self):
        c = self.client()
        status, _, body = c.call("GET", "/keys/any/", query=False)
        self.assertEqual((status, body["error"]["code"]), (400, "BadParameter"))
        status, _, body = c.call("GET", "/keys/any/?api-version=1999-01-01", query=False)
        self.assertEqual((status, body["error"]["code"]), (400, "BadParameter"))
        self.assertIn("1999-01-01", body["error"]["message"])

    # --- keys -------------------------------------------------------------------------
    def test_create_get_shape(self):
        c = self.client()
        body = self.create(c, "CreateSoftKeyTest", kty="RSA", ops=("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"))
        key = body["key"]
        self.assertRegex(key["kid"], rf"^{re.escape(self.url)}/keys/CreateSoftKeyTest/[0-9a-f]{{32}}$")
        self.assertEqual(key["kty"], "RSA")
        self.assertEqual(key["e"], "AQAB")
        self.assertEqual(len(unb64url(key["n"])), 256)
        self.assertEqual(key["key_ops"], ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"])
        attributes = body["attributes"]
        self.assertIs(attributes["enabled"], True)
        self.assertIsInstance(attributes["created"], int)
        self.assertEqual(attributes["recoveryLevel"], "Recoverable+Purgeable")
        status, _, got = c.call("GET", "/keys/CreateSoftKeyTest/")
        self.assertEqual((status, got["key"]["kid"]), (200, key["kid"]))

    def test_wrap_unwrap_is_real_rsa_oaep_256(self):
        c = self.client()
        key = self.create(c, "sdktestkey")["key"]
        version = key["kid"].rsplit("/", 1)[1]
        dek = os.urandom(32)
        status, _, wrapped = c.call("POST", "/keys/sdktestkey//wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(dek)})
        self.assertEqual(status, 200, wrapped)
        self.assertEqual(wrapped["kid"], key["kid"])
        self.assertEqual(len(unb64url(wrapped["value"])), 256)
        status, _, out = c.call("POST", f"/keys/sdktestkey/{version}/unwrapkey", {"alg": "RSA-OAEP-256", "value": wrapped["value"]})
        self.assertEqual((status, unb64url(out["value"])), (200, dek))
        # Wrapped here with the public key alone: the stand-in really decrypts OAEP/SHA-256.
        public = rsa.RSAPublicNumbers(int.from_bytes(unb64url(key["e"]), "big"),
                                      int.from_bytes(unb64url(key["n"]), "big")).public_key()
        local = public.encrypt(dek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
        status, _, out = c.call("POST", f"/keys/sdktestkey/{version}/unwrapkey", {"alg": "RSA-OAEP-256", "value": b64url(local)})
        self.assertEqual((status, unb64url(out["value"])), (200, dek))
        # A modified value does not unwrap.
        bad = bytearray(local)
        bad[10] ^= 1
        status, _, out = c.call("POST", f"/keys/sdktestkey/{version}/unwrapkey", {"alg": "RSA-OAEP-256", "value": b64url(bytes(bad))})
        self.assertEqual((status, out["error"]["code"]), (400, "BadParameter"))

    def test_rotate_versions_and_disable(self):
        c = self.client()
        first = self.create(c, "rotating")["key"]["kid"]
        status, _, rotated = c.call("POST", "/keys/rotating/rotate", {})
        self.assertEqual(status, 200)
        second = rotated["key"]["kid"]
        self.assertNotEqual(first, second)
        self.assertEqual(c.call("GET", "/keys/rotating/")[2]["key"]["kid"], second)
        self.assertEqual(c.call("GET", "/keys/rotating/" + first.rsplit("/", 1)[1])[2]["key"]["kid"], first)
        _, _, wrapped = c.call("POST", "/keys/rotating//wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(b"k" * 32)})
        self.assertEqual(wrapped["kid"], second)
        status, _, body = c.call("POST", "/keys/rotating/" + first.rsplit("/", 1)[1] + "/unwrapkey",
                                 {"alg": "RSA-OAEP-256", "value": wrapped["value"]})
        self.assertEqual(status, 400)
        status, _, body = c.call("PATCH", "/keys/rotating/" + second.rsplit("/", 1)[1], {"attributes": {"enabled": False}})
        self.assertEqual((status, body["attributes"]["enabled"]), (200, False))
        status, _, body = c.call("POST", "/keys/rotating//unwrapkey", {"alg": "RSA-OAEP-256", "value": wrapped["value"]})
        self.assertEqual((status, body["error"]["code"], body["error"]["innererror"]["code"]), (403, "Forbidden", "KeyDisabled"))
        self.assertEqual(body["error"]["message"], "Operation unwrapKey is not allowed on a disabled key.")

    def test_not_found_forbidden_and_key_ops(self):
        c = self.client()
        status, _, body = c.call("GET", "/keys/no-such-key/")
        self.assertEqual((status, body["error"]["code"]), (404, "KeyNotFound"))
        self.assertIn("A key with (name/id) no-such-key was not found in this key vault", body["error"]["message"])
        self.create(c, "signonly", ops=("sign", "verify"))
        status, _, body = c.call("POST", "/keys/signonly//wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(b"k" * 32)})
        self.assertEqual((status, body["error"]["innererror"]["code"]), (403, "KeyOperationForbidden"))
        reader = self.client(READER, "reader-secret")
        status, _, body = reader.call("POST", "/keys/signonly//wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(b"k" * 32)})
        self.assertEqual((status, body["error"]["code"], body["error"]["innererror"]["code"]), (403, "Forbidden", "AccessDenied"))
        self.assertIn("does not have keys wrapKey permission", body["error"]["message"])

    def test_managed_hsm_a256kw(self):
        c = self.client()
        self.create(c, "hsm-aes", kty="oct-HSM", size=256)
        dek = os.urandom(32)
        status, _, wrapped = c.call("POST", "/keys/hsm-aes//wrapkey", {"alg": "A256KW", "value": b64url(dek)})
        self.assertEqual((status, len(unb64url(wrapped["value"]))), (200, 40))
        status, _, out = c.call("POST", "/keys/hsm-aes//unwrapkey", {"alg": "A256KW", "value": wrapped["value"]})
        self.assertEqual(unb64url(out["value"]), dek)
        status, _, body = c.call("POST", "/keys/hsm-aes//wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(dek)})
        self.assertEqual(status, 400)

    def test_throttling(self):
        c = self.client()
        self.create(c, "busy")
        akv.Client(self.url, self.ca).call("POST", "/_standin/throttle", {"count": 1, "retry_after": 2}, query=False)
        status, headers, body = c.call("GET", "/keys/busy/")
        self.assertEqual((status, headers["Retry-After"], body["error"]["code"]), (429, "2", "Throttled"))
        self.assertEqual(c.call("GET", "/keys/busy/")[0], 200)


if __name__ == "__main__":
    unittest.main(verbosity=1)
