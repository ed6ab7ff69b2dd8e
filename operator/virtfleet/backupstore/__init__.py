"""Backup locations: S3-compatible buckets, through boto3 (the only module that imports it)."""
