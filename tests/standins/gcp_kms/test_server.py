#!/usr/bin/env python3
"""Tests of the Cloud KMS stand-in itself, against the shapes of Google's REST
reference (v1 projects.locations.keyRings.cryptoKeys encrypt/decrypt/get,
updatePrimaryVersion, cryptoKeyVersions patch/destroy; "Verifying end-to-end
data integrity" for the CRC32C fields; the service-account JWT bearer grant and
its errors; google.rpc.Status error bodies).

Run: python3 test_server.py   (starts its own server on a free port)
"""

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from cryptography.hazmat.primitives.asymmetric import rsa

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gkms  # noqa: E402
from server import crc32c  # noqa: E402

ADMIN = "kms-admin@acme-byok.iam.gserviceaccount.com"
USER = "byok-platform@acme-byok.iam.gserviceaccount.com"
VIEWER = "viewer@acme-byok.iam.gserviceaccount.com"
RING = "projects/acme-byok/locations/us-east1/keyRings/byok-keyring"


def b64(data):
    return base64.b64encode(data).decode()


class StandInTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="gkms-standin-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cls.port = s.getsockname()[1]
        cls.url = f"http://127.0.0.1:{cls.port}"
        token_uri = cls.url + "/token"
        gkms.new_account(cls.dir, ADMIN, ["cloudkms.admin"], token_uri)
        gkms.new_account(cls.dir, USER, ["cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeyVersions.useToDecrypt", "cloudkms.cryptoKeys.get"], token_uri)
        gkms.new_account(cls.dir, VIEWER, ["cloudkms.cryptoKeys.get"], token_uri)
        ready = os.path.join(cls.dir, "ready")
        cls.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"), "--port", str(cls.port),
                                     "--accounts", os.path.join(cls.dir, "accounts.json"), "--ready-file", ready],
                                    stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(ready):
                break
            time.sleep(0.05)
        cls.admin = cls.token(ADMIN)
        cls.user = cls.token(USER)
        gkms.call(cls.url, "POST", f"/v1/projects/acme-byok/locations/us-east1/keyRings?keyRingId=byok-keyring", {}, cls.admin)

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait()

    @classmethod
    def key_file(cls, email):
        with open(os.path.join(cls.dir, email + ".json")) as f:
            return json.load(f)

    @classmethod
    def token(cls, email):
        return gkms.login(cls.key_file(email))

    def create_key(self, name):
        status, body = gkms.call(self.url, "POST", f"/v1/{RING}/cryptoKeys?cryptoKeyId={name}",
                                 {"purpose": "ENCRYPT_DECRYPT", "versionTemplate": {"protectionLevel": "HSM", "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"}}, self.admin)
        self.assertEqual(status, 200, body)
        return body

    def encrypt(self, key, plaintext, aad=b"", token=None, **extra):
        return gkms.call(self.url, "POST", f"/v1/{RING}/cryptoKeys/{key}:encrypt",
                         {"plaintext": b64(plaintext), "additionalAuthenticatedData": b64(aad), **extra}, token or self.user)

    def decrypt(self, key, ciphertext, aad=b"", **extra):
        return gkms.call(self.url, "POST", f"/v1/{RING}/cryptoKeys/{key}:decrypt",
                         {"ciphertext": ciphertext, "additionalAuthenticatedData": b64(aad), **extra}, self.user)

    # --- the JWT bearer grant -------------------------------------------------------
    def test_token_grant_and_errors(self):
        key_file = self.key_file(USER)
        grant = lambda a: gkms.call(self.url, "POST", "/token", form={"grant_type": gkms.JWT_BEARER, "assertion": a})
        status, body = grant(gkms.assertion(key_file))
        self.assertEqual((status, body["token_type"], body["expires_in"]), (200, "Bearer", 3599))
        self.assertTrue(body["access_token"].startswith("ya29."))
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.assertEqual(grant(gkms.assertion(key_file, signing_key=other)), (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
        status, body = grant(gkms.assertion(key_file, audience="https://oauth2.googleapis.com/token"))
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        status, body = grant(gkms.assertion(key_file, lifetime=7200))
        self.assertIn("short-lived token", body["error_description"])
        status, body = gkms.call(self.url, "POST", "/token", form={"grant_type": "client_credentials"})
        self.assertEqual((status, body["error"]), (400, "unsupported_grant_type"))

    def test_unauthenticated(self):
        self.create_key("authkey")
        status, body = gkms.call(self.url, "GET", f"/v1/{RING}/cryptoKeys/authkey")
        self.assertEqual((status, body["error"]["status"], body["error"]["code"]), (401, "UNAUTHENTICATED", 401))

    # --- keys ------------------------------------------------------------------------
    def test_get_crypto_key_shape(self):
        created = self.create_key("getkey")
        status, key = gkms.call(self.url, "GET", f"/v1/{RING}/cryptoKeys/getkey", token=self.user)
        self.assertEqual(status, 200)
        self.assertEqual(key["name"], f"{RING}/cryptoKeys/getkey")
        self.assertEqual(key["purpose"], "ENCRYPT_DECRYPT")
        self.assertEqual(key["primary"]["name"], f"{RING}/cryptoKeys/getkey/cryptoKeyVersions/1")
        self.assertEqual(key["primary"]["state"], "ENABLED")
        self.assertEqual(key["primary"]["algorithm"], "GOOGLE_SYMMETRIC_ENCRYPTION")
        self.assertEqual(key["versionTemplate"]["protectionLevel"], "HSM")
        self.assertEqual(created["name"], key["name"])

    def test_encrypt_decrypt_with_crc32c(self):
        self.create_key("rt")
        plaintext, aad = os.urandom(32), b"tenant=acme"
        status, enc = self.encrypt("rt", plaintext, aad, plaintextCrc32c=str(crc32c(plaintext)),
                                   additionalAuthenticatedDataCrc32c=str(crc32c(aad)))
        self.assertEqual(status, 200, enc)
        self.assertEqual(enc["name"], f"{RING}/cryptoKeys/rt/cryptoKeyVersions/1")
        self.assertIs(enc["verifiedPlaintextCrc32c"], True)
        self.assertIs(enc["verifiedAdditionalAuthenticatedDataCrc32c"], True)
        ciphertext = base64.b64decode(enc["ciphertext"])
        self.assertEqual(int(enc["ciphertextCrc32c"]), crc32c(ciphertext))
        self.assertEqual(enc["protectionLevel"], "HSM")
        status, dec = self.decrypt("rt", enc["ciphertext"], aad, ciphertextCrc32c=enc["ciphertextCrc32c"])
        self.assertEqual((status, base64.b64decode(dec["plaintext"])), (200, plaintext))
        self.assertEqual(int(dec["plaintextCrc32c"]), crc32c(plaintext))
        self.assertIs(dec["usedPrimary"], True)
        # Without the checksums the call still works; the verified flags say false.
        status, enc2 = self.encrypt("rt", plaintext)
        self.assertEqual((status, enc2["verifiedPlaintextCrc32c"]), (200, False))

    def test_integrity_and_aad_failures(self):
        self.create_key("integrity")
        status, body = self.encrypt("integrity", b"x" * 32, plaintextCrc32c=str(crc32c(b"y" * 32)))
        self.assertEqual((status, body["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertIn("checksum in field plaintext_crc32c did not match", body["error"]["message"])
        _, enc = self.encrypt("integrity", b"x" * 32, b"aad-1")
        status, body = self.decrypt("integrity", enc["ciphertext"], b"aad-2")
        self.assertEqual((status, body["error"]["message"]), (400, "Decryption failed: the ciphertext is invalid."))
        self.create_key("other")
        status, body = self.decrypt("other", enc["ciphertext"], b"aad-1")
        self.assertEqual((status, body["error"]["status"]), (400, "INVALID_ARGUMENT"))
        gkms.call(self.url, "POST", "/_standin/corrupt", {"count": 1})
        _, damaged = self.encrypt("integrity", b"x" * 32)
        self.assertNotEqual(int(damaged["ciphertextCrc32c"]), crc32c(base64.b64decode(damaged["ciphertext"])))

    def test_versions_primary_disable_destroy(self):
        self.create_key("versions")
        _, old = self.encrypt("versions", b"k" * 32)
        status, v2 = gkms.call(self.url, "POST", f"/v1/{RING}/cryptoKeys/versions/cryptoKeyVersions", {}, self.admin)
        self.assertEqual((status, v2["name"].rsplit("/", 1)[1], v2["state"]), (200, "2", "ENABLED"))
        status, key = gkms.call(self.url, "POST", f"/v1/{RING}/cryptoKeys/versions:updatePrimaryVersion", {"cryptoKeyVersionId": "2"}, self.admin)
        self.assertEqual(key["primary"]["name"], v2["name"])
        _, new = self.encrypt("versions", b"k" * 32)
        self.assertEqual(new["name"], v2["name"])
        status, dec = self.decrypt("versions", old["ciphertext"])
        self.assertEqual((status, dec["usedPrimary"]), (200, False))
        v1 = f"{RING}/cryptoKeys/versions/cryptoKeyVersions/1"
        status, body = gkms.call(self.url, "PATCH", f"/v1/{v1}?updateMask=state", {"state": "DISABLED"}, self.admin)
        self.assertEqual((status, body["state"]), (200, "DISABLED"))
        status, body = self.decrypt("versions", old["ciphertext"])
        self.assertEqual((status, body["error"]["status"], body["error"]["message"]),
                         (400, "FAILED_PRECONDITION", f"{v1} is not enabled, current state is: DISABLED."))
        status, body = gkms.call(self.url, "POST", f"/v1/{v1}:destroy", {}, self.admin)
        self.assertEqual((status, body["state"]), (200, "DESTROY_SCHEDULED"))
        self.assertIn("destroyTime", body)
        status, body = self.decrypt("versions", old["ciphertext"])
        self.assertIn("DESTROY_SCHEDULED", body["error"]["message"])

    def test_permission_and_not_found(self):
        self.create_key("perm")
        viewer = self.token(VIEWER)
        status, body = self.encrypt("perm", b"k" * 32, token=viewer)
        self.assertEqual((status, body["error"]["status"]), (403, "PERMISSION_DENIED"))
        self.assertEqual(body["error"]["message"], f"Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied on resource '{RING}/cryptoKeys/perm' (or it may not exist).")
        status, body = gkms.call(self.url, "GET", f"/v1/{RING}/cryptoKeys/missing", token=self.user)
        self.assertEqual((status, body["error"]["status"], body["error"]["message"]), (404, "NOT_FOUND", f"CryptoKey {RING}/cryptoKeys/missing not found."))

    def test_resource_exhausted(self):
        self.create_key("quota")
        gkms.call(self.url, "POST", "/_standin/exhaust", {"count": 1})
        status, body = self.encrypt("quota", b"k" * 32)
        self.assertEqual((status, body["error"]["status"]), (429, "RESOURCE_EXHAUSTED"))
        self.assertEqual(self.encrypt("quota", b"k" * 32)[0], 200)


if __name__ == "__main__":
    unittest.main(verbosity=1)
