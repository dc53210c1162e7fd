"""An S3 endpoint for the store tests (moto's standalone server, `moto[server]` in the test
extras), and `Root`: a dataset root under test, a local directory or an `s3://bucket/prefix`,
with the few file operations the tests make on it.

The endpoint is configured the way a user configures one, through the AWS SDK's standard
environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`,
`AWS_ENDPOINT_URL_S3`), which pyarrow reads when it opens an `s3://` URI; writer subprocesses
inherit them.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from softwatch.store import journal_dir, open_root

from .prometheus import free_port

ACCESS_KEY = SECRET_KEY = "testing"  # moto accepts any
REGION = "us-east-1"


class S3Endpoint:
    """moto's server on a free port of 127.0.0.1, in its own process."""

    def __init__(self, workdir: Path):
        self.log = open(workdir / "moto.log", "w")
        for _ in range(5):  # the free port can be taken between our probe and moto's bind
            self.port = free_port()
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=self.log, stderr=subprocess.STDOUT)
            if self._wait_up():
                break
        else:
            raise RuntimeError(f"moto's server did not start; see {workdir / 'moto.log'}")
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL_S3": self.url}
        # Buckets are made and removed by the tests alone: the store never creates one.
        self.admin = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                                       endpoint_override=self.url, allow_bucket_creation=True,
                                       allow_bucket_deletion=True)

    def _wait_up(self, timeout_s: float = 30.0) -> bool:
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        return False

    def new_root(self) -> Root:
        """A fresh bucket, and a root under a prefix of it."""
        bucket = f"softwatch-{uuid.uuid4().hex[:12]}"
        self.admin.create_dir(bucket)
        return Root(f"s3://{bucket}/data", endpoint=self)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Root:
    """A dataset root under test. `uri` is what softwatch is given; paths are relative to it."""

    def __init__(self, uri: str, endpoint: S3Endpoint | None = None):
        self.uri, self.endpoint = uri, endpoint
        self.fs, self.path = open_root(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def journal_dir(self) -> Path:
        """Where writers of this root journal: under it locally, in the local cache for S3."""
        return Path(journal_dir(self.uri))

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self / relative).type != pafs.FileType.NotFound

    def names(self, relative: str) -> list[str]:
        """The names directly under a directory."""
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self / relative)))

    def files(self, table: str | None, pattern: str = "*.parquet") -> list[str]:
        """Paths of a table's files (every day partition; every table's if None) whose names
        match `pattern`."""
        directory = self.path if table is None else self / table
        infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))

    def write_bytes(self, relative: str, data: bytes) -> None:
        if self.local:
            os.makedirs(os.path.dirname(self / relative), exist_ok=True)
        with self.fs.open_output_stream(self / relative) as f:
            f.write(data)

    @contextmanager
    def writes_failing(self):
        """Every write of a data file fails until the block ends: locally a file stands where the
        `tokens` directory goes; on S3 the bucket is gone (every request answers NoSuchBucket),
        so what the root held is gone too: use it before anything is written."""
        if self.local:
            blocker = Path(self / "tokens")
            blocker.write_text("a file where the tokens directory should be: every flush fails")
            try:
                yield
            finally:
                blocker.unlink()
            return
        admin = self.endpoint.admin
        admin.delete_dir_contents(self.bucket)
        admin.delete_dir(self.bucket)
        try:
            yield
        finally:
            admin.create_dir(self.bucket)
