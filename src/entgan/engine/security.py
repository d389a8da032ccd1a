"""Who belongs to a run: a per-job secret, a challenge-response handshake, authenticated updates.

Every process of a run holds the job secret. Before any parameter moves, the server challenges each
worker with a fresh random nonce and the worker answers with HMAC-SHA256(secret, context | nonce);
the worker challenges the server the same way, so neither side trusts a peer that cannot prove it
holds the secret. Each accepted pair derives a session key from both nonces, and every update a
worker uploads carries an HMAC under that key, which the server checks before it averages anything.

What this does not do: gloo traffic is not encrypted, so anyone on the path can read the
parameters (not forge them). Across untrusted networks, run the ranks inside a VPN or WireGuard
tunnel (see the README's security section).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import torch

from entgan.config import ConfigError, SecurityConfig
from entgan.engine.transport import Transport

NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
SERVER_RANK = 0


class AuthenticationError(RuntimeError):
    """A peer could not prove it holds the job secret (or a message's MAC did not verify)."""


def load_secret(config: SecurityConfig, *, allow_generated: bool = False) -> bytes:
    """The job secret: from `secret_file`, else from the environment variable `secret_env`.

    Never from the command line (it would show in `ps`). An embedded run may make a fresh random
    secret for its own processes (`allow_generated`), since nobody else can join it anyway.
    """
    if config.secret_file is not None:
        path = Path(config.secret_file)
        try:
            secret = path.read_bytes().strip()
        except OSError as error:
            raise ConfigError(f"security.secret_file: cannot read {path} ({error.strerror})") from None
        if len(secret) < 16:
            raise ConfigError(f"security.secret_file: {path} holds {len(secret)} bytes; use at least 16")
        return secret
    value = os.environ.get(config.secret_env)
    if value:
        if len(value) < 16:
            raise ConfigError(f"security.secret_env: ${config.secret_env} holds {len(value)} characters; use at least 16")
        return value.encode()
    if allow_generated:
        return secrets.token_hex(32).encode()
    raise ConfigError(
        f"security: no job secret; set security.secret_file or the environment variable {config.secret_env} "
        "on every machine of the run"
    )


def _proof(secret: bytes, job: str, prover: int, verifier: int, nonce: bytes) -> bytes:
    message = b"entgan-join\0" + job.encode() + b"\0" + f"{prover}->{verifier}".encode() + b"\0" + nonce
    return hmac.new(secret, message, hashlib.sha256).digest()


def _session_key(secret: bytes, job: str, worker: int, server_nonce: bytes, worker_nonce: bytes) -> bytes:
    message = b"entgan-session\0" + job.encode() + b"\0" + str(worker).encode() + b"\0" + server_nonce + worker_nonce
    return hmac.new(secret, message, hashlib.sha256).digest()


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.cpu().numpy().tobytes())


def message_mac(key: bytes, *parts: torch.Tensor) -> torch.Tensor:
    """HMAC-SHA256 of the raw bytes of `parts`, as a uint8 tensor (sent next to the message).

    The hash reads each tensor's memory in place (numpy's buffer), never a `bytes` copy of it: an
    update's MAC is checked on the server's critical path, where a copy would cost its size again."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return _as_tensor(mac.digest())


def mac_matches(key: bytes, mac: torch.Tensor, *parts: torch.Tensor) -> bool:
    return hmac.compare_digest(_as_bytes(message_mac(key, *parts)), _as_bytes(mac))


def server_handshake(transport: Transport, workers: list[int], secret: bytes, job: str) -> dict[int, bytes]:
    """Rank 0: challenge every worker, answer theirs, accept or refuse each; return session keys.

    Raises AuthenticationError naming every refused rank, after telling each worker its verdict,
    so no refused process ever receives a parameter.
    """
    device = transport.device
    server_nonces = {rank: secrets.token_bytes(NONCE_BYTES) for rank in workers}
    for rank in workers:
        transport.send([_as_tensor(server_nonces[rank]).to(device)], rank, "auth").wait()
    keys: dict[int, bytes] = {}
    refused: list[int] = []
    for rank in workers:
        answer = torch.zeros(MAC_BYTES + NONCE_BYTES, dtype=torch.uint8, device=device)
        transport.receive([answer], rank, "auth").wait()
        proof, worker_nonce = _as_bytes(answer[:MAC_BYTES]), _as_bytes(answer[MAC_BYTES:])
        if hmac.compare_digest(proof, _proof(secret, job, rank, SERVER_RANK, server_nonces[rank])):
            keys[rank] = _session_key(secret, job, rank, server_nonces[rank], worker_nonce)
            verdict = _proof(secret, job, SERVER_RANK, rank, worker_nonce)
        else:
            refused.append(rank)
            verdict = bytes(MAC_BYTES)  # all zeros: refused, and no proof of the server's own
        transport.send([_as_tensor(verdict).to(device)], rank, "auth").wait()
    if refused:
        raise AuthenticationError(
            f"rank(s) {refused} could not prove they hold the job secret and were refused before any "
            "parameter was exchanged; check that every machine uses the same secret"
        )
    return keys


def worker_handshake(transport: Transport, rank: int, secret: bytes, job: str) -> bytes:
    """Ranks 1..K: answer the server's challenge, check the server's proof; return the session key."""
    device = transport.device
    challenge = torch.zeros(NONCE_BYTES, dtype=torch.uint8, device=device)
    transport.receive([challenge], SERVER_RANK, "auth").wait()
    server_nonce = _as_bytes(challenge)
    worker_nonce = secrets.token_bytes(NONCE_BYTES)
    answer = _proof(secret, job, rank, SERVER_RANK, server_nonce) + worker_nonce
    transport.send([_as_tensor(answer).to(device)], SERVER_RANK, "auth").wait()
    verdict = torch.zeros(MAC_BYTES, dtype=torch.uint8, device=device)
    transport.receive([verdict], SERVER_RANK, "auth").wait()
    if not hmac.compare_digest(_as_bytes(verdict), _proof(secret, job, SERVER_RANK, rank, worker_nonce)):
        raise AuthenticationError(
            f"rank {rank}: the server refused this process, or could not prove it holds the job secret; "
            "no parameter was exchanged"
        )
    return _session_key(secret, job, rank, server_nonce, worker_nonce)
