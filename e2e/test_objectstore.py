"""The harness's object store answers like S3, to a real S3 client, on loopback only."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from harness.testing import Cluster

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def client(cluster: Cluster, secret: str | None = None) -> S3Client:
    env = cluster.env
    return boto3.client(
        "s3",
        endpoint_url=env["VIRTFLEET_S3_ENDPOINT"],
        aws_access_key_id=env["VIRTFLEET_S3_ACCESS_KEY"],
        aws_secret_access_key=secret or env["VIRTFLEET_S3_SECRET_KEY"],
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
    )


def test_a_bucket_holds_what_was_put_and_lists_it(cluster: Cluster) -> None:
    assert cluster.env["VIRTFLEET_S3_ENDPOINT"].startswith("http://127.0.0.1:")
    s3 = client(cluster)
    bucket = f"smoke-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    body = uuid.uuid4().bytes * 4096  # 64 KiB
    s3.put_object(Bucket=bucket, Key="vm/disk.part", Body=body)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="vm/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("vm/disk.part", len(body))]
    assert s3.get_object(Bucket=bucket, Key="vm/disk.part")["Body"].read() == body
    s3.delete_object(Bucket=bucket, Key="vm/disk.part")
    s3.delete_bucket(Bucket=bucket)  # a bucket holds volume slots of the store until deleted


def test_a_wrong_secret_is_refused(cluster: Cluster) -> None:
    with pytest.raises(ClientError) as refused:
        client(cluster, secret="not-the-secret").list_buckets()
    assert refused.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")
