"""A Ray Tune sweep folder is code: `Tuner.restore` unpickles what it finds there (tuner.pkl, the
trials' params.pkl, checkpoints). `--resume` therefore restores only a folder this project wrote
and nobody changed since: after every run the driver signs the folder with an HMAC-SHA256 over
every file's path, size and SHA-256, under a key kept outside the sweep folder (the user's config
folder, `BACKDOOR_PURIFY_CONFIG_DIR` or ~/.config/backdoor-purify, mode 0600), and checks it
before restoring anything."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from defense.errors import UnsafeFileError
from defense.fileio import atomic_write_json

SIGNATURE_FORMAT = "backdoor-purify-sweep-signature/2"   # /2: folders, modes and every kind of entry
KEY_NAME = "sweep-signing.key"


def config_dir() -> Path:
    return Path(os.environ.get("BACKDOOR_PURIFY_CONFIG_DIR") or Path.home() / ".config" / "backdoor-purify")


def signing_key(create: bool) -> bytes | None:
    """This user's key (32 random bytes), created on first use when `create`."""
    path = config_dir() / KEY_NAME
    if path.exists() and (path.is_symlink() or not path.is_file()):
        raise UnsafeFileError(f"sweep signing key {path} is not a plain file; remove it")
    if path.is_file():
        status = path.stat()
        if status.st_mode & 0o077 or (hasattr(os, "getuid") and status.st_uid != os.getuid()):
            raise UnsafeFileError(f"sweep signing key {path} can be read or changed by others (mode "
                                  f"{status.st_mode & 0o777:o}); whoever reads it can sign a folder you would "
                                  f"resume: `chmod 600 {path}` if it is yours, else remove it")
        key = path.read_bytes()
        if len(key) >= 32:
            return key
        raise UnsafeFileError(f"sweep signing key {path} is damaged (shorter than 32 bytes); remove it")
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    return key


def _digest(folder: Path, key: bytes) -> tuple[str, int]:
    """The HMAC over every entry under `folder`: each folder's path and mode, each file's path, mode,
    size and SHA-256. A link, a FIFO, a socket or a device is refused (a folder this project wrote holds
    none, and reading a FIFO would block)."""
    import stat

    mac = hmac.new(key, SIGNATURE_FORMAT.encode(), hashlib.sha256)
    count = 0
    for path in sorted(folder.rglob("*")):
        status = path.lstat()
        name, mode = path.relative_to(folder).as_posix(), stat.S_IMODE(status.st_mode)
        if stat.S_ISDIR(status.st_mode):
            mac.update(json.dumps(["folder", name, mode]).encode())
        elif stat.S_ISREG(status.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
            mac.update(json.dumps(["file", name, mode, status.st_size, content]).encode())
            count += 1
        else:
            kind = "a symbolic link" if stat.S_ISLNK(status.st_mode) else "not a plain file or folder"
            raise UnsafeFileError(f"{path} is {kind}; a sweep folder this project wrote holds none")
    return mac.hexdigest(), count


def signature_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.signature.json"


def sign_folder(folder: Path) -> None:
    """Sign every file under `folder` (the signature lies beside it, not in it)."""
    digest, count = _digest(folder, signing_key(create=True))
    atomic_write_json(signature_path(folder), {"format": SIGNATURE_FORMAT, "files": count, "hmac": digest})


def verify_folder(folder: Path) -> None:
    """UnsafeFileError unless `folder` is exactly as this user's project last signed it."""
    refusal = (f"refusing to resume {folder}: a Tune folder is code (pickles) and this one ")
    signature = signature_path(folder)
    if not signature.is_file():
        raise UnsafeFileError(refusal + f"carries no signature of this project ({signature.name} is missing)")
    key = signing_key(create=False)
    if key is None:
        raise UnsafeFileError(refusal + f"was signed under a key this user does not have ({config_dir() / KEY_NAME})")
    try:
        recorded = json.loads(signature.read_text())
        expected, version = str(recorded["hmac"]), recorded.get("format")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise UnsafeFileError(refusal + f"has an unreadable signature ({signature.name})") from None
    if version != SIGNATURE_FORMAT:
        raise UnsafeFileError(refusal + f"was signed in another format ({str(version)[:40]}; this version writes "
                              f"{SIGNATURE_FORMAT}): run the sweep again in a fresh --out")
    digest, _ = _digest(folder, key)
    if not hmac.compare_digest(digest, expected):
        raise UnsafeFileError(refusal + "was changed after this project signed it (or signed under another key)")
