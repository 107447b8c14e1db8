"""A real S3-protocol server on loopback for the object-storage tests: moto's standalone server (the moto[server]
package), in its own process, stopped by its pid. Authentication is enforced once the test users exist, so wrong
credentials and missing permissions fail as they do on a real store. Only this server's test credentials exist.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

READ_ONLY_ACTIONS = ["s3:Get*", "s3:List*", "s3:HeadBucket"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    log_path: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # user -> (access key id, secret)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, buckets=("encode-out",)) -> "S3Server":
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (see {self.log_path})")
                time.sleep(0.1)
        setup = dict(endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        import boto3

        iam = boto3.client("iam", **setup)
        for user, actions in (("writer", ["s3:*"]), ("reader", READ_ONLY_ACTIONS)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        s3 = boto3.client("s3", **setup)
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        # From here on every request must be signed by one of the users above (moto's switch for it).
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=30).read()
        return self

    def env(self, user: str = "writer", secret: str | None = None) -> dict[str, str]:
        """The standard environment variables a process reads its endpoint and credentials from."""
        key_id, key_secret = self.keys[user]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key_id,
                "AWS_SECRET_ACCESS_KEY": secret or key_secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self, user: str = "writer"):
        import boto3

        key_id, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                            aws_secret_access_key=secret)

    def keys_under(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def upload_tree(root, uri: str) -> None:
    """Every file under the local directory `root` to the same names under `uri` (through shared.store)."""
    from shared.store import open_store

    store = open_store(uri)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            store.write_bytes(str(path.relative_to(root)), path.read_bytes())
