#!/usr/bin/env python3
"""A tiny Key Vault REST client for the tests: what `az keyvault key ...` does,
against the stand-in (or any vault), with a service principal's secret.

  akv.py URL CA_PEM TENANT CLIENT_ID SECRET_FILE create-key NAME KTY [SIZE] [OPS...]
  akv.py ... rotate NAME
  akv.py ... set-enabled NAME VERSION|latest true|false
  akv.py ... get NAME [VERSION]
  akv.py ... token                                 (prints an access token for Key Vault)
  akv.py URL CA_PEM throttle COUNT RETRY_AFTER      (stand-in hook)
  akv.py URL CA_PEM stats                          (stand-in hook)
  akv.py URL CA_PEM msi LIFETIME DOWN              (stand-in hook: managed-identity tokens)

Prints the JSON answer; exits 1 with the error body on an HTTP error.
"""

import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

API_VERSION = "2025-07-01"


class Client:
    def __init__(self, url, ca_pem):
        self.url = url.rstrip("/")
        self.context = ssl.create_default_context(cafile=ca_pem)
        self.token = None

    def call(self, method, path, body=None, query=True, headers=None, form=None):
        url = self.url + path
        if query:
            url += ("&" if "?" in url else "?") + "api-version=" + API_VERSION
        data = None
        all_headers = dict(headers or {})
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        if self.token:
            all_headers["Authorization"] = "Bearer " + self.token
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return response.status, dict(response.headers), json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read() or b"{}")

    def login(self, tenant, client_id, secret):
        status, _, body = self.call(
            "POST",
            f"/{tenant}/oauth2/v2.0/token",
            query=False,
            form={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret,
                "scope": "https://vault.azure.net/.default",
            },
        )
        if status != 200:
            raise SystemExit(json.dumps(body))
        self.token = body["access_token"]


def main(argv):
    url, ca = argv[0], argv[1]
    client = Client(url, ca)
    if argv[2] == "throttle":
        result = client.call("POST", "/_standin/throttle", {"count": int(argv[3]), "retry_after": int(argv[4])}, query=False)
    elif argv[2] == "msi":
        result = client.call("POST", "/_standin/msi", {"lifetime": int(argv[3]), "down": argv[4] == "true"}, query=False)
    elif argv[2] == "stats":
        result = client.call("GET", "/_standin/stats", query=False)
    else:
        tenant, client_id, secret_file, command, *rest = argv[2:]
        with open(secret_file) as f:
            client.login(tenant, client_id, f.read().strip())
        if command == "token":
            print(client.token)
            return 0
        if command == "create-key":
            name, kty, *more = rest
            body = {"kty": kty}
            if more:
                body["key_size"] = int(more[0])
            if len(more) > 1:
                body["key_ops"] = more[1:]
            result = client.call("POST", f"/keys/{name}/create", body)
        elif command == "rotate":
            result = client.call("POST", f"/keys/{rest[0]}/rotate", {})
        elif command == "set-enabled":
            name, version, enabled = rest
            version = "" if version == "latest" else version
            result = client.call("PATCH", f"/keys/{name}/{version}", {"attributes": {"enabled": enabled == "true"}})
        elif command == "get":
            result = client.call("GET", f"/keys/{rest[0]}/{rest[1] if len(rest) > 1 else ''}")
        else:
            raise SystemExit(f"unknown command {command}")
    status, _headers, body = result
    print(json.dumps(body))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
