"""Uploaded and generated files (``/v1/files``), kept in memory."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from . import errors

PURPOSES = ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]


@dataclass
class StoredFile:
    """An uploaded or generated file."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


class FileStore:
    """Files by id, in upload order."""

    def __init__(self) -> None:
        self.files: dict[str, StoredFile] = {}

    def add(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        f = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data, int(time.time()))
        self.files[f.id] = f
        return f

    def get(self, file_id: str) -> StoredFile:
        try:
            return self.files[file_id]
        except KeyError:
            raise errors.not_found_object("File", file_id) from None
