"""An encode output under a prefix of an S3-compatible bucket (AWS S3, MinIO, OBS, GCS's S3 API, ...).

Credentials and the endpoint come from boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_PROFILE and ~/.aws, instance or pod roles; AWS_ENDPOINT_URL for a non-AWS endpoint). Nothing here logs or
stores them. Object stores have no rename and no locks, so the store offers what the commit protocol in
docs/design.md is built from: whole-object publication by multipart upload (completed, or aborted on any
failure), create-if-absent (`If-None-Match: *`) and replace-if-unchanged (`If-Match: <etag>`).
"""
from __future__ import annotations

import email.utils
import errno
import hashlib
import tempfile
from typing import BinaryIO, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from shared.store import ObjectInfo, Store

PART_SIZE = 16 << 20  # multipart part size (S3's minimum is 5 MiB, except for the last part)
SPOOL_IN_MEMORY = 64 << 20  # a shard larger than this is spooled through a temporary file
SHA256_METADATA = "sha256"  # user metadata on every published object: its content checksum
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
CONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def split_s3_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """(bucket, key prefix without slashes at its ends, query options) of s3://bucket/prefix?opt=value."""
    parts = urlsplit(uri)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return parts.netloc, unquote(parts.path).strip("/"), options


def client_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code")) if isinstance(response, dict) else None


def as_os_error(exc: Exception, where: str) -> OSError:
    """A boto error as the OSError the callers already handle (missing, denied, or an I/O failure)."""
    code = client_error_code(exc)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if code in MISSING_CODES:
        return FileNotFoundError(errno.ENOENT, detail, where)
    if code in DENIED_CODES:
        return PermissionError(errno.EACCES, f"access denied by the object store ({detail})", where)
    return OSError(errno.EIO, detail, where)


