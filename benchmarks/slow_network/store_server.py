#!/usr/bin/env python
"""An S3-compatible peer store for the slow-network benchmark: moto's server, one bucket, until killed.

`run.py` starts it in a host of node 0, so that the store mode's reads and writes from node 1 cross the shaped trunk
like the collective exchange does. Prints `ready` once the bucket exists.
"""

import argparse
import threading

import boto3
from moto.server import ThreadedMotoServer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="The address to serve on (the host's eth0).")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--bucket", default="slow-network")
    args = parser.parse_args()
    server = ThreadedMotoServer(ip_address=args.address, port=args.port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=f"http://{args.address}:{args.port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=args.bucket)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
