"""s3:// stores through fsspec (s3fs), against moto's S3 server on loopback."""

import pickle

import numpy as np
import pytest

from rpicluster.data.reader import open_dataset
from rpicluster.data.writer import ingest
from rpicluster.errors import DataError


@pytest.fixture(scope="module")
def s3_options():
    """fsspec storage options for an S3 server (moto) on a free loopback port, bucket 'data'."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket="data")
    yield {"key": "k", "secret": "s",
           "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


def test_ingest_to_and_read_from_s3(tmp_path, s3_options):
    import s3fs

    url = "s3://data/digits.zarr"
    ingest("sklearn:digits", url, block_rows=600, storage_options=s3_options)
    local = ingest("sklearn:digits", tmp_path / "d.zarr", block_rows=600)
    ds = pickle.loads(pickle.dumps(open_dataset(url, s3_options)))
    assert ds.url == url and ds.n_blocks == 3
    for i in range(3):
        for a, b in zip(ds.block(i), local.block(i)):
            np.testing.assert_array_equal(a, b)
    s3fs.S3FileSystem(**s3_options).rm("data/digits.zarr/y/c/1")
    with pytest.raises(DataError, match=r"array 'y' chunk 'y/c/1' \(block 1\) is missing"):
        ds.block(1)
    with pytest.raises(DataError, match="already holds a complete rpicluster store"):
        ingest("sklearn:digits", url, storage_options=s3_options)