def make_client(endpoint: str | None = None, connect_timeout: float = 10, attempts: int = 5):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout, read_timeout=60,
                    retries={"max_attempts": attempts, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, client=None, endpoint: str | None = None):
        self.bucket, self.prefix = bucket, prefix
        self.client = client or make_client(endpoint)
        self.root = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    @classmethod
    def from_uri(cls, uri: str, client=None) -> "S3Store":
        bucket, prefix, options = split_s3_uri(uri)
        return cls(bucket, prefix, client, endpoint=options.get("endpoint_override"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}".lstrip("/") if name else self.prefix

    def location(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _call(self, name: str, operation: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            raise as_os_error(exc, self.location(name)) from None
        except BotoCoreError as exc:  # unreachable endpoint, credentials missing, ...
            raise OSError(errno.EIO, str(exc), self.location(name)) from None

    # --- reading ------------------------------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        return self._call(name, "get_object", Key=self.key(name))["Body"].read()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._call(name, "get_object", Key=self.key(name), Range=f"bytes={start}-{end - 1}")["Body"].read()

    def _head(self, name: str) -> dict | None:
        try:
            return self._call(name, "head_object", Key=self.key(name))
        except FileNotFoundError:
            return None

    def info(self, name: str) -> ObjectInfo | None:
        head = self._head(name)
        if head is None:
            return None
        return ObjectInfo(head["ContentLength"], head["LastModified"].timestamp(), head["ETag"])

    def age(self, name: str) -> tuple[bytes, str, float] | None:
        """(content, ETag, seconds since it was written) with the age measured on the server's clock (its
        response Date minus the object's Last-Modified), so hosts whose clocks differ agree on it."""
        try:
            response = self._call(name, "get_object", Key=self.key(name))
        except FileNotFoundError:
            return None
        server_now = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return (response["Body"].read(), response["ETag"],
                (server_now - response["LastModified"]).total_seconds())

    def listing(self, directory: str) -> dict[str, ObjectInfo]:
        prefix = self.key(directory).rstrip("/") + "/"
        found = {}
        for page in self._pages(directory, "list_objects_v2", Prefix=prefix, Delimiter="/"):
            for item in page.get("Contents", []):
                found[item["Key"][len(prefix):]] = ObjectInfo(item["Size"], item["LastModified"].timestamp(),
                                                              item["ETag"])
        return found

    def keys_under(self, directory: str) -> list[str]:
        """Every name under `directory`, at any depth."""
        prefix = self.key(directory).rstrip("/") + "/"
        return [item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"]
                for page in self._pages(directory, "list_objects_v2", Prefix=prefix)
                for item in page.get("Contents", [])]

    def _pages(self, name: str, operation: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield from self.client.get_paginator(operation).paginate(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            raise as_os_error(exc, self.location(name)) from None
        except BotoCoreError as exc:
            raise OSError(errno.EIO, str(exc), self.location(name)) from None

    def sha256(self, name: str) -> str:
        head = self._head(name)
        recorded = (head or {}).get("Metadata", {}).get(SHA256_METADATA)
        return recorded or super().sha256(name)

    # --- writing ------------------------------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        self._call(name, "put_object", Key=self.key(name), Body=data)

    def create_new(self, name: str, data: bytes) -> bool:
        return self.create_tagged(name, data) is not None

    def create_tagged(self, name: str, data: bytes) -> str | None:
        """create_new that returns the new object's ETag (None when `name` exists)."""
        try:
            return self._call(name, "put_object", Key=self.key(name), Body=data, IfNoneMatch="*")["ETag"]
        except OSError as exc:
            if _condition_failed(exc):
                return None
            raise

    def replace_if(self, name: str, data: bytes, tag: str) -> str | None:
        """Replace `name` only if its ETag is still `tag`; the new ETag, or None if someone else wrote it."""
        try:
            return self._call(name, "put_object", Key=self.key(name), Body=data, IfMatch=tag)["ETag"]
        except (OSError, FileNotFoundError) as exc:
            if isinstance(exc, FileNotFoundError) or _condition_failed(exc):
                return None
            raise

    def publish(self, name: str, fill: Callable[[BinaryIO], None]) -> ObjectInfo:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            hashing = HashingWriter(spool)
            fill(hashing)
            size = spool.tell()
            spool.seek(0)
            self._multipart(name, spool, size, {SHA256_METADATA: hashing.digest.hexdigest()})
        return self.info(name)

    def _multipart(self, name: str, source: BinaryIO, size: int, metadata: dict) -> None:
        """One multipart upload: completed when every part is in, aborted on any failure (nothing then appears
        under `name`, and the parts are freed)."""
        key = self.key(name)
        upload = self._call(name, "create_multipart_upload", Key=key, Metadata=metadata)["UploadId"]
        try:
            parts = []
            for number in range(1, max(1, -(-size // PART_SIZE)) + 1):
                body = source.read(PART_SIZE)
                etag = self._call(name, "upload_part", Key=key, UploadId=upload, PartNumber=number, Body=body)["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
            self._call(name, "complete_multipart_upload", Key=key, UploadId=upload,
                       MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self._call(name, "abort_multipart_upload", Key=key, UploadId=upload)
            except OSError:
                pass  # discard_unfinished aborts it on the next run
            raise

    def delete(self, name: str) -> None:
        self._call(name, "delete_object", Key=self.key(name))

    def discard_unfinished(self, directory: str) -> list[str]:
        """Abort the multipart uploads of writers killed mid-publish (invisible, but they hold storage)."""
        prefix = self.key(directory).rstrip("/") + "/"
        aborted = []
        for page in self._pages(directory, "list_multipart_uploads", Prefix=prefix):
            for upload in page.get("Uploads", []):
                self._call(directory, "abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(upload["Key"].rsplit("/", 1)[-1])
        return aborted

    def move(self, name: str, new_name: str) -> None:
        """Copy then delete (no rename on an object store): a file, or every object under a directory."""
        names = [name] if self._head(name) is not None else self.keys_under(name)
        for old in names:
            new = new_name + old[len(name):]
            self._call(new, "copy_object", Key=self.key(new), CopySource={"Bucket": self.bucket, "Key": self.key(old)})
            self.delete(old)


def _condition_failed(exc: OSError) -> bool:
    return any(code in str(exc) for code in ("PreconditionFailed", "ConditionalRequestConflict", "(412)", "(409)"))


class HashingWriter:
    """A binary file wrapper that hashes what is written through it (Parquet writers need write and tell)."""

    def __init__(self, target: BinaryIO):
        self.target, self.digest = target, hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        self.digest.update(data)
        return self.target.write(data)

    def tell(self) -> int:
        return self.target.tell()

    def flush(self) -> None:
        self.target.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the spool is closed by its owner
        self.closed = True
