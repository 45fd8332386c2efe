"""dispatch-cloud: a cloud dispatcher for Arvados-style container queues."""

from setuptools import find_packages, setup

setup(
    name="dispatch-cloud",
    version="0.1.0",
    description="Cloud dispatcher for Arvados container queues, compatible with arvados-dispatch-cloud",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["actors", "actors.*", "api", "api.*", "cloud", "cloud.*", "conf", "conf.*"]),
    package_data={"conf": ["*.yml", "workloads/*.csv", "workloads/*.yml"]},
    install_requires=[
        "pykka>=4.4,<5",
        "paramiko>=3.5,<6",
        "bottle>=0.13,<0.14",
        "waitress>=3.0,<4",
        "prometheus-client>=0.20,<1",
        "pyyaml>=6,<7",
        "requests>=2.31,<3",
        "psycopg[binary]>=3.1.4,<4",  # the dispatch lock on the cluster database
        "azure-core>=1.32,<2",
        "azure-identity>=1.15,<2",
        "azure-mgmt-core>=1.6,<2",
        "azure-mgmt-compute>=38,<40",
        "azure-mgmt-network>=25,<34",
        "boto3>=1.34,<2",
        "botocore>=1.34,<2",
        "tqdm>=4.60,<5",  # simulate: progress bar
        "matplotlib>=3.7,<4",  # simulate: the report's plots
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-timeout>=2.2,<3",
            "hypothesis>=6.100,<7",
            "moto[server]>=5.0.19,<6",  # a real EC2 endpoint on 127.0.0.1 (tests/ec2fake.py)
        ],
    },
    entry_points={
        "console_scripts": [
            "dispatch-cloud=actors.cli:main",
            "dispatch-cloud-crunch-run=cloud.local.runner:main",
        ],
    },
)
