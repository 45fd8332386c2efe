"""The EC2 driver on boto3: Arvados lib/cloud/ec2 behaviour."""
