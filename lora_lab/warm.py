"""What the ``lora-lab`` command and the warm server (``lora-lab-server``) share: where the server
listens, how the two talk, and how a client checks that a server was started from the same code and
environment. Standard library only: the command imports this before deciding whether to import
torch at all.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

PACKAGE_DIRS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "analysis")
# Libraries the server imports; a reinstall changes their __init__.py's mtime, which makes it stale.
PRELOADED_LIBRARIES = ("torch", "transformers", "datasets", "hydra", "omegaconf", "wandb")
# Read when a library is imported (cache locations, thread counts, CUDA devices, hash seed): a job
# whose environment differs from the server's in one of these must run in a fresh process instead.
IMPORT_TIME_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_",
                            "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "LD_", "PYTHON", "TOKENIZERS_",
                            "XDG_CACHE_HOME", "HOME")
DISABLE_ENV = "LORA_LAB_SERVER"  # =off: the command never uses a server
SOCKET_ENV = "LORA_LAB_SERVER_SOCKET"  # where the server listens (default: see socket_path)


class ServerUnavailable(Exception):
    """No compatible warm server: the command runs the job in its own process."""


class UnsafeSocket(ServerUnavailable):
    """The socket or its directory could be replaced by another user."""


def private_directory_problem(folder: Path) -> str | None:
    info = folder.stat()
    if info.st_uid != os.getuid():
        return f"{folder} belongs to another user"
    if info.st_mode & 0o022:
        return f"{folder} is writable by others"
    return None


def server_key() -> str:
    """One server per interpreter and checkout, so two virtual environments never share one."""
    text = f"{os.path.realpath(sys.executable)}\n{PACKAGE_DIRS[0]}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"lora_lab-{os.getuid()}"


def socket_path() -> Path:
    explicit = os.environ.get(SOCKET_ENV)
    return Path(explicit) if explicit else runtime_dir() / f"server-{server_key()}.sock"


def log_path() -> Path:
    return socket_path().with_suffix(".log")


def code_fingerprint() -> str:
    """Changes when any lora_lab or analysis source file, or a preloaded library, changes."""
    digest = hashlib.sha256(os.path.realpath(sys.executable).encode())
    for package in PACKAGE_DIRS:
        for root, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                stat = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}:{stat.st_mtime_ns}:{stat.st_size}\n".encode())
    for library in PRELOADED_LIBRARIES:
        spec = importlib.util.find_spec(library)
        origin = spec.origin if spec is not None else None
        stamp = os.stat(origin).st_mtime_ns if origin and os.path.exists(origin) else None
        digest.update(f"{library}:{origin}:{stamp}\n".encode())
    return digest.hexdigest()


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(IMPORT_TIME_ENV_PREFIXES)}


def environment_difference(ours: dict[str, str], theirs: dict[str, str]) -> str | None:
    """The first import-time variable set differently in two environments, as a short phrase."""
    a, b = import_time_environment(ours), import_time_environment(theirs)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} differs from the server's"
    return None


def process_start_time() -> float | None:
    """This process's start as a Unix time (Linux /proc), else None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- messages: 4-byte length + JSON

def send_message(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    payload = json.dumps(message).encode()
    data = struct.pack("!I", len(payload)) + payload
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def receive_message(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """The next message and any file descriptors sent with it; (None, []) when the peer closed."""
    fds: list[int] = []
    if max_fds:
        data, fds, _, _ = socket.recv_fds(sock, 65536, max_fds)
    else:
        data = sock.recv(65536)
    if not data:
        return None, fds
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("the connection closed in the middle of a message")
        data += more
    (length,) = struct.unpack("!I", data[:4])
    return json.loads(data[4:4 + length]), fds


def check_private(path: Path) -> None:
    """The socket and its directory must be this user's alone: the command sends the server its
    environment, which may hold API keys."""
    problem = private_directory_problem(path.parent)
    if problem is None and path.stat().st_uid != os.getuid():
        problem = f"{path} belongs to another user"
    if problem:
        raise UnsafeSocket(f"{problem}, so {path} is not used")


def connect(path: Path | None = None, timeout: float | None = 5.0) -> socket.socket:
    """A connection to the server, or ServerUnavailable."""
    path = path or socket_path()
    if not hasattr(socket, "AF_UNIX") or not path.exists():
        raise ServerUnavailable("no server is running")
    check_private(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as error:
        sock.close()
        raise ServerUnavailable(f"no server answers at {path} ({error.strerror or error})") from None
    return sock


def request(message: dict, path: Path | None = None, timeout: float = 5.0) -> dict:
    """One request and its reply (ping, stop)."""
    with connect(path, timeout) as sock:
        send_message(sock, message)
        reply, _ = receive_message(sock)
    if reply is None:
        raise ServerUnavailable("the server closed the connection")
    return reply
