"""Prepares the moto servers for tests/scripts/aws_kms.sh and prints what it made, as JSON.

relaxed server: keys (primary, rotation target, alias, disabled, revocation drill), any
credentials accepted.
strict server (started with INITIAL_NO_AUTH_ACTION_COUNT=10): an IAM user whose policy allows
the key calls except kms:Decrypt, a user allowed every key call (whose permission the
revocation drill withdraws and restores), the customer's administrator who does that, and a
key; from then on every request is authenticated.
"""
import json
import sys

import boto3

relaxed, strict = sys.argv[1], sys.argv[2]
anon = dict(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")

kms = boto3.client("kms", endpoint_url=relaxed, **anon)
primary = kms.create_key(KeyUsage="ENCRYPT_DECRYPT", Description="byok primary")["KeyMetadata"]
second = kms.create_key(KeyUsage="ENCRYPT_DECRYPT", Description="byok rotation target")["KeyMetadata"]
kms.create_alias(AliasName="alias/byok-tenant-b", TargetKeyId=primary["KeyId"])
disabled = kms.create_key(KeyUsage="ENCRYPT_DECRYPT", Description="byok disabled")["KeyMetadata"]
kms.disable_key(KeyId=disabled["KeyId"])
drill = kms.create_key(KeyUsage="ENCRYPT_DECRYPT", Description="byok revocation drill")["KeyMetadata"]

# Strict server: these calls run within its initial unauthenticated allowance.
iam = boto3.client("iam", endpoint_url=strict, **anon)
users = {}
for user, actions in (("customer-admin", "*"), ("byok-revocable", "kms:*")):
    iam.create_user(UserName=user)
    users[user] = iam.create_access_key(UserName=user)["AccessKey"]
    iam.put_user_policy(
        UserName=user,
        PolicyName="allow",
        PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }),
    )
iam.create_user(UserName="byok-platform")
key = iam.create_access_key(UserName="byok-platform")["AccessKey"]
iam.put_user_policy(
    UserName="byok-platform",
    PolicyName="byok-no-decrypt",
    PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["kms:DescribeKey", "kms:GenerateDataKey", "kms:ReEncrypt*"], "Resource": "*"},
            {"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"},
        ],
    }),
)
strict_kms = boto3.client("kms", endpoint_url=strict, **anon)
strict_key = strict_kms.create_key(KeyUsage="ENCRYPT_DECRYPT", Description="byok strict")["KeyMetadata"]

print(json.dumps({
    "primary_arn": primary["Arn"],
    "second_arn": second["Arn"],
    "disabled_arn": disabled["Arn"],
    "strict_arn": strict_key["Arn"],
    "strict_access_key_id": key["AccessKeyId"],
    "strict_secret_access_key": key["SecretAccessKey"],
    "drill_arn": drill["Arn"],
    "admin_access_key_id": users["customer-admin"]["AccessKeyId"],
    "admin_secret_access_key": users["customer-admin"]["SecretAccessKey"],
    "revocable_access_key_id": users["byok-revocable"]["AccessKeyId"],
    "revocable_secret_access_key": users["byok-revocable"]["SecretAccessKey"],
}))
