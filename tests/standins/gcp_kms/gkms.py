#!/usr/bin/env python3
"""A tiny Cloud KMS REST client for the tests: what `gcloud kms ...` and
`gcloud iam service-accounts keys create` do, against the stand-in.

  gkms.py new-account DIR EMAIL PERMISSION... --token-uri URI
      writes DIR/EMAIL.json (a service-account key file, as Google issues them)
      and adds the account to DIR/accounts.json (what the stand-in trusts)
  gkms.py URL KEYFILE keyring PARENT RING
  gkms.py URL KEYFILE key RING KEY [PROTECTION]
  gkms.py URL KEYFILE version KEY                 (a new version; prints its name)
  gkms.py URL KEYFILE primary KEY N
  gkms.py URL KEYFILE state VERSION ENABLED|DISABLED
  gkms.py URL KEYFILE destroy VERSION
  gkms.py URL KEYFILE token
  gkms.py URL - exhaust N | corrupt N | stats      (stand-in hooks)
  gkms.py URL - raw METHOD PATH [JSON]              (no credentials: for drongo)

Prints the JSON answer; exits 1 on an HTTP error.
"""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_account(directory, email, permissions, token_uri):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_id = os.urandom(20).hex()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    project = email.split("@")[1].split(".")[0]
    key_file = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": key_id,
        "private_key": pem,
        "client_email": email,
        "client_id": str(int.from_bytes(os.urandom(8), "big")),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{urllib.parse.quote(email)}",
        "universe_domain": "googleapis.com",
    }
    with open(os.path.join(directory, email + ".json"), "w") as f:
        json.dump(key_file, f, indent=2)
    accounts_file = os.path.join(directory, "accounts.json")
    accounts = {}
    if os.path.exists(accounts_file):
        with open(accounts_file) as f:
            accounts = json.load(f)
    accounts[email] = {
        "key_id": key_id,
        "public_key_pem": key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "permissions": permissions,
    }
    with open(accounts_file, "w") as f:
        json.dump(accounts, f, indent=2)


def assertion(key_file, audience=None, lifetime=3600, signing_key=None):
    """The JWT of the service-account bearer grant."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": key_file["private_key_id"]}
    claims = {"iss": key_file["client_email"], "scope": SCOPE, "aud": audience or key_file["token_uri"], "iat": now, "exp": now + lifetime}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    key = signing_key or serialization.load_pem_private_key(key_file["private_key"].encode(), password=None)
    return signing_input + "." + b64url(key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))


def call(url, method, path, body=None, token=None, form=None):
    headers = {}
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = "Bearer " + token
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def login(key_file):
    status, body = call(key_file["token_uri"].rsplit("/token", 1)[0], "POST", "/token",
                        form={"grant_type": JWT_BEARER, "assertion": assertion(key_file)})
    if status != 200:
        raise SystemExit(json.dumps(body))
    return body["access_token"]


def main(argv):
    if argv[0] == "new-account":
        directory, email, *rest = argv[1:]
        token_uri = rest[rest.index("--token-uri") + 1]
        permissions = [p for p in rest[: rest.index("--token-uri")]]
        new_account(directory, email, permissions, token_uri)
        return 0
    url, key_path, command, *args = argv
    if command in ("exhaust", "corrupt"):
        status, body = call(url, "POST", f"/_standin/{command}", {"count": int(args[0])})
    elif command == "stats":
        status, body = call(url, "GET", "/_standin/stats")
    elif command == "raw":
        status, body = call(url, args[0], args[1], json.loads(args[2]) if len(args) > 2 else None)
    else:
        with open(key_path) as f:
            token = login(json.load(f))
        if command == "token":
            print(token)
            return 0
        if command == "keyring":
            status, body = call(url, "POST", f"/v1/{args[0]}/keyRings?keyRingId={args[1]}", {}, token)
        elif command == "key":
            protection = args[2] if len(args) > 2 else "SOFTWARE"
            status, body = call(url, "POST", f"/v1/{args[0]}/cryptoKeys?cryptoKeyId={args[1]}",
                                {"purpose": "ENCRYPT_DECRYPT", "versionTemplate": {"protectionLevel": protection, "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"}}, token)
        elif command == "version":
            status, body = call(url, "POST", f"/v1/{args[0]}/cryptoKeyVersions", {}, token)
        elif command == "primary":
            status, body = call(url, "POST", f"/v1/{args[0]}:updatePrimaryVersion", {"cryptoKeyVersionId": args[1]}, token)
        elif command == "state":
            status, body = call(url, "PATCH", f"/v1/{args[0]}?updateMask=state", {"state": args[1]}, token)
        elif command == "destroy":
            status, body = call(url, "POST", f"/v1/{args[0]}:destroy", {}, token)
        else:
            raise SystemExit(f"unknown command {command}")
    print(json.dumps(body))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
