"""Real code sources the source tests start on loopback.

- `GitHttpServer`: `git http-backend` behind a small HTTPS server that asks for HTTP basic
  auth on the repositories under ``private/``, with a certificate from a test CA (`TestCA`).
- `start_moto`, `start_gcs_emulator` (+ `TokenEndpoint`), `start_azurite`: S3, GCS and
  Azure Blob emulators, each a real server process listening on 127.0.0.1 only.
- `ensure_wheelhouse` / `link_wheels`: the wheels a container's uv needs (prefect-aws and
  its dependencies, ...) downloaded once for the runtime image's Python (3.11, manylinux
  x86_64) and offered through the loopback package index.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import hashlib
import importlib.metadata
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from services import BIN, Service, allow_source, free_port, start, wait_for

ROOT = Path(__file__).resolve().parent.parent
AZURITE = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
LOOPBACK = "127.0.0.1"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


def wait_for_crash_message(flow_run_id, text: str, timeout: float = 180) -> str:
    """The final state's message once it contains `text`.

    Prefect's runner in the container reports its own Crashed state first; the worker
    replaces its message with the cause a moment later.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:

        def message() -> str | None:
            state = client.read_flow_run(flow_run_id).state
            found = (state.message or "") if state is not None else ""
            return found if text in found else None

        try:
            return wait_for(message, timeout, f"the state message of {flow_run_id} naming {text!r}")
        except TimeoutError:
            state = client.read_flow_run(flow_run_id).state
            raise AssertionError(
                f"the state message of flow run {flow_run_id} does not contain {text!r} "
                f"after {timeout} s: {state.message if state else None!r}"
            ) from None


# -- TLS ------------------------------------------------------------------------------


@dataclass
class TestCA:
    """A certificate authority made for one test session, and a server certificate for
    127.0.0.1 that it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        return context


def make_test_ca(directory: Path) -> TestCA:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prefect-managed test CA")])
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
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    ca.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca


def build_image_trusting(docker_client, base_image: str, ca: TestCA, tag: str) -> str:
    """The runtime image with the test CA appended to its trust bundle.

    This is what `prefect-managed image build --ca-bundle` does for an operator's own CA;
    here it is layered on the already built runtime image, which needs no network.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="prefect-managed-ca-image-") as tmp:
        shutil.copy(ca.ca_cert, Path(tmp) / "test-ca.crt")
        (Path(tmp) / "Dockerfile").write_text(
            f"FROM {base_image}\n"
            "USER root\n"
            "COPY test-ca.crt /tmp/test-ca.crt\n"
            "RUN cat /tmp/test-ca.crt >> /etc/ssl/certs/ca-certificates.crt "
            "&& rm /tmp/test-ca.crt\n"
            "USER prefect\n"
        )
        docker_client.images.build(path=tmp, tag=tag, rm=True, network_mode="none")
    return tag


# -- git over HTTPS with basic auth ---------------------------------------------------


@dataclass
class GitRequest:
    method: str
    path: str
    user: str | None
    status: int


class _GitHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _GitHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # requests are recorded in `server.requests`, credentials left out

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized_user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        token = self.server.token
        # Like the hosted providers: the token as the password under any user name
        # (x-access-token, oauth2, x-token-auth), or as the user name with no password.
        if secrets.compare_digest(password, token) or (
            not password and secrets.compare_digest(user, token)
        ):
            return user if password else "(token)"
        return None

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        body = self._read_body()
        user = None
        if parts.path.startswith("/private/"):
            user = self._authorized_user()
            if user is None:
                self.server.record(GitRequest(self.command, parts.path, None, 401))
                self._reply(
                    401,
                    {"WWW-Authenticate": 'Basic realm="git"', "Content-Type": "text/plain"},
                    b"authentication required\n",
                )
                return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "REMOTE_USER": user or "",
            "REMOTE_ADDR": LOOPBACK,
        }
        done = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        raw = done.stdout
        split = raw.find(b"\r\n\r\n")
        head, payload = (raw[:split], raw[split + 4 :]) if split >= 0 else raw.split(b"\n\n", 1)
        status, headers = 200, {}
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers[name] = value.strip()
        self.server.record(GitRequest(self.command, parts.path, user, status))
        self._reply(status, headers, payload)


