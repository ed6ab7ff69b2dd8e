"""An HTTP server in a thread, for tests of http disk sources and guest networking."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path


@contextlib.contextmanager
def serve(
    handler: type[http.server.BaseHTTPRequestHandler],
    host: str = "127.0.0.1",
    while_binding: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> Iterator[str]:
    """Serve ``handler`` on ``host`` (an ephemeral port); yields the base URL.
    ``while_binding`` is entered while the socket is made (e.g. a network namespace's)."""
    with while_binding():
        httpd = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def serve_folder(folder: Path, host: str = "127.0.0.1") -> AbstractContextManager[str]:
    """Serve the files of ``folder`` (quietly) on ``host``; yields the base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    return serve(Handler, host)
