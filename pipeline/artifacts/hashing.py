"""Content hashes the manifests record: files, weight folders, tokenizers."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_HASHES: dict[tuple, str] = {}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, remembered per (path, size, mtime): cache validation and the manifest's
    weights hash read the same 500 MB file on every model load otherwise."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def weights_hash(folder: str | Path) -> str:
    """Content hash of a model folder's weight files (safetensors or bin), order-independent of listing."""
    folder = Path(folder)
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