class _GitHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, token: str, ca: TestCA) -> None:
        super().__init__((LOOPBACK, 0), _GitHandler)
        self.root = root
        self.token = token
        self.requests: list[GitRequest] = []
        self._lock = threading.Lock()
        self.socket = ca.server_context().wrap_socket(self.socket, server_side=True)

    def record(self, request: GitRequest) -> None:
        with self._lock:
            self.requests.append(request)


@dataclass
class GitHttpServer:
    """HTTPS git server on 127.0.0.1: ``public/NAME`` anonymously, ``private/NAME`` only
    with the token (HTTP basic auth)."""

    root: Path
    token: str
    ca: TestCA
    _server: _GitHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def requests(self) -> list[GitRequest]:
        assert self._server is not None
        return list(self._server.requests)

    def url(self, path: str) -> str:
        return f"https://{LOOPBACK}:{self.port}/{path}"

    def start(self) -> GitHttpServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = _GitHTTPServer(self.root, self.token, self.ca)
        allow_source(self.port)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class Commit:
    """One commit of a test repository: its files, and the refs that point at it."""

    files: dict[str, str]
    branch: str = "main"
    tags: list[str] = field(default_factory=list)


def publish_repository(bare: Path, history: Iterable[Commit]) -> dict[str, str]:
    """Make a bare repository from `history` (each commit on its branch, a new branch
    starting from main's tip); return each commit's SHA keyed by `branch@index`."""
    work = bare.parent / f"_work-{bare.name}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(bare, ignore_errors=True)
    work.mkdir(parents=True)
    git = ["git", "-c", "user.name=tests", "-c", f"user.email=tests@{LOOPBACK}", "-C", str(work)]

    def run(*args: str) -> str:
        return subprocess.run([*git, *args], check=True, capture_output=True, text=True).stdout

    run("init", "-q", "-b", "main")
    shas: dict[str, str] = {}
    branches, current = {"main"}, "main"
    for index, commit in enumerate(history):
        if commit.branch not in branches:
            run("checkout", "-q", "-b", commit.branch, "main")
            branches.add(commit.branch)
        elif commit.branch != current:
            run("checkout", "-q", commit.branch)
        current = commit.branch
        for rel, text in commit.files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
        run("add", ".")
        run("commit", "-q", "-m", f"commit {index} on {commit.branch}")
        sha = run("rev-parse", "HEAD").strip()
        shas[f"{commit.branch}@{index}"] = sha
        for tag in commit.tags:
            run("tag", tag)
    if current != "main":
        run("checkout", "-q", "main")
    bare.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    shutil.rmtree(work)
    return shas


# -- object storage emulators ---------------------------------------------------------


@dataclass
class Emulator:
    service: Service
    port: int

    def __post_init__(self) -> None:
        allow_source(self.port)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        self.service.stop()


def _wait_listening(service: Service, port: int, what: str, timeout: float = 60) -> None:
    def up() -> bool:
        if service.process.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{service.log()[-3000:]}")
        return _listening(port)

    wait_for(up, timeout, f"{what} listening on {LOOPBACK}:{port}")


def start_moto(log_dir: Path) -> Emulator:
    """moto in server mode (S3 and the rest of AWS) on 127.0.0.1."""
    port = free_port()
    service = start(
        "moto-server", [str(BIN / "moto_server"), "-H", LOOPBACK, "-p", str(port)], log_dir
    )
    _wait_listening(service, port, "moto_server")
    return Emulator(service, port)


def start_gcs_emulator(log_dir: Path) -> Emulator:
    """gcp-storage-emulator, in memory, on 127.0.0.1."""
    port = free_port()
    service = start(
        "gcp-storage-emulator",
        [
            str(BIN / "gcp-storage-emulator"),
            "start",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--in-memory",
        ],
        log_dir,
    )
    _wait_listening(service, port, "gcp-storage-emulator")
    return Emulator(service, port)


