"""Checks of an s3:// --output before Ray starts and before anything is written: the endpoint answers, the
credentials are accepted, the bucket exists and this job may write there. One line each (flag, URI, cause,
fix), as services.encode.preflight does for local inputs; no credential ever appears in a message.

Write permission is checked by starting a multipart upload and aborting it at once: an unfinished upload is
never an object, so nothing becomes visible in the bucket.
"""
from __future__ import annotations

import uuid

from services.encode.preflight import InputProblem
from shared.s3_store import client_error_code, make_client, split_s3_uri

CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to credentials of this store, "
                   "as for any AWS tool")
REFUSED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                 "InvalidClientTokenId", "AuthFailure"}


def check_s3_output(uri: str) -> None:
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     ReadTimeoutError)

    flag = f"--output {uri}"
    bucket, prefix, options = split_s3_uri(uri)
    if not bucket:
        raise InputProblem(f"{flag}: no bucket in the URI; pass s3://BUCKET/PREFIX")
    client = make_client(options.get("endpoint_override"), connect_timeout=5, attempts=2)
    endpoint = client.meta.endpoint_url
    key_prefix = f"{prefix}/" if prefix else ""
    step = "list"
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=key_prefix, MaxKeys=1)
        step = "write"
        probe = f"{key_prefix}.preflight-{uuid.uuid4().hex[:8]}"
        upload = client.create_multipart_upload(Bucket=bucket, Key=probe)["UploadId"]
        client.abort_multipart_upload(Bucket=bucket, Key=probe, UploadId=upload)
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise InputProblem(f"{flag}: cannot reach the object store at {endpoint} ({type(exc).__name__}); check "
                           "AWS_ENDPOINT_URL (or endpoint_url in ~/.aws/config) and the network") from None
    except NoCredentialsError:
        raise InputProblem(f"{flag}: no credentials found; {CREDENTIALS_FIX}") from None
    except ClientError as exc:
        code = client_error_code(exc)
        if code in REFUSED_CODES:
            raise InputProblem(f"{flag}: the store at {endpoint} refused the credentials ({code}); "
                               f"{CREDENTIALS_FIX}") from None
        if code == "NoSuchBucket":
            raise InputProblem(f"{flag}: bucket {bucket!r} does not exist at {endpoint}; create it or fix the "
                               "bucket name") from None
        if code in {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}:
            what = "list" if step == "list" else "write to"
            raise InputProblem(f"{flag}: these credentials may not {what} s3://{bucket}/{key_prefix} ({code}); "
                               f"grant s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject and "
                               f"s3:AbortMultipartUpload there, or use credentials that have them") from None
        raise InputProblem(f"{flag}: the store at {endpoint} answered {code or exc}; check the URI and "
                           "the store") from None
