"""An S3 API on loopback for tests: moto's server in a thread of the test process, on a free port.

It ends with the process that started it (a daemon thread) or at ``stop()``, so nothing outlives
the tests. Its endpoint and dummy credentials go into the standard AWS variables, which s3fs
(through botocore) reads here and in every subprocess a test starts.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        port = int(self.endpoint.rsplit(":", 1)[1])
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def new_bucket(self) -> str:
        """A new, empty bucket; its ``s3://`` URL."""
        import s3fs

        name = f"loaq-{uuid.uuid4().hex[:20]}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing").mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._server.stop()


def start_server() -> S3Server:
    return S3Server()