class _TokenHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(
            {"access_token": "emulator-access-token", "expires_in": 3600, "token_type": "Bearer"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TokenEndpoint:
    """Google's OAuth token endpoint, emulated on 127.0.0.1.

    prefect-gcp signs in with the service account of its credentials block before every
    call; the service account's ``token_uri`` points here, so no request leaves loopback.
    """

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _TokenHandler)
        self._server.daemon_threads = True
        allow_source(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def fake_service_account(project: str, token_uri: str) -> dict[str, str]:
    """Service account info with a fresh key, signing in at `token_uri` (loopback)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "test-key",
        "private_key": pem,
        "client_email": f"flows@{project}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }


@dataclass
class Azurite(Emulator):
    account: str = "flowsaccount"
    key: str = ""

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
            f"BlobEndpoint={self.endpoint}/{self.account};"
        )


def start_azurite(root: Path, log_dir: Path) -> Azurite:
    """Azurite's blob service on 127.0.0.1, with an account and key made here, and its
    telemetry off (it would otherwise report to the internet)."""
    if not AZURITE.exists():
        raise FileNotFoundError(
            f"{AZURITE.relative_to(ROOT)} is missing; run scripts/setup.sh, which installs "
            "azurite from npm into .tools/"
        )
    port = free_port()
    account = "flowsaccount"
    key = base64.b64encode(os.urandom(32)).decode()
    root.mkdir(parents=True, exist_ok=True)
    service = start(
        "azurite",
        [
            str(AZURITE),
            "--blobHost",
            LOOPBACK,
            "--blobPort",
            str(port),
            "--location",
            str(root),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
        ],
        log_dir,
        {"AZURITE_ACCOUNTS": f"{account}:{key}"},
    )
    _wait_listening(service, port, "azurite-blob")
    return Azurite(service, port, account, key)


# -- wheels for the containers' package index ------------------------------------------

#: The runtime image's interpreter and platform (Debian bookworm: CPython 3.11, glibc 2.36).
CONTAINER_PLATFORM = [
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    "--platform",
    "manylinux_2_36_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_5_x86_64",
    "--platform",
    "manylinux1_x86_64",
    "--platform",
    "linux_x86_64",
]


def _pinned(distribution: str, extra: str = "") -> str:
    """The collection at the version the tests run with on this side."""
    return f"{distribution}{extra}=={importlib.metadata.version(distribution)}"


PREFECT_AWS = _pinned("prefect-aws")
PREFECT_GCP = _pinned("prefect-gcp", "[cloud_storage]")
PREFECT_AZURE = _pinned("prefect-azure", "[blob_storage]")
#: What the storage collections need in a container, Prefect pinned to this side's.
STORAGE_WHEELS = [
    f"prefect=={importlib.metadata.version('prefect')}",
    PREFECT_AWS,
    PREFECT_GCP,
    PREFECT_AZURE,
]


def ensure_wheelhouse(directory: Path, requirements: list[str]) -> Path:
    """Download `requirements` and all their dependencies as wheels for the container,
    once: a later call with the same requirements finds them in `directory`."""
    digest = hashlib.sha256("\n".join([*requirements, *CONTAINER_PLATFORM]).encode()).hexdigest()
    wheels = directory / digest[:16]
    directory.mkdir(parents=True, exist_ok=True)
    # Another test process may be downloading the same wheels: one downloads, the other
    # waits for it and finds them complete.
    with open(directory / f"{digest[:16]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (wheels / ".complete").exists():
            _download_wheels(wheels, requirements)
    return wheels


def _download_wheels(wheels: Path, requirements: list[str]) -> None:
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--dest",
            str(wheels),
            *CONTAINER_PLATFORM,
            *requirements,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(requirements)} failed:\n{done.stderr[-3000:]}")
    (wheels / ".complete").write_text("\n".join(requirements) + "\n")


def link_wheels(wheels: Path, index_root: Path) -> None:
    """Offer the wheels through a pypiserver serving `index_root`."""
    for wheel in wheels.glob("*.whl"):
        target = index_root / wheel.name
        if not target.exists():
            target.symlink_to(wheel.resolve())
