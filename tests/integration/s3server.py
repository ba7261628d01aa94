"""A real S3 HTTP API on loopback (moto's server mode) with credentials that are checked.

moto accepts any credentials unless `INITIAL_NO_AUTH_ACTION_COUNT` is set: then only that
many requests go unauthenticated (here: creating an IAM user, its access key and policy)
and every later request must be signed with a key that user owns, so wrong credentials
fail like they do on AWS. The server is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REGION = "us-east-1"
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str = "petl") -> Iterator[dict[str, str]]:
    """Start the server, create a user with S3 rights and `bucket`; yield the AWS_* environment to use."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={"INITIAL_NO_AUTH_ACTION_COUNT": "3", "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        anon = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="anon", aws_secret_access_key="anon")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="petl")
        key = iam.create_access_key(UserName="petl")["AccessKey"]
        iam.put_user_policy(UserName="petl", PolicyName="s3", PolicyDocument=json.dumps(POLICY))
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": REGION}
        boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield env
    finally:
        proc.kill()
        proc.wait()
